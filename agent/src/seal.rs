//! age encryption of what goes into the store: the file format of the `age` tool, so that
//! `age -d -i KEY OBJECT | zstd -d` opens any data or WAL object without gc-backup.
//!
//! Writers hold only the public [`Recipients`]: the sidecar needs no secret. Readers (restores,
//! `wal-fetch`, `verify`, drills) hold [`Identities`], loaded from age identity files (several
//! for key rotation; each file may hold several keys). Only X25519 keys (`age1…`,
//! `AGE-SECRET-KEY-1…`) are accepted: no passphrases, no plugins, no SSH keys.
//!
//! A WAL object carries one extra header stanza, `gc-backup-wal <raw size> <sha256>`, which age
//! identities ignore: a repeated `wal-push` compares it with the segment it was given without
//! needing a key. It is covered by the header's MAC, and tells no more than pgBackRest's WAL file
//! names (which carry the segment's SHA-1): it confirms a guess of the whole segment.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use age::stream::{StreamReader, StreamWriter};
use age_core::format::{FileKey, Stanza};

/// What every age file begins with.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";
/// The tag of the stanza that describes a WAL object's content.
const WAL_STANZA: &str = "gc-backup-wal";
/// How much of a stored WAL object to read to find its header, whatever the recipients.
pub const WAL_HEADER_PROBE: u64 = 16 * 1024;

/// Why something could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A setting is wrong: not a recipient, not an identity file. Exit 2.
    #[error("{0}")]
    Config(String),
    /// An encrypted object met a reader without identities. Exit 2: a setting is missing.
    #[error(
        "{0} is encrypted, and no age identity was given: set [encryption] identity-file or \
         GC_BACKUP_AGE_IDENTITY_FILE"
    )]
    NoIdentity(String),
    /// Wrong identity, or damaged, truncated or tampered with. Exit 3.
    #[error("{what} cannot be decrypted: {detail}")]
    Unreadable { what: String, detail: String },
}

impl SealError {
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_) | Self::NoIdentity(_))
    }
}

/// What one process seals with and opens with. Either may be absent: the sidecar has only
/// recipients, a restore Job only identities.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    pub recipients: Option<Recipients>,
    pub identities: Option<Identities>,
}

impl Keys {
    /// The identities, or the one-line configuration error that `what` needs them.
    pub fn identities_for(&self, what: &str) -> Result<&Identities, SealError> {
        self.identities
            .as_ref()
            .ok_or_else(|| SealError::NoIdentity(what.to_string()))
    }
}

/// The public keys every object is encrypted to.
#[derive(Clone)]
pub struct Recipients {
    keys: Arc<Vec<age::x25519::Recipient>>,
    text: Vec<String>,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.text).finish()
    }
}

impl Recipients {
    /// Parses `age1…` public keys; `None` for an empty list.
    pub fn parse(list: &[String]) -> Result<Option<Self>, SealError> {
        let text: Vec<String> = list
            .iter()
            .map(|entry| entry.trim().to_string())
            .filter(|entry| !entry.is_empty())
            .collect();
        if text.is_empty() {
            return Ok(None);
        }
        let keys = text
            .iter()
            .map(|entry| {
                age::x25519::Recipient::from_str(entry).map_err(|e| {
                    SealError::Config(format!(
                        "encryption recipient {entry:?} is not an age public key (age1…): {e}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Self {
            keys: Arc::new(keys),
            text,
        }))
    }

    /// The keys as configured, for the manifest and the store's marker (public).
    pub fn names(&self) -> &[String] {
        &self.text
    }

    /// Encrypts what is written into the returned writer to `out`; `finish` it to end the
    /// file (an unfinished one fails to decrypt, so a truncated upload never opens).
    pub fn seal<W: Write>(&self, out: W) -> std::io::Result<StreamWriter<W>> {
        self.encryptor(None)?.wrap_output(out)
    }

    /// Encrypts a stored WAL object written into the returned writer, with the stanza that lets
    /// a later push compare content without a key (`header`: what the object holds).
    pub fn seal_wal<W: Write>(
        &self,
        out: W,
        header: &crate::wal::object::WalHeader,
    ) -> std::io::Result<StreamWriter<W>> {
        let describe = WalStanza {
            raw_size: header.raw_size,
            sha256: header.sha256_hex(),
        };
        self.encryptor(Some(&describe))?.wrap_output(out)
    }

    fn encryptor(&self, describe: Option<&WalStanza>) -> std::io::Result<age::Encryptor> {
        let mut recipients: Vec<&dyn age::Recipient> = self
            .keys
            .iter()
            .map(|key| key as &dyn age::Recipient)
            .collect();
        if let Some(describe) = describe {
            recipients.push(describe);
        }
        age::Encryptor::with_recipients(recipients.into_iter())
            .map_err(|e| std::io::Error::other(format!("age: {e}")))
    }
}

/// Not a recipient: a stanza that describes the content, holding no key.
struct WalStanza {
    raw_size: u64,
    sha256: String,
}

impl age::Recipient for WalStanza {
    fn wrap_file_key(
        &self,
        _file_key: &FileKey,
    ) -> Result<(Vec<Stanza>, HashSet<String>), age::EncryptError> {
        let stanza = Stanza {
            tag: WAL_STANZA.to_string(),
            args: vec![self.raw_size.to_string(), self.sha256.clone()],
            body: Vec::new(),
        };
        Ok((vec![stanza], HashSet::new()))
    }
}

/// What the `gc-backup-wal` stanza of a sealed WAL object says; `None` when `head` (the first
/// bytes of the object) is not a sealed WAL object's header.
pub fn wal_description(head: &[u8]) -> Option<(u64, String)> {
    let text = head.strip_prefix(AGE_MAGIC)?;
    let end = memchr::memmem::find(text, b"\n---")?;
    let header = std::str::from_utf8(&text[..end]).ok()?;
    header.lines().find_map(|line| {
        let mut words = line.strip_prefix("-> ")?.split(' ');
        if words.next()? != WAL_STANZA {
            return None;
        }
        let size = words.next()?.parse().ok()?;
        let sha256 = words.next()?;
        (sha256.len() == 64 && words.next().is_none()).then(|| (size, sha256.to_string()))
    })
}

/// Whether a stored object's first bytes are an age file's.
pub fn is_sealed(head: &[u8]) -> bool {
    head.starts_with(AGE_MAGIC)
}

/// The secret keys that open what was sealed.
#[derive(Clone)]
pub struct Identities {
    keys: Arc<Vec<age::x25519::Identity>>,
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Identities {
    /// Reads every key of every file; `None` when no file is given. A file that cannot be read
    /// or holds something other than age secret keys is a configuration error that names the
    /// file and line, never the line's content.
    pub fn load(files: &[PathBuf]) -> Result<Option<Self>, SealError> {
        if files.is_empty() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        for file in files {
            keys.extend(read_identity_file(file)?);
        }
        Ok(Some(Self {
            keys: Arc::new(keys),
            files: files.to_vec(),
        }))
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Decrypts `input`, an age file. `what` names it in errors.
    pub fn open<R: Read>(&self, input: R, what: &str) -> Result<StreamReader<R>, SealError> {
        let unreadable = |detail: String| SealError::Unreadable {
            what: what.to_string(),
            detail,
        };
        let decryptor = age::Decryptor::new(input).map_err(|e| unreadable(describe(&e)))?;
        decryptor
            .decrypt(self.keys.iter().map(|key| key as &dyn age::Identity))
            .map_err(|e| unreadable(describe(&e)))
    }

    /// Decrypts a whole object held in memory (a WAL file).
    pub fn open_all(&self, sealed: &[u8], what: &str) -> Result<Vec<u8>, SealError> {
        let mut reader = self.open(sealed, what)?;
        let mut clear = Vec::with_capacity(sealed.len());
        reader
            .read_to_end(&mut clear)
            .map_err(|e| SealError::Unreadable {
                what: what.to_string(),
                detail: format!("{e} (damaged, truncated or tampered with)"),
            })?;
        Ok(clear)
    }
}

fn describe(error: &age::DecryptError) -> String {
    match error {
        age::DecryptError::NoMatchingKeys => {
            "none of the given age identities is one of its recipients (wrong identity file?)"
                .to_string()
        }
        age::DecryptError::InvalidHeader | age::DecryptError::UnknownFormat => {
            "not an age file, or its header is damaged".to_string()
        }
        age::DecryptError::InvalidMac | age::DecryptError::DecryptionFailed => {
            "damaged or tampered with".to_string()
        }
        other => other.to_string(),
    }
}

fn read_identity_file(file: &Path) -> Result<Vec<age::x25519::Identity>, SealError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        SealError::Config(format!(
            "cannot read the age identity file {}: {e}",
            file.display()
        ))
    })?;
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = age::x25519::Identity::from_str(line).map_err(|_| {
            SealError::Config(format!(
                "{} is not an age identity file: line {} is not an age secret key \
                 (AGE-SECRET-KEY-1…)",
                file.display(),
                number + 1
            ))
        })?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(SealError::Config(format!(
            "{} is not an age identity file: it holds no age secret key",
            file.display()
        )));
    }
    Ok(keys)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;

    /// A fresh key pair: the identity file's text and the recipient.
    pub(crate) fn key_pair() -> (String, String) {
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public().to_string();
        (identity.to_string().expose_secret().to_string(), recipient)
    }

    pub(crate) fn identities(dir: &Path, secret: &str) -> Identities {
        let file = dir.join("key.txt");
        std::fs::write(&file, format!("# test key\n{secret}\n")).unwrap();
        Identities::load(&[file]).unwrap().unwrap()
    }

    #[test]
    fn sealed_data_opens_with_its_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = key_pair();
        let (other_secret, _) = key_pair();
        let recipients = Recipients::parse(&[public]).unwrap().unwrap();
        let mut sealed = Vec::new();
        let mut writer = recipients.seal(&mut sealed).unwrap();
        writer.write_all(b"rows of GC Storage").unwrap();
        writer.finish().unwrap();
        assert!(is_sealed(&sealed));
        assert!(memchr::memmem::find(&sealed, b"GC Storage").is_none());

        let right = identities(dir.path(), &secret);
        assert_eq!(right.open_all(&sealed, "x").unwrap(), b"rows of GC Storage");
        let wrong = identities(dir.path(), &other_secret);
        let error = wrong.open_all(&sealed, "x").unwrap_err().to_string();
        assert!(error.contains("wrong identity"), "{error}");
        // Truncated: the last chunk is missing.
        assert!(right.open_all(&sealed[..sealed.len() - 1], "x").is_err());
        let mut flipped = sealed.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 1;
        assert!(right.open_all(&flipped, "x").is_err());
    }

    #[test]
    fn any_of_several_identity_files_opens_what_was_sealed_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let (old_secret, old_public) = key_pair();
        let (new_secret, new_public) = key_pair();
        let old_file = dir.path().join("old.txt");
        let new_file = dir.path().join("new.txt");
        std::fs::write(&old_file, format!("{old_secret}\n")).unwrap();
        std::fs::write(&new_file, format!("# rotated 2026-12\n{new_secret}\n")).unwrap();
        let both = Identities::load(&[old_file, new_file]).unwrap().unwrap();
        for public in [old_public, new_public] {
            let recipients = Recipients::parse(&[public]).unwrap().unwrap();
            let mut sealed = Vec::new();
            let mut writer = recipients.seal(&mut sealed).unwrap();
            writer.write_all(b"backup").unwrap();
            writer.finish().unwrap();
            assert_eq!(both.open_all(&sealed, "x").unwrap(), b"backup");
        }
    }

    #[test]
    fn a_sealed_wal_object_says_what_it_holds_without_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = key_pair();
        let (_, second) = key_pair();
        let recipients = Recipients::parse(&[public, second]).unwrap().unwrap();
        let sha = "ab".repeat(32);
        let header = crate::wal::object::WalHeader::from_hex(16, &sha).unwrap();
        let mut sealed = Vec::new();
        let mut writer = recipients.seal_wal(&mut sealed, &header).unwrap();
        writer.write_all(b"segment").unwrap();
        writer.finish().unwrap();
        assert_eq!(wal_description(&sealed), Some((16, sha.clone())));
        assert_eq!(wal_description(b"\x5b\x2a\x4d\x18 clear"), None);
        let opened = identities(dir.path(), &secret)
            .open_all(&sealed, "wal")
            .unwrap();
        assert_eq!(opened, b"segment");
    }

    #[test]
    fn bad_keys_are_configuration_errors_that_do_not_echo_secrets() {
        let error = Recipients::parse(&["age1nope".into()]).unwrap_err();
        assert!(error.is_config(), "{error}");
        assert!(Recipients::parse(&[" ".into()]).unwrap().is_none());

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-key");
        std::fs::write(&file, "AGE-SECRET-KEY-1SECRETPART\n").unwrap();
        let error = Identities::load(&[file]).unwrap_err();
        assert!(error.is_config());
        let text = error.to_string();
        assert!(
            text.contains("line 1") && !text.contains("SECRETPART"),
            "{text}"
        );
        let missing = Identities::load(&[dir.path().join("absent")]).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }
}
