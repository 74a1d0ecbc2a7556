//! Redis as a source: an RDB snapshot taken the way a replica takes one, over the replication
//! protocol, so that nothing is written to the server's disk or ours.
//!
//! The session: `AUTH` (when a password is set), `REPLCONF capa eof` (the server may then send
//! a diskless snapshot framed by a 40-byte end mark instead of a length), `REPLCONF rdb-only 1`
//! (Redis 7: send the snapshot only, no command stream after it; older servers refuse it and
//! are simply read up to the end of the snapshot), then `SYNC`. `rediss://` speaks TLS
//! (rustls), trusting the system's roots plus an optional CA file, with an optional client
//! certificate for servers that require one (Redis' default `tls-auth-clients yes`). The payload is checked while it
//! streams: the `REDIS` magic and format version first, and the CRC-64 trailer at the end. A
//! mismatch or a short payload is an error pushed into the stream, so the upload is aborted.

use std::fmt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::SourceError;
use crate::config::{Secret, TlsFiles};

/// Bytes read from the server at a time.
const READ_CHUNK: usize = 256 * 1024;
/// Length of the end mark of a diskless (`$EOF:`) payload.
const EOF_MARK_LEN: usize = 40;

const CRC64: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_REDIS);

/// Where Redis is and who we are to it. The password never appears in `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisEndpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `rediss://`: TLS, with these files.
    pub tls: Option<TlsFiles>,
}

impl fmt::Display for RedisEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match self.port {
            // A Unix socket (a server this process started): the host is its path.
            0 => write!(f, "unix:{}", self.host),
            port => write!(f, "{scheme}://{}:{port}", self.host),
        }
    }
}

impl fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisEndpoint({self})")
    }
}

impl RedisEndpoint {
    /// Parses `redis[s]://[[user]:password@]host[:port][/db]`; `rediss://` is TLS.
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let bad = |why: &str| SourceError::Config(format!("redis URL {}: {why}", redact(url)));
        let (rest, tls) = if let Some(rest) = url.strip_prefix("redis://") {
            (rest, None)
        } else if let Some(rest) = url.strip_prefix("rediss://") {
            (rest, Some(TlsFiles::default()))
        } else {
            return Err(bad("expected redis://host:port or rediss://host:port"));
        };
        let rest = rest.split(['/', '?']).next().unwrap_or_default();
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, rest),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, password) = match info.split_once(':') {
                    Some((user, password)) => (user, Some(password)),
                    None => (info, None),
                };
                let decode = |text: &str| percent_decode(text).ok_or_else(|| bad("bad %-escape"));
                let user = Some(decode(user)?).filter(|u| !u.is_empty());
                let password = password.map(decode).transpose()?.map(Secret::new);
                (user, password)
            }
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port = port.parse().map_err(|_| bad("the port is not a number"))?;
                (host, port)
            }
            _ => (hostport, 6379),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(RedisEndpoint {
            host: host.to_string(),
            port,
            username,
            password,
            tls,
        })
    }
}

/// Anything a session can run over: plain TCP or TLS.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// A TLS client configuration: the system's roots, the CA file, the client certificate.
fn tls_config(files: &TlsFiles) -> Result<rustls::ClientConfig, SourceError> {
    let config_error = |what: &str, path: &std::path::Path, e: &dyn fmt::Display| {
        SourceError::Config(format!("{what} {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &files.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| config_error("cannot read CA file", path, &e))?;
        for cert in certs {
            let cert = cert.map_err(|e| config_error("bad CA file", path, &e))?;
            roots
                .add(cert)
                .map_err(|e| config_error("bad CA certificate in", path, &e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::Failed(format!("TLS set-up: {e}")))?
        .with_root_certificates(roots);
    match (&files.cert_file, &files.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let certs = CertificateDer::pem_file_iter(cert_path)
                .map_err(|e| config_error("cannot read certificate", cert_path, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| config_error("bad certificate", cert_path, &e))?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| config_error("cannot read key", key_path, &e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| config_error("certificate and key do not match:", cert_path, &e))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(SourceError::Config(
            "a Redis client certificate needs both cert-file and key-file".into(),
        )),
    }
}

/// The URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The keys of every database in `INFO keyspace`'s lines (`db0:keys=3,expires=0,…`).
fn keyspace_keys(info: &str) -> u64 {
    info.lines()
        .filter(|line| line.starts_with("db"))
        .filter_map(|line| {
            let (_, fields) = line.split_once(':')?;
            fields
                .split(',')
                .find_map(|field| field.strip_prefix("keys="))?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A session with the server.
pub struct Session {
    stream: BufStream<Box<dyn Connection>>,
    endpoint: RedisEndpoint,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Session({})", self.endpoint)
    }
}

/// One reply line of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Status(String),
    Error(String),
    Bulk(Option<Vec<u8>>),
    Integer(i64),
}

impl Session {
    /// Connects and authenticates. A wrong password or user is a [`SourceError::Config`].
    pub async fn open(endpoint: &RedisEndpoint) -> Result<Self, SourceError> {
        let address = (endpoint.host.as_str(), endpoint.port);
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            TcpStream::connect(address),
        )
        .await
        .map_err(|_| SourceError::Failed(format!("{endpoint} did not answer within 10 s")))?
        .map_err(|e| SourceError::Failed(format!("cannot connect to {endpoint}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let connection: Box<dyn Connection> = match &endpoint.tls {
            None => Box::new(tcp),
            Some(files) => {
                let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(files)?));
                let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| {
                    SourceError::Config(format!("{}: not a TLS server name: {e}", endpoint.host))
                })?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| SourceError::Failed(format!("TLS with {endpoint} failed: {e}")))?;
                Box::new(tls)
            }
        };
        let mut session = Session {
            stream: BufStream::with_capacity(READ_CHUNK, 64 * 1024, connection),
            endpoint: endpoint.clone(),
        };
        if let Some(password) = &endpoint.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &endpoint.username {
                args.push(user.as_bytes());
            }
            args.push(password.expose().as_bytes());
            match session.call(&args).await? {
                Reply::Status(_) => {}
                Reply::Error(message) => {
                    return Err(SourceError::Config(format!(
                        "{endpoint} refused the credentials: {message}"
                    )));
                }
                other => return Err(session.unexpected("AUTH", &other)),
            }
        }
        Ok(session)
    }

    /// Connects to the Unix socket of a server this process started (a restore drill's),
    /// which has no password.
    pub async fn open_socket(path: &std::path::Path) -> Result<Self, SourceError> {
        let socket = tokio::net::UnixStream::connect(path).await.map_err(|e| {
            SourceError::Failed(format!("cannot connect to unix:{}: {e}", path.display()))
        })?;
        Ok(Session {
            stream: BufStream::with_capacity(READ_CHUNK, 64 * 1024, Box::new(socket)),
            endpoint: RedisEndpoint {
                host: path.display().to_string(),
                port: 0,
                username: None,
                password: None,
                tls: None,
            },
        })
    }

    /// The keys of every database, once the server has loaded its data (`None` while it is
    /// still loading): `DBSIZE` answers only then, `INFO keyspace` counts all databases.
    pub async fn loaded_keys(&mut self) -> Result<Option<u64>, SourceError> {
        match self.call(&[b"DBSIZE"]).await? {
            Reply::Integer(_) => {}
            Reply::Error(message) if message.starts_with("LOADING") => return Ok(None),
            other => return Err(self.unexpected("DBSIZE", &other)),
        }
        match self.call(&[b"INFO", b"keyspace"]).await? {
            Reply::Bulk(Some(text)) => Ok(Some(keyspace_keys(&String::from_utf8_lossy(&text)))),
            other => Err(self.unexpected("INFO keyspace", &other)),
        }
    }

    /// `INFO server`'s `redis_version`.
    pub async fn server_version(&mut self) -> Result<String, SourceError> {
        match self.call(&[b"INFO", b"server"]).await? {
            Reply::Bulk(Some(text)) => Ok(String::from_utf8_lossy(&text)
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .unwrap_or("unknown")
                .trim()
                .to_string()),
            Reply::Error(message) if message.starts_with("NOAUTH") => {
                Err(SourceError::Config(format!(
                    "{} needs a password (in the URL or REDISCLI_AUTH)",
                    self.endpoint
                )))
            }
            other => Err(self.unexpected("INFO", &other)),
        }
    }

    /// Asks for a snapshot and returns a reader task streaming it into `chunks`.
    pub async fn sync(mut self) -> Result<Snapshot, SourceError> {
        // Both are optional: a server that does not know them sends a length-framed snapshot
        // and the command stream after it, which the reader stops before.
        for capability in [
            &[b"REPLCONF" as &[u8], b"capa", b"eof"][..],
            &[b"REPLCONF", b"rdb-only", b"1"],
        ] {
            match self.call(capability).await? {
                Reply::Status(_) | Reply::Error(_) => {}
                other => return Err(self.unexpected("REPLCONF", &other)),
            }
        }
        self.send(&[b"SYNC"]).await?;
        // The server sends newlines while it prepares the snapshot.
        let line = loop {
            let line = self.read_line().await?;
            if !line.is_empty() {
                break line;
            }
        };
        let framing = if let Some(error) = line.strip_prefix('-') {
            let kind = if error.starts_with("NOAUTH") || error.starts_with("NOPERM") {
                SourceError::Config
            } else {
                SourceError::Failed
            };
            return Err(kind(format!("{} refused SYNC: {error}", self.endpoint)));
        } else if let Some(mark) = line.strip_prefix("$EOF:") {
            let mark = mark.as_bytes().to_vec();
            if mark.len() != EOF_MARK_LEN {
                return Err(SourceError::Failed(format!(
                    "{} sent a bad end mark",
                    self.endpoint
                )));
            }
            Framing::EndMark(mark)
        } else if let Some(length) = line.strip_prefix('$').and_then(|n| n.parse::<u64>().ok()) {
            Framing::Length(length)
        } else {
            return Err(SourceError::Failed(format!(
                "{} answered SYNC with {line:?}",
                self.endpoint
            )));
        };
        Ok(Snapshot {
            session: self,
            framing,
        })
    }

    async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, SourceError> {
        self.send(args).await?;
        self.read_reply().await
    }

    async fn send(&mut self, args: &[&[u8]]) -> Result<(), SourceError> {
        let mut frame = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            frame.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            frame.extend_from_slice(arg);
            frame.extend_from_slice(b"\r\n");
        }
        let io =
            |e: std::io::Error| SourceError::Failed(format!("writing to {}: {e}", self.endpoint));
        self.stream.write_all(&frame).await.map_err(io)?;
        self.stream.flush().await.map_err(io)
    }

    async fn read_line(&mut self) -> Result<String, SourceError> {
        let endpoint = self.endpoint.to_string();
        let line = read_reply_line(&mut self.stream, &endpoint).await?;
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    async fn read_reply(&mut self) -> Result<Reply, SourceError> {
        let endpoint = self.endpoint.to_string();
        read_reply(&mut self.stream, &endpoint).await
    }

    fn unexpected(&self, command: &str, reply: &Reply) -> SourceError {
        SourceError::Failed(format!(
            "{} answered {command} with {reply:?}",
            self.endpoint
        ))
    }
}

/// Longest reply line read (a status, an error, a length): a server that sends more is not
/// one we can talk to, and must not make us buffer without end.
const MAX_REPLY_LINE: u64 = 64 * 1024;
/// Largest bulk reply read into memory (INFO's answers are a few KiB).
const MAX_BULK_REPLY: usize = 4 * 1024 * 1024;

/// One line of a reply, without its CRLF, at most [`MAX_REPLY_LINE`] bytes.
async fn read_reply_line(
    stream: &mut (impl AsyncBufRead + Unpin),
    endpoint: &str,
) -> Result<Vec<u8>, SourceError> {
    let mut line = Vec::new();
    let read = (&mut *stream)
        .take(MAX_REPLY_LINE)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| SourceError::Failed(format!("reading from {endpoint}: {e}")))?;
    if read == 0 {
        return Err(SourceError::Failed(format!(
            "{endpoint} closed the connection"
        )));
    }
    if !line.ends_with(b"\n") {
        return Err(SourceError::Failed(format!(
            "{endpoint} sent a reply line longer than {MAX_REPLY_LINE} bytes, or none ended"
        )));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(line)
}

/// One RESP2 reply. Total on any input: an unknown type byte or a bad length is an error, a
/// bulk string longer than [`MAX_BULK_REPLY`] is refused before anything is allocated.
async fn read_reply(
    stream: &mut (impl AsyncBufRead + Unpin),
    endpoint: &str,
) -> Result<Reply, SourceError> {
    let line = read_reply_line(stream, endpoint).await?;
    let Some((&kind, rest)) = line.split_first() else {
        return Err(SourceError::Failed(format!(
            "{endpoint} sent an empty reply"
        )));
    };
    let text = String::from_utf8_lossy(rest).into_owned();
    let bad = || SourceError::Failed(format!("{endpoint} sent a malformed reply {text:?}"));
    Ok(match kind {
        b'+' => Reply::Status(text),
        b'-' => Reply::Error(text),
        b':' => Reply::Integer(text.parse().map_err(|_| bad())?),
        b'$' => match text.parse::<i64>().map_err(|_| bad())? {
            -1 => Reply::Bulk(None),
            length => {
                let length = usize::try_from(length).map_err(|_| bad())?;
                if length > MAX_BULK_REPLY {
                    return Err(SourceError::Failed(format!(
                        "{endpoint} sent a {length}-byte reply; at most {MAX_BULK_REPLY} \
                         are read"
                    )));
                }
                let mut body = vec![0; length + 2];
                stream
                    .read_exact(&mut body)
                    .await
                    .map_err(|e| SourceError::Failed(format!("reading from {endpoint}: {e}")))?;
                if !body.ends_with(b"\r\n") {
                    return Err(bad());
                }
                body.truncate(length);
                Reply::Bulk(Some(body))
            }
        },
        _ => {
            return Err(SourceError::Failed(format!(
                "{endpoint} sent an unexpected reply {:?}",
                String::from_utf8_lossy(&line)
            )));
        }
    })
}

/// How the snapshot's end is known.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Framing {
    Length(u64),
    /// Diskless: the payload ends with these 40 bytes.
    EndMark(Vec<u8>),
}

/// A snapshot the server has started to send.
#[derive(Debug)]
pub struct Snapshot {
    session: Session,
    framing: Framing,
}

/// What the reader saw of the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdbFacts {
    pub bytes: u64,
    /// The RDB format version from the header.
    pub rdb_version: u32,
    /// The CRC-64 trailer, hex; `None` when the server writes none (`rdbchecksum no`).
    pub crc64: Option<String>,
    /// `$EOF:` framing (diskless) or a length.
    pub diskless: bool,
}

impl super::SnapshotSent for RdbFacts {
    fn bytes_sent(&self) -> u64 {
        self.bytes
    }
}

impl Snapshot {
    /// Reads the payload into `chunks`, checking it; on a problem an error is the last item
    /// sent, so the pipeline aborts instead of completing the object.
    pub async fn stream(
        self,
        chunks: mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<RdbFacts, SourceError> {
        let endpoint = self.session.endpoint.clone();
        let result = self.read_checked(&chunks).await;
        if let Err(error) = &result {
            let _ = chunks
                .send(Err(std::io::Error::other(error.to_string())))
                .await;
        }
        drop(chunks);
        result.map_err(|e| match e {
            SourceError::Failed(message) => {
                SourceError::Failed(format!("snapshot from {endpoint}: {message}"))
            }
            other => other,
        })
    }

    async fn read_checked(
        self,
        chunks: &mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<RdbFacts, SourceError> {
        let Snapshot {
            mut session,
            framing,
        } = self;
        let diskless = matches!(framing, Framing::EndMark(_));
        let mut check = RdbCheck::default();
        let mut remaining = match &framing {
            Framing::Length(length) => Some(*length),
            Framing::EndMark(_) => None,
        };
        // Diskless: the last 40 bytes read are held back until more data shows they are not
        // the end mark.
        let mut held = BytesMut::new();
        loop {
            let want = remaining.map_or(READ_CHUNK, |left| {
                READ_CHUNK.min(usize::try_from(left).unwrap_or(READ_CHUNK))
            });
            if want == 0 {
                break;
            }
            let mut buffer = BytesMut::with_capacity(want);
            let read = (&mut session.stream)
                .take(want as u64)
                .read_buf(&mut buffer)
                .await
                .map_err(|e| SourceError::Failed(format!("reading: {e}")))?;
            if read == 0 {
                return Err(SourceError::Failed(format!(
                    "the connection closed after {} bytes, before the end of the snapshot",
                    check.bytes + held.len() as u64
                )));
            }
            let data = match &framing {
                Framing::Length(_) => {
                    remaining = remaining.map(|left| left - read as u64);
                    buffer.freeze()
                }
                Framing::EndMark(mark) => {
                    held.extend_from_slice(&buffer);
                    if let Some(at) = memchr::memmem::find(&held, mark) {
                        // Anything after the mark is the command stream, not the snapshot.
                        let data = held.split_to(at).freeze();
                        check.feed(&data)?;
                        send(chunks, data).await?;
                        break;
                    }
                    let keep = held.len().min(EOF_MARK_LEN - 1);
                    held.split_to(held.len() - keep).freeze()
                }
            };
            check.feed(&data)?;
            send(chunks, data).await?;
        }
        let facts = check.finish()?;
        Ok(RdbFacts { diskless, ..facts })
    }
}

async fn send(
    chunks: &mpsc::Sender<std::io::Result<Bytes>>,
    data: Bytes,
) -> Result<(), SourceError> {
    if data.is_empty() {
        return Ok(());
    }
    chunks
        .send(Ok(data))
        .await
        .map_err(|_| SourceError::Failed("the upload stopped".into()))
}

/// The RDB checks, fed as the bytes go by: magic and version at the start, CRC-64 of all but
/// the last 8 bytes against those 8 bytes at the end.
#[derive(Default)]
struct RdbCheck {
    bytes: u64,
    header: Vec<u8>,
    /// The last 8 bytes seen, not yet fed to the CRC.
    tail: Vec<u8>,
    digest_state: Option<crc::Digest<'static, u64, crc::Table<16>>>,
}

impl fmt::Debug for RdbCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RdbCheck({} bytes)", self.bytes)
    }
}

impl RdbCheck {
    fn feed(&mut self, data: &[u8]) -> Result<(), SourceError> {
        self.bytes += data.len() as u64;
        if self.header.len() < 9 {
            let need = 9 - self.header.len();
            self.header.extend_from_slice(&data[..need.min(data.len())]);
            if self.header.len() >= 5 && &self.header[..5] != b"REDIS" {
                return Err(SourceError::Failed(
                    "the payload is not an RDB file (no REDIS magic)".into(),
                ));
            }
        }
        let digest = self.digest_state.get_or_insert_with(|| CRC64.digest());
        // Everything but the last 8 bytes of the stream goes into the CRC.
        let mut joined = std::mem::take(&mut self.tail);
        if joined.len() + data.len() <= 8 {
            joined.extend_from_slice(data);
            self.tail = joined;
            return Ok(());
        }
        let total = joined.len() + data.len();
        let flush = total - 8;
        if flush <= joined.len() {
            digest.update(&joined[..flush]);
            let mut tail = joined[flush..].to_vec();
            tail.extend_from_slice(data);
            self.tail = tail;
        } else {
            digest.update(&joined);
            let from_data = flush - joined.len();
            digest.update(&data[..from_data]);
            self.tail = data[from_data..].to_vec();
        }
        Ok(())
    }

    fn finish(self) -> Result<RdbFacts, SourceError> {
        if self.header.len() < 9 || self.tail.len() < 8 {
            return Err(SourceError::Failed(format!(
                "the snapshot is too short ({} bytes)",
                self.bytes
            )));
        }
        let version: u32 = std::str::from_utf8(&self.header[5..9])
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| SourceError::Failed("the RDB header has no version".into()))?;
        let stored = u64::from_le_bytes(self.tail[..8].try_into().unwrap_or_default());
        let computed = self.digest_state.map_or(0, |d| d.finalize());
        let crc64 = if version < 5 || stored == 0 {
            // Written with rdbchecksum no (or too old to have one): nothing to compare.
            tracing::warn!(
                rdb_version = version,
                "the snapshot carries no CRC-64; only its SHA-256 will protect it"
            );
            None
        } else if stored != computed {
            return Err(SourceError::Failed(format!(
                "CRC-64 mismatch: the snapshot says {stored:016x}, its bytes give {computed:016x}"
            )));
        } else {
            Some(format!("{stored:016x}"))
        };
        Ok(RdbFacts {
            bytes: self.bytes,
            rdb_version: version,
            crc64,
            diskless: false,
        })
    }
}

#[cfg(test)]
mod tests;
