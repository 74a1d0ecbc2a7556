//! Placeholder: filled by the PITR and retention issues.
