//! A thin walsender client on `postgres-protocol` over tokio TCP.
//!
//! Why not `tokio-postgres`: its released line cannot open a replication
//! connection (no `replication` startup key, no CopyBoth). This client speaks
//! just enough of the protocol: startup with `replication=database`,
//! cleartext/md5/SCRAM-SHA-256 authentication, simple queries (the
//! replication commands and a few catalog queries) and CopyBoth streaming.
//!
//! Session settings travel in the startup packet (`TimeZone=UTC`,
//! `DateStyle=ISO`, `IntervalStyle=postgres`, `extra_float_digits=1`,
//! `client_encoding=UTF8`): pgoutput renders values with the walsender's own
//! settings, so this is what makes `timestamptz` text arrive in UTC and what
//! the snapshot connections set too, so both paths produce identical text.
//!
//! Why the socket is split: the reading half belongs to the source loop,
//! which may wait on a slow Kafka sink; the writing half belongs to a status
//! task that sends standby status updates on a timer, so `wal_sender_timeout`
//! never drops a connection whose sink is merely slow (the server processes
//! replies even while its own send buffer is full).
//!
//! `Message::parse` of `postgres-protocol` does not know CopyBothResponse
//! (`W`) and consumes the frame before failing, so frames are split here by
//! their header and the few backend messages needed are decoded by hand.

use std::str::FromStr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::change::{Lsn, lsn_to_string};
use crate::error::Error;
use crate::pgoutput::{PG_EPOCH_OFFSET_US, ReplicationFrame, standby_status_update};

/// Where and as whom to connect, parsed from a `postgres://` URL.
#[derive(Clone)]
pub struct ConnectParams {
    /// The URL as given (for ordinary `tokio-postgres` connections).
    pub url: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
    /// Password (never logged).
    pub password: Option<Vec<u8>>,
    /// Database.
    pub dbname: String,
}

impl std::fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("url", &local_stack::redact::url(&self.url))
            .finish_non_exhaustive()
    }
}

impl ConnectParams {
    /// Parses a `postgres://user:pass@host:port/db` URL.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let redacted = local_stack::redact::url(url);
        let cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| Error::Config(format!("invalid Postgres URL {redacted}: {e}")))?;
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(_) => {
                return Err(Error::Config(format!(
                    "{redacted}: only TCP hosts are supported by the replication connection"
                )));
            }
            None => "localhost".to_owned(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .ok_or_else(|| Error::Config(format!("{redacted}: the URL names no user")))?
            .to_owned();
        let dbname = cfg.get_dbname().unwrap_or(&user).to_owned();
        Ok(ConnectParams {
            url: url.to_owned(),
            host,
            port,
            user,
            password: cfg.get_password().map(<[u8]>::to_vec),
            dbname,
        })
    }

    /// `host:port/db` for messages.
    pub fn target(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }
}

/// The session settings every reader connection uses (see the module docs).
pub const SESSION_SETTINGS: [(&str, &str); 5] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("client_encoding", "UTF8"),
];

/// A server error's fields that matter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    /// SQLSTATE.
    pub code: String,
    /// Message.
    pub message: String,
    /// Detail, if any.
    pub detail: Option<String>,
    /// Hint, if any.
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

fn parse_error_fields(mut body: Bytes) -> ServerError {
    let mut e = ServerError::default();
    while body.has_remaining() {
        let kind = body.get_u8();
        if kind == 0 {
            break;
        }
        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        let value = String::from_utf8_lossy(&body[..end]).into_owned();
        body.advance((end + 1).min(body.len()));
        match kind {
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
    }
    e
}

/// Result of a simple query: column names and text rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows; `None` = NULL.
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// Value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.rows.first()?.get(i)?.as_deref()
    }
}

/// Errors of a query: the server's, or the connection's.
#[derive(Debug)]
pub enum QueryError {
    /// The server answered with an ErrorResponse (the connection is still usable).
    Server(ServerError),
    /// IO or protocol failure.
    Connection(Error),
}

impl From<Error> for QueryError {
    fn from(e: Error) -> Self {
        QueryError::Connection(e)
    }
}

impl QueryError {
    /// Converts to the crate error; a server error keeps its SQLSTATE, which
    /// decides whether it is retried.
    pub fn into_error(self, what: &str) -> Error {
        match self {
            QueryError::Server(source) => Error::Server {
                context: what.to_owned(),
                source,
            },
            QueryError::Connection(e) => e,
        }
    }
}

/// Reads backend frames (`tag`, body) from a stream.
#[derive(Debug)]
struct FrameReader {
    read: OwnedReadHalf,
    buf: BytesMut,
}

impl FrameReader {
    /// A complete frame already in the buffer, without reading.
    fn buffered(&mut self) -> Result<Option<(u8, Bytes)>, Error> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(Error::Replication(format!("invalid frame length {len}")));
        }
        if self.buf.len() > len {
            let tag = self.buf[0];
            let mut frame = self.buf.split_to(len + 1);
            frame.advance(5);
            return Ok(Some((tag, frame.freeze())));
        }
        self.buf.reserve(len + 1 - self.buf.len());
        Ok(None)
    }

    async fn next(&mut self) -> Result<(u8, Bytes), Error> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(frame);
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(256 * 1024);
            }
            let n = self
                .read
                .read_buf(&mut self.buf)
                .await
                .map_err(|source| Error::Network {
                    context: "read from server".to_owned(),
                    source,
                })?;
            if n == 0 {
                return Err(Error::Replication(
                    "server closed the connection".to_owned(),
                ));
            }
        }
    }
}

/// A connection to a walsender (or an ordinary backend when `replication` is off).
#[derive(Debug)]
pub struct ReplicationConnection {
    reader: FrameReader,
    write: OwnedWriteHalf,
    target: String,
    /// `server_version_num`-style number from the `server_version` parameter (e.g. 150018).
    pub server_version: u32,
}

fn connect_err(target: &str, message: impl Into<String>) -> Error {
    Error::Connect {
        target: target.to_owned(),
        message: message.into(),
    }
}

/// Maps a startup/authentication server error to a retryable or fix-it error.
fn startup_error(params: &ConnectParams, e: &ServerError) -> Error {
    let target = params.target();
    match e.code.as_str() {
        "28P01" => Error::Setup(format!(
            "connect to {target}: password authentication failed for user \"{}\": fix the password in the source URL",
            params.user
        )),
        "28000" | "3D000" | "42501" => Error::Setup(format!("connect to {target}: {e}")),
        // Retryable: slots free up when other clients disconnect.
        "53300" => connect_err(
            &target,
            format!(
                "{e}: no free WAL sender or connection slot; raise max_wal_senders / max_connections or stop another client"
            ),
        ),
        _ => connect_err(&target, e.to_string()),
    }
}

impl ReplicationConnection {
    /// Connects and authenticates; `replication` adds `replication=database`.
    pub async fn connect(params: &ConnectParams, replication: bool) -> Result<Self, Error> {
        let target = params.target();
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect((params.host.as_str(), params.port)),
        )
        .await
        .map_err(|_| connect_err(&target, "timed out after 10 s"))?
        .map_err(|e| connect_err(&target, e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| connect_err(&target, e.to_string()))?;
        let (read, write) = stream.into_split();
        let mut conn = ReplicationConnection {
            reader: FrameReader {
                read,
                buf: BytesMut::with_capacity(256 * 1024),
            },
            write,
            target: target.clone(),
            server_version: 0,
        };
        let mut startup: Vec<(&str, &str)> = vec![
            ("user", params.user.as_str()),
            ("database", params.dbname.as_str()),
            ("application_name", "instashop-cdc-reader"),
        ];
        if replication {
            startup.push(("replication", "database"));
        }
        startup.extend(SESSION_SETTINGS);
        let mut out = BytesMut::new();
        frontend::startup_message(startup, &mut out)
            .map_err(|e| connect_err(&target, e.to_string()))?;
        conn.send(&out).await?;
        conn.authenticate(params).await?;
        // ParameterStatus / BackendKeyData until ReadyForQuery.
        loop {
            let (tag, body) = conn.reader.next().await?;
            match tag {
                b'S' => {
                    let mut parts = body.split(|&b| b == 0);
                    let key = parts.next().unwrap_or_default();
                    let value = parts.next().unwrap_or_default();
                    if key == b"server_version" {
                        conn.server_version = parse_server_version(&String::from_utf8_lossy(value));
                    }
                }
                b'K' | b'N' => {}
                b'Z' => return Ok(conn),
                b'E' => return Err(startup_error(params, &parse_error_fields(body))),
                other => {
                    return Err(connect_err(
                        &target,
                        format!("unexpected message {:?} during startup", other as char),
                    ));
                }
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.write
            .write_all(bytes)
            .await
            .map_err(|source| Error::Network {
                context: format!("write to {}", self.target),
                source,
            })
    }

    async fn authenticate(&mut self, params: &ConnectParams) -> Result<(), Error> {
        let target = params.target();
        let password = || {
            params.password.clone().ok_or_else(|| {
                Error::Setup(format!(
                    "connect to {target}: the server asks for a password but the URL has none"
                ))
            })
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let (tag, mut body) = self.reader.next().await?;
            match tag {
                b'E' => return Err(startup_error(params, &parse_error_fields(body))),
                b'R' => {}
                other => {
                    return Err(connect_err(
                        &target,
                        format!(
                            "unexpected message {:?} during authentication",
                            other as char
                        ),
                    ));
                }
            }
            if body.remaining() < 4 {
                return Err(connect_err(&target, "short authentication message"));
            }
            let code = body.get_u32();
            let mut out = BytesMut::new();
            let io = |e: std::io::Error| connect_err(&target, e.to_string());
            match code {
                0 => return Ok(()),
                3 => {
                    frontend::password_message(&password()?, &mut out).map_err(io)?;
                }
                5 => {
                    if body.remaining() < 4 {
                        return Err(connect_err(&target, "short md5 salt"));
                    }
                    let salt = [body[0], body[1], body[2], body[3]];
                    let hash = md5_hash(params.user.as_bytes(), &password()?, salt);
                    frontend::password_message(hash.as_bytes(), &mut out).map_err(io)?;
                }
                10 => {
                    let offers_scram = body
                        .split(|&b| b == 0)
                        .any(|m| m == sasl::SCRAM_SHA_256.as_bytes());
                    if !offers_scram {
                        return Err(Error::Setup(format!(
                            "connect to {target}: the server offers no SASL mechanism this reader supports (SCRAM-SHA-256 without TLS)"
                        )));
                    }
                    let s =
                        sasl::ScramSha256::new(&password()?, sasl::ChannelBinding::unsupported());
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)
                        .map_err(io)?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| connect_err(&target, "SASL continue without start"))?;
                    s.update(&body).map_err(io)?;
                    frontend::sasl_response(s.message(), &mut out).map_err(io)?;
                }
                12 => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| connect_err(&target, "SASL final without start"))?;
                    s.finish(&body).map_err(io)?;
                    continue;
                }
                other => {
                    return Err(Error::Setup(format!(
                        "connect to {target}: unsupported authentication method {other}; use scram-sha-256, md5 or password in pg_hba.conf"
                    )));
                }
            }
            self.send(&out).await?;
        }
    }

    /// Runs one simple-protocol statement and collects its text result.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, QueryError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| Error::Replication(e.to_string()))?;
        self.send(&out).await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            let (tag, mut body) = self.reader.next().await?;
            match tag {
                b'T' => {
                    result.columns.clear();
                    if body.remaining() < 2 {
                        return Err(Error::Replication("short RowDescription".into()).into());
                    }
                    let n = body.get_u16();
                    for _ in 0..n {
                        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                        result
                            .columns
                            .push(String::from_utf8_lossy(&body[..end]).into_owned());
                        body.advance((end + 1 + 18).min(body.len()));
                    }
                }
                b'D' => {
                    if body.remaining() < 2 {
                        return Err(Error::Replication("short DataRow".into()).into());
                    }
                    let n = body.get_u16();
                    let mut row = Vec::with_capacity(usize::from(n));
                    for _ in 0..n {
                        if body.remaining() < 4 {
                            return Err(Error::Replication("short DataRow".into()).into());
                        }
                        let len = body.get_i32();
                        if len < 0 {
                            row.push(None);
                        } else {
                            let len = (len as usize).min(body.remaining());
                            row.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
                            body.advance(len);
                        }
                    }
                    result.rows.push(row);
                }
                b'E' => error = Some(parse_error_fields(body)),
                b'Z' => {
                    return match error {
                        Some(e) => Err(QueryError::Server(e)),
                        None => Ok(result),
                    };
                }
                // CommandComplete, EmptyQuery, Notice, ParameterStatus.
                _ => {}
            }
        }
    }

    /// `START_REPLICATION` of a pgoutput slot; on success the connection is
    /// in CopyBoth mode and splits into the stream and its status writer.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<(ReplicationStream, StatusWriter), QueryError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"proto_version\" '1', \"publication_names\" {}, \"messages\" 'true')",
            quote_ident(slot),
            lsn_to_string(start),
            quote_literal(&quote_ident(publication)),
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out).map_err(|e| Error::Replication(e.to_string()))?;
        self.send(&out).await?;
        loop {
            let (tag, body) = self.reader.next().await?;
            match tag {
                b'W' => break,
                b'E' => {
                    let e = parse_error_fields(body);
                    // Drain to ReadyForQuery is pointless: the connection is dropped.
                    return Err(QueryError::Server(e));
                }
                b'N' | b'S' => {}
                other => {
                    return Err(Error::Replication(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        other as char
                    ))
                    .into());
                }
            }
        }
        Ok((
            ReplicationStream {
                reader: self.reader,
            },
            StatusWriter {
                write: self.write,
                target: self.target,
            },
        ))
    }
}

fn parse_server_version(text: &str) -> u32 {
    // "15.18 (Debian 15.18-1.pgdg120+1)" -> 150018
    let mut parts = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    major * 10000 + minor
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The reading half of a streaming replication connection.
#[derive(Debug)]
pub struct ReplicationStream {
    reader: FrameReader,
}

fn stream_frame(tag: u8, body: Bytes) -> Result<Option<ReplicationFrame>, Error> {
    match tag {
        b'd' => ReplicationFrame::parse(body).map(Some),
        b'E' => Err(Error::Server {
            context: "replication stream".to_owned(),
            source: parse_error_fields(body),
        }),
        b'c' => Err(Error::Replication(
            "server ended the replication stream (CopyDone)".to_owned(),
        )),
        _ => Ok(None),
    }
}

impl ReplicationStream {
    /// The next CopyData frame; an ErrorResponse or CopyDone ends the stream with an error.
    pub async fn next(&mut self) -> Result<ReplicationFrame, Error> {
        loop {
            let (tag, body) = self.reader.next().await?;
            if let Some(frame) = stream_frame(tag, body)? {
                return Ok(frame);
            }
        }
    }

    /// Waits for one frame, then takes every further frame already received
    /// (up to `max`) without waiting: one channel hand-off per socket read.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<ReplicationFrame>, Error> {
        let mut batch = Vec::with_capacity(max.min(256));
        batch.push(self.next().await?);
        while batch.len() < max {
            let Some((tag, body)) = self.reader.buffered()? else {
                break;
            };
            if let Some(frame) = stream_frame(tag, body)? {
                batch.push(frame);
            }
        }
        Ok(batch)
    }
}

/// The writing half: standby status updates.
#[derive(Debug)]
pub struct StatusWriter {
    write: OwnedWriteHalf,
    target: String,
}

impl StatusWriter {
    /// Sends a standby status update reporting `lsn` as written, flushed and applied.
    pub async fn send_status(&mut self, lsn: Lsn) -> Result<(), Error> {
        let payload = standby_status_update(lsn, lsn, lsn, now_pg_us());
        let mut out = BytesMut::with_capacity(40);
        frontend::CopyData::new(&payload[..])
            .map_err(|e| Error::Replication(e.to_string()))?
            .write(&mut out);
        let context = || format!("standby status update to {}", self.target);
        self.write
            .write_all(&out)
            .await
            .map_err(|source| Error::Network {
                context: context(),
                source,
            })?;
        self.write.flush().await.map_err(|source| Error::Network {
            context: context(),
            source,
        })
    }

    /// A writer on an already open connection's writing half.
    pub fn new(write: OwnedWriteHalf, target: String) -> Self {
        StatusWriter { write, target }
    }
}

/// Now in µs since 2000-01-01.
pub fn now_pg_us() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    now - PG_EPOCH_OFFSET_US
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn params_from_url() {
        let p =
            ConnectParams::from_url("postgres://cdc_reader:secret@127.0.0.1:54329/crm").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.user.as_str(), p.dbname.as_str()),
            ("127.0.0.1", 54329, "cdc_reader", "crm")
        );
        assert_eq!(p.password.as_deref(), Some(&b"secret"[..]));
        assert!(!format!("{p:?}").contains("secret"));
        assert!(ConnectParams::from_url("nonsense://").is_err());
    }

    #[test]
    fn version_and_quoting() {
        assert_eq!(
            parse_server_version("15.18 (Debian 15.18-1.pgdg120+1)"),
            150018
        );
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn error_fields() {
        let mut b = Vec::new();
        for (k, v) in [
            (b'S', "ERROR"),
            (b'C', "55006"),
            (b'M', "replication slot \"s\" is active for PID 42"),
        ] {
            b.push(k);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        let e = parse_error_fields(Bytes::from(b));
        assert_eq!(e.code, "55006");
        assert!(e.message.contains("PID 42"));
    }

    fn error_response(code: &str, message: &str) -> Bytes {
        let mut b = Vec::new();
        for (k, v) in [(b'S', "ERROR"), (b'C', code), (b'M', message)] {
            b.push(k);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        Bytes::from(b)
    }

    #[test]
    fn an_error_in_the_stream_is_retried_only_when_transient() {
        let denied = stream_frame(b'E', error_response("42501", "permission denied"))
            .expect_err("an ErrorResponse ends the stream");
        assert!(!denied.is_retryable(), "missing privilege: {denied}");
        let shutdown = stream_frame(b'E', error_response("57P01", "terminating connection"))
            .expect_err("an ErrorResponse ends the stream");
        assert!(shutdown.is_retryable(), "server shutdown: {shutdown}");
        let refused = QueryError::Server(parse_error_fields(error_response("42P01", "no table")))
            .into_error("START_REPLICATION");
        assert!(!refused.is_retryable());
    }
}
