//! A cron expression of the sidecar's `[schedule]` section.

use super::{ConfigError, err};

/// A cron expression, checked when the configuration is read.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub expression: String,
    pub cron: croner::Cron,
}

impl Schedule {
    pub fn parse(key: &str, expression: &str) -> Result<Self, ConfigError> {
        let fields = expression.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(err(format!(
                "schedule.{key} '{expression}' has {fields} fields; use 5 (minute hour day month \
                 weekday) or 6 (seconds first)"
            )));
        }
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build();
        let cron = parser.parse(expression).map_err(|e| {
            err(format!(
                "schedule.{key} '{expression}' is not a cron expression: {e}"
            ))
        })?;
        Ok(Self {
            expression: expression.to_string(),
            cron,
        })
    }

    /// The first run strictly after `after`.
    pub fn next_after(
        &self,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cron.find_next_occurrence(&after, false).ok()
    }
}
