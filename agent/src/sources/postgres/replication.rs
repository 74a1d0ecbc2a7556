//! PostgreSQL's streaming replication protocol, the part a WAL receiver needs: a session in
//! physical walsender mode (`replication=true` in the startup packet, which tokio-postgres
//! cannot send), its simple-query commands (IDENTIFY_SYSTEM, TIMELINE_HISTORY), and
//! START_REPLICATION's copy-both stream of WAL data and keepalives, answered with standby
//! status updates.
//!
//! The framing is ours (five bytes: tag, length); the bodies of ordinary messages and the
//! authentication exchanges (SCRAM-SHA-256, MD5, password) are postgres-protocol's, the crate
//! tokio-postgres is built on. TLS follows the same libpq settings as every other session of
//! the agent (`tls.rs`); a Unix socket never uses it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use pitr::Lsn;
use postgres_protocol::authentication::sasl::{self, ScramSha256};
use postgres_protocol::message::backend::{self, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::tls::SslMode;
use super::{SourceError, describe};
use crate::config::PostgresConfig;

/// A message longer than this is refused: the largest a walsender sends is one XLogData of
/// its send buffer (128 KiB), a history file, or an error.
const MAX_MESSAGE: usize = 64 << 20;
/// Seconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET: u64 = 946_684_800;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The byte a server answers an SSLRequest with when it will speak TLS.
const TLS_ACCEPTED: u8 = b'S';
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One replication session.
pub struct Replication {
    io: Box<dyn Io>,
    read: BytesMut,
    write: BytesMut,
    server: String,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// IDENTIFY_SYSTEM's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub system_id: u64,
    pub timeline: u32,
    /// The current WAL flush location.
    pub flushed: Lsn,
}

/// What the stream brings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Streamed {
    /// WAL starting at `start`; `server_end` is the end of WAL on the server.
    Wal {
        start: Lsn,
        server_end: Lsn,
        data: Bytes,
    },
    /// A keepalive; `reply` asks for a status update now.
    Keepalive { server_end: Lsn, reply: bool },
    /// The timeline being streamed ended (it was an old one, or the server was promoted):
    /// [`Replication::end_of_timeline`] says what comes next.
    TimelineEnd,
}

/// A row of a command's result, text columns.
pub type Row = Vec<Option<String>>;

impl Replication {
    /// Opens a physical replication session to the server `config` names.
    pub async fn connect(config: &PostgresConfig) -> Result<Self, SourceError> {
        let server = describe(config);
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            SourceError::Failed(format!(
                "cannot open a replication session to PostgreSQL at {server}: {what}: {e}"
            ))
        };
        let user = super::effective_user(config);
        let io: Box<dyn Io> = match config.host.as_deref() {
            Some(dir) if dir.starts_with('/') => Box::new(
                unix(dir, config.port)
                    .await
                    .map_err(|e| failed("connecting to its socket", &e))?,
            ),
            None if Path::new("/var/run/postgresql").is_dir() => Box::new(
                unix("/var/run/postgresql", config.port)
                    .await
                    .map_err(|e| failed("connecting to its socket", &e))?,
            ),
            host => {
                let host = host.unwrap_or("localhost");
                let address = (host, config.port.unwrap_or(5432));
                let tcp =
                    tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
                        .await
                        .map_err(|e| failed("connecting", &e))?
                        .map_err(|e| failed("connecting", &e))?;
                let _ = tcp.set_nodelay(true);
                negotiate_tls(tcp, host, config, &server).await?
            }
        };
        let mut session = Self {
            io,
            read: BytesMut::with_capacity(256 << 10),
            write: BytesMut::with_capacity(1 << 10),
            server,
        };
        session.start_up(&user, config).await?;
        Ok(session)
    }

    async fn start_up(&mut self, user: &str, config: &PostgresConfig) -> Result<(), SourceError> {
        let params = [
            ("user", user),
            ("replication", "true"),
            ("application_name", "gc-backup"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.write)
            .map_err(|e| self.broken(&e))?;
        self.flush().await?;
        let password = config
            .password
            .as_ref()
            .map(|p| p.expose().as_bytes().to_vec());
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.message().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let password = self.password(password.as_deref())?;
                    frontend::password_message(password, &mut self.write)
                        .map_err(|e| self.broken(&e))?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let password = self.password(password.as_deref())?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        password,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)
                        .map_err(|e| self.broken(&e))?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let password = self.password(password.as_deref())?;
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Some(mechanism) = mechanisms.next().map_err(|e| self.broken(&e))? {
                        offered |= mechanism == sasl::SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(SourceError::Config(format!(
                            "PostgreSQL at {} asks for a SASL mechanism other than \
                             SCRAM-SHA-256",
                            self.server
                        )));
                    }
                    // No channel binding: the TLS settings check the server already.
                    let exchange = ScramSha256::new(password, sasl::ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        exchange.message(),
                        &mut self.write,
                    )
                    .map_err(|e| self.broken(&e))?;
                    scram = Some(exchange);
                    self.flush().await?;
                }
                Message::AuthenticationSaslContinue(body) => {
                    let exchange = scram.as_mut().ok_or_else(|| self.unexpected("SASL"))?;
                    exchange
                        .update(body.data())
                        .map_err(|e| self.refused(&e.to_string()))?;
                    frontend::sasl_response(exchange.message(), &mut self.write)
                        .map_err(|e| self.broken(&e))?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let exchange = scram.as_mut().ok_or_else(|| self.unexpected("SASL"))?;
                    exchange
                        .finish(body.data())
                        .map_err(|e| self.refused(&e.to_string()))?;
                }
                Message::ErrorResponse(body) => {
                    let (code, message) = error_fields(&body);
                    let text = format!(
                        "PostgreSQL at {} refused the replication session: {message}",
                        self.server
                    );
                    // 28xxx: authentication, or no replication entry in pg_hba.conf;
                    // 42501: the role lacks REPLICATION.
                    return Err(if code.starts_with("28") || code == "42501" {
                        SourceError::Config(text)
                    } else {
                        SourceError::Failed(text)
                    });
                }
                Message::ReadyForQuery(_) => return Ok(()),
                // ParameterStatus, BackendKeyData, notices.
                _ => {}
            }
        }
    }

    fn password<'a>(&self, password: Option<&'a [u8]>) -> Result<&'a [u8], SourceError> {
        password.ok_or_else(|| {
            SourceError::Config(format!(
                "PostgreSQL at {} asks for a password for the replication session: set \
                 PGPASSWORD (or [postgres] password)",
                self.server
            ))
        })
    }

    /// Runs one replication command (simple query) and returns its rows.
    pub async fn command(&mut self, sql: &str) -> Result<Vec<Row>, SourceError> {
        frontend::query(sql, &mut self.write).map_err(|e| self.broken(&e))?;
        self.flush().await?;
        self.rows(sql).await
    }

    /// Reads a command's rows up to ReadyForQuery.
    async fn rows(&mut self, sql: &str) -> Result<Vec<Row>, SourceError> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.message().await? {
                Message::DataRow(row) => {
                    let buffer = row.buffer();
                    let mut values = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(range) = ranges.next().map_err(|e| self.broken(&e))? {
                        values.push(range.map(|r| {
                            String::from_utf8_lossy(buffer.get(r).unwrap_or_default()).into_owned()
                        }));
                    }
                    rows.push(values);
                }
                Message::ErrorResponse(body) => {
                    error.get_or_insert(error_fields(&body).1);
                }
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(message) => Err(SourceError::Failed(format!(
                "{} on PostgreSQL at {} failed: {message}",
                command_name(sql),
                self.server
            ))),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<Identity, SourceError> {
        let rows = self.command("IDENTIFY_SYSTEM").await?;
        let field = |n: usize| {
            rows.first()
                .and_then(|row| row.get(n).cloned().flatten())
                .unwrap_or_default()
        };
        let system_id = field(0).parse().ok();
        let timeline = field(1).parse().ok();
        let flushed = field(2).parse().ok();
        match (system_id, timeline, flushed) {
            (Some(system_id), Some(timeline), Some(flushed)) => Ok(Identity {
                system_id,
                timeline,
                flushed,
            }),
            _ => Err(self.unexpected("IDENTIFY_SYSTEM's answer")),
        }
    }

    /// TIMELINE_HISTORY: the history file of `timeline` (its name and content).
    pub async fn timeline_history(
        &mut self,
        timeline: u32,
    ) -> Result<(String, Vec<u8>), SourceError> {
        let rows = self
            .command(&format!("TIMELINE_HISTORY {timeline}"))
            .await?;
        match rows.first().map(|row| (row.first(), row.get(1))) {
            Some((Some(Some(name)), Some(Some(content)))) => {
                Ok((name.clone(), content.clone().into_bytes()))
            }
            _ => Err(self.unexpected("TIMELINE_HISTORY's answer")),
        }
    }

    /// START_REPLICATION of `timeline` from `start` through `slot`; then [`Self::next`].
    pub async fn start(
        &mut self,
        slot: &str,
        start: Lsn,
        timeline: u32,
    ) -> Result<(), SourceError> {
        let sql = format!(
            "START_REPLICATION SLOT {} PHYSICAL {start} TIMELINE {timeline}",
            quote_ident(slot)
        );
        frontend::query(&sql, &mut self.write).map_err(|e| self.broken(&e))?;
        self.flush().await?;
        let mut error = None;
        loop {
            let (tag, body) = self.frame().await?;
            if tag == COPY_BOTH_RESPONSE_TAG {
                return Ok(());
            }
            match self.parse(tag, body)? {
                Message::ErrorResponse(body) => {
                    error.get_or_insert(error_fields(&body).1);
                }
                Message::ReadyForQuery(_) => {
                    return Err(SourceError::Failed(format!(
                        "START_REPLICATION on PostgreSQL at {} failed: {}",
                        self.server,
                        error.unwrap_or_else(|| "no stream".into())
                    )));
                }
                _ => {}
            }
        }
    }

    /// The next message of the stream.
    pub async fn next(&mut self) -> Result<Streamed, SourceError> {
        loop {
            let (tag, mut body) = self.frame().await?;
            match tag {
                backend::COPY_DATA_TAG => {
                    if body.is_empty() {
                        return Err(self.unexpected("an empty CopyData"));
                    }
                    match body.get_u8() {
                        b'w' if body.len() >= 24 => {
                            let start = Lsn(body.get_u64());
                            let server_end = Lsn(body.get_u64());
                            let _sent_at = body.get_i64();
                            return Ok(Streamed::Wal {
                                start,
                                server_end,
                                data: body.freeze(),
                            });
                        }
                        b'k' if body.len() >= 17 => {
                            let server_end = Lsn(body.get_u64());
                            let _sent_at = body.get_i64();
                            let reply = body.get_u8() != 0;
                            return Ok(Streamed::Keepalive { server_end, reply });
                        }
                        _ => return Err(self.unexpected("a replication message")),
                    }
                }
                // Nothing awaited here: `next` may be one branch of a select.
                backend::COPY_DONE_TAG => return Ok(Streamed::TimelineEnd),
                _ => match self.parse(tag, body)? {
                    Message::ErrorResponse(body) => {
                        return Err(SourceError::Failed(format!(
                            "PostgreSQL at {} ended the WAL stream: {}",
                            self.server,
                            error_fields(&body).1
                        )));
                    }
                    // Notices and parameter changes between data.
                    _ => continue,
                },
            }
        }
    }

    /// After [`Streamed::TimelineEnd`]: our CopyDone, then the server's result set, the next
    /// timeline and where WAL goes on on it.
    pub async fn end_of_timeline(&mut self) -> Result<(u32, Lsn), SourceError> {
        frontend::copy_done(&mut self.write);
        self.flush().await?;
        let rows = self.rows("START_REPLICATION").await?;
        let next = rows.first().and_then(|row| {
            let timeline = row.first()?.as_deref()?.parse().ok()?;
            let start = row.get(1)?.as_deref()?.parse().ok()?;
            Some((timeline, start))
        });
        next.ok_or_else(|| self.unexpected("the end of a timeline without the next one"))
    }

    /// A standby status update: received up to `written`, durably stored up to `flushed`.
    pub async fn status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        reply: bool,
    ) -> Result<(), SourceError> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(written.0);
        body.put_u64(flushed.0);
        // Applied: nothing is replayed here; what is stored is what counts.
        body.put_u64(flushed.0);
        body.put_i64(pg_now());
        body.put_u8(u8::from(reply));
        frontend::CopyData::new(body.freeze())
            .map_err(|e| self.broken(&e))?
            .write(&mut self.write);
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        let result = async {
            self.io.write_all(&self.write).await?;
            self.io.flush().await
        }
        .await;
        self.write.clear();
        result.map_err(|e| self.broken(&e))
    }

    /// One framed message: its tag and body.
    async fn frame(&mut self) -> Result<(u8, BytesMut), SourceError> {
        loop {
            if self.read.len() >= 5 {
                let length =
                    u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]);
                let total = usize::try_from(length)
                    .unwrap_or(usize::MAX)
                    .saturating_add(1);
                if !(5..=MAX_MESSAGE).contains(&total) {
                    return Err(self.unexpected("a message of an impossible length"));
                }
                if self.read.len() >= total {
                    let mut frame = self.read.split_to(total);
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok((tag, frame));
                }
                self.read.reserve(total - self.read.len());
            } else {
                self.read.reserve(4096);
            }
            let n = self
                .io
                .read_buf(&mut self.read)
                .await
                .map_err(|e| self.broken(&e))?;
            if n == 0 {
                return Err(SourceError::Failed(format!(
                    "PostgreSQL at {} closed the replication session",
                    self.server
                )));
            }
        }
    }

    async fn message(&mut self) -> Result<Message, SourceError> {
        let (tag, body) = self.frame().await?;
        self.parse(tag, body)
    }

    /// Hands one frame to postgres-protocol (which wants it whole, tag and length too).
    fn parse(&self, tag: u8, body: BytesMut) -> Result<Message, SourceError> {
        let mut frame = BytesMut::with_capacity(body.len() + 5);
        frame.put_u8(tag);
        frame.put_u32(u32::try_from(body.len() + 4).unwrap_or(u32::MAX));
        frame.extend_from_slice(&body);
        match Message::parse(&mut frame) {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(self.unexpected("a truncated message")),
            Err(e) => Err(self.broken(&e)),
        }
    }

    fn broken(&self, error: &dyn std::fmt::Display) -> SourceError {
        SourceError::Failed(format!(
            "the replication session to PostgreSQL at {} broke: {error}",
            self.server
        ))
    }

    fn refused(&self, error: &str) -> SourceError {
        SourceError::Config(format!(
            "PostgreSQL at {} refused the replication session's password: {error}",
            self.server
        ))
    }

    fn unexpected(&self, what: &str) -> SourceError {
        SourceError::Failed(format!(
            "PostgreSQL at {} sent {what}, which this gc-backup does not understand",
            self.server
        ))
    }
}

async fn unix(dir: &str, port: Option<u16>) -> std::io::Result<tokio::net::UnixStream> {
    let path = Path::new(dir).join(format!(".s.PGSQL.{}", port.unwrap_or(5432)));
    tokio::net::UnixStream::connect(path).await
}

/// libpq's SSLRequest, then TLS when the server accepts and the settings want it.
async fn negotiate_tls(
    mut tcp: tokio::net::TcpStream,
    host: &str,
    config: &PostgresConfig,
    server: &str,
) -> Result<Box<dyn Io>, SourceError> {
    let mode = config.tls.mode;
    if mode == SslMode::Disable {
        return Ok(Box::new(tcp));
    }
    let failed = |e: &dyn std::fmt::Display| {
        SourceError::Failed(format!(
            "cannot open a replication session to PostgreSQL at {server}: {e}"
        ))
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(|e| failed(&e))?;
    let answer = tcp.read_u8().await.map_err(|e| failed(&e))?;
    if answer != TLS_ACCEPTED {
        if matches!(mode, SslMode::Allow | SslMode::Prefer) {
            return Ok(Box::new(tcp));
        }
        return Err(SourceError::Config(format!(
            "cannot connect to PostgreSQL at {server}: the server does not offer TLS and \
             sslmode={} requires it",
            mode.as_str()
        )));
    }
    let client = config.tls.client_config().map_err(|detail| {
        SourceError::Config(format!(
            "cannot connect to PostgreSQL at {server}: {detail}"
        ))
    })?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| SourceError::Config(format!("{host} is not a host name for TLS: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(name, tcp)
        .await
        .map_err(|e| match super::tls::explain(&e, mode) {
            Some(hint) => {
                SourceError::Config(format!("cannot connect to PostgreSQL at {server}: {hint}"))
            }
            None => failed(&e),
        })?;
    Ok(Box::new(tls))
}

/// (SQLSTATE, message) of an ErrorResponse.
fn error_fields(body: &backend::ErrorResponseBody) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, message)
}

/// The command word of `sql`, for messages.
fn command_name(sql: &str) -> &str {
    sql.split_whitespace().next().unwrap_or(sql)
}

/// A slot name as a replication command takes it: slot names are `[a-z0-9_]` (the
/// configuration checks so), quoted all the same.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Now, in PostgreSQL's timestamps (microseconds since 2000-01-01).
fn pg_now() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let micros = since_unix
        .as_micros()
        .saturating_sub(u128::from(PG_EPOCH_OFFSET) * 1_000_000);
    i64::try_from(micros).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_times_are_postgres_epoch_microseconds() {
        // 2026 is ~26 years after PostgreSQL's epoch.
        let years = pg_now() / 1_000_000 / 86_400 / 365;
        assert!((25..40).contains(&years), "{years}");
    }

    #[test]
    fn slot_names_are_quoted() {
        assert_eq!(quote_ident("gc_backup"), "\"gc_backup\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
