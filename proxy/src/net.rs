//! The clients steps and healthchecks use: HTTP/1.1, line-oriented TCP and
//! PostgreSQL's simple query protocol. Small and blocking on purpose: a
//! step is one request from the test body, and every read has a deadline.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use crate::protocol::Target;
use crate::steps::{StepCall, StepReply, StepResult};

/// Resolves `host:port`, preferring IPv4 for `localhost` (servers commonly
/// bind 127.0.0.1 only, and a refused ::1 first costs a round trip).
pub fn resolve(addr: &str) -> io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to nothing"),
        ));
    }
    Ok(addrs)
}

/// Connects to the first address of `addr` that answers within `timeout`.
pub fn connect(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = None;
    for a in resolve(addr)? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no address")))
}

/// A `ready()` that asks only for a TCP connection (tcp, grpc).
pub(crate) fn connect_ready(to: &Target, timeout: Duration) -> Result<(), String> {
    connect(to.addr, timeout)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A step's connection: plain, or TLS to a proxy front.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Connects for a step, with TLS when `tls` is given (trusting its roots,
/// checking the name `localhost`).
pub fn open(
    addr: &str,
    timeout: Duration,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> io::Result<Stream> {
    let sock = connect(addr, timeout)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    match tls {
        None => Ok(Stream::Plain(sock)),
        Some(config) => Ok(Stream::Tls(Box::new(crate::tls::connect_client(
            sock,
            std::sync::Arc::clone(config),
            "localhost",
        )?))),
    }
}

/// An HTTP response.
#[derive(Debug, Clone, Default)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// Sends one request on a fresh connection and reads the whole answer.
#[allow(clippy::too_many_arguments)]
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    timeout: Duration,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> io::Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut stream = open(addr, timeout, tls)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    let mut has_type = false;
    for (k, v) in headers {
        has_type |= k.eq_ignore_ascii_case("content-type");
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() && !has_type {
        let looks_json = matches!(body.first(), Some(b'{') | Some(b'['));
        req.push_str(if looks_json {
            "Content-Type: application/json\r\n"
        } else {
            "Content-Type: text/plain\r\n"
        });
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP response: {:?}", line.trim_end()),
            )
        })?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if method == "HEAD" || status == 204 || status == 304 {
    } else if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size];
            reader.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            line.clear();
            reader.read_line(&mut line)?;
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "response too slow"));
            }
        }
    } else if let Some(len) = headers.get("content-length").and_then(|l| l.parse().ok()) {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Sends `data` plus a newline and returns the first line of the answer.
pub fn tcp_send(
    addr: &str,
    data: &str,
    timeout: Duration,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> io::Result<String> {
    let mut stream = open(addr, timeout.min(Duration::from_secs(10)), tls)?;
    stream.write_all(data.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without an answer",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// The result of one SQL statement.
#[derive(Debug, Clone, Default)]
pub struct SqlResult {
    /// Rows as column → text value (NULL as JSON null).
    pub rows: Vec<Json>,
    /// `INSERT 0 1`, `SELECT 3`, ...
    pub tag: String,
    /// The server's error, `SQLSTATE: message`.
    pub error: Option<String>,
}

/// Who a SQL step or probe logs in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlLogin {
    pub user: String,
    pub password: String,
    pub database: String,
}

impl SqlLogin {
    /// Explicit values win, then the service's environment (`POSTGRES_*`
    /// or `MYSQL_*`, as the official images read them), then defaults.
    pub fn resolve(
        protocol: &str,
        env: &[(String, String)],
        user: Option<String>,
        password: Option<String>,
        database: Option<String>,
    ) -> SqlLogin {
        let mysql = protocol == "mysql";
        let (user_var, password_var, db_var, default_user) = if mysql {
            ("MYSQL_USER", "MYSQL_PASSWORD", "MYSQL_DATABASE", "root")
        } else {
            (
                "POSTGRES_USER",
                "POSTGRES_PASSWORD",
                "POSTGRES_DB",
                "postgres",
            )
        };
        let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let user = user
            .or_else(|| var(user_var))
            .unwrap_or_else(|| default_user.into());
        let password = password.or_else(|| var(password_var)).unwrap_or_default();
        let database = database
            .or_else(|| var(db_var))
            .unwrap_or_else(|| if mysql { String::new() } else { user.clone() });
        SqlLogin {
            user,
            password,
            database,
        }
    }
}

/// Runs `sql` on a `postgres` or `mysql` server.
pub fn sql_query(
    protocol: &str,
    addr: &str,
    login: &SqlLogin,
    sql: &str,
    timeout: Duration,
) -> io::Result<SqlResult> {
    let SqlLogin {
        user,
        password,
        database,
    } = login;
    if protocol == "mysql" {
        mysql_query(addr, user, password, database, sql, timeout)
    } else {
        pg_query(addr, user, password, database, sql, timeout)
    }
}

/// Runs `sql` over PostgreSQL's simple query protocol (trust or cleartext
/// password authentication).
pub fn pg_query(
    addr: &str,
    user: &str,
    password: &str,
    database: &str,
    sql: &str,
    timeout: Duration,
) -> io::Result<SqlResult> {
    let mut s = connect(addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608u32.to_be_bytes());
    for (k, v) in [("user", user), ("database", database)] {
        startup.extend_from_slice(k.as_bytes());
        startup.push(0);
        startup.extend_from_slice(v.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let mut msg = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&startup);
    s.write_all(&msg)?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut result = SqlResult::default();
    let mut columns: Vec<String> = Vec::new();
    let mut sent_query = false;
    loop {
        let (tag, body) = match pg_message(&mut r) {
            Ok(m) => m,
            // A server that reports an error and then dies (a PANIC) has
            // said what matters.
            Err(_) if result.error.is_some() => return Ok(result),
            Err(e) => return Err(e),
        };
        match tag {
            b'R' => match body
                .get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            {
                Some(0) => {}
                Some(3) => {
                    let mut p = password.as_bytes().to_vec();
                    p.push(0);
                    let mut m = vec![b'p'];
                    m.extend_from_slice(&((p.len() + 4) as u32).to_be_bytes());
                    m.extend_from_slice(&p);
                    s.write_all(&m)?;
                }
                other => {
                    return Err(io::Error::other(format!(
                        "unsupported PostgreSQL authentication method {other:?} (use trust or password)"
                    )));
                }
            },
            b'Z' if !sent_query => {
                let mut q = sql.as_bytes().to_vec();
                q.push(0);
                let mut m = vec![b'Q'];
                m.extend_from_slice(&((q.len() + 4) as u32).to_be_bytes());
                m.extend_from_slice(&q);
                s.write_all(&m)?;
                sent_query = true;
            }
            b'Z' => {
                let _ = s.write_all(&[b'X', 0, 0, 0, 4]);
                return Ok(result);
            }
            b'T' => columns = pg_row_description(&body),
            b'D' => result.rows.push(pg_data_row(&body, &columns)),
            b'C' => result.tag = cstr(&body).0,
            b'E' => {
                let fields = pg_error_fields(&body);
                let code = fields.get(&b'C').cloned().unwrap_or_default();
                let text = fields.get(&b'M').cloned().unwrap_or_default();
                let err = format!("{code}: {text}");
                if !sent_query {
                    return Err(io::Error::other(err));
                }
                result.error = Some(err);
            }
            _ => {}
        }
    }
}

/// A database server that hangs up mid-conversation has usually crashed
/// (a PostgreSQL PANIC, say): say so instead of "failed to fill buffer".
fn closed_unexpectedly(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            e.kind(),
            "the server closed the connection unexpectedly (it may have crashed)",
        )
    } else {
        e
    }
}

fn pg_message(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(closed_unexpectedly)?;
    let len = crate::protocols::postgres::length([head[1], head[2], head[3], head[4]])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut body = vec![0; len - 4];
    r.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn cstr(b: &[u8]) -> (String, usize) {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    (String::from_utf8_lossy(&b[..end]).into_owned(), end + 1)
}

fn pg_row_description(b: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 2;
    let n = b
        .get(..2)
        .map(|x| u16::from_be_bytes([x[0], x[1]]))
        .unwrap_or(0);
    for _ in 0..n {
        let Some(rest) = b.get(at..) else { break };
        let (name, used) = cstr(rest);
        names.push(name);
        at += used + 18;
    }
    names
}

fn pg_data_row(b: &[u8], columns: &[String]) -> Json {
    let mut row = serde_json::Map::new();
    let mut at = 2;
    for (i, name) in columns.iter().enumerate() {
        let Some(len) = b.get(at..at + 4) else { break };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4;
        let value = if len < 0 {
            Json::Null
        } else {
            let end = at + len as usize;
            let v = b
                .get(at..end)
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            at = end;
            json!(v)
        };
        let key = if name.is_empty() {
            format!("col{i}")
        } else {
            name.clone()
        };
        row.insert(key, value);
    }
    Json::Object(row)
}

fn pg_error_fields(b: &[u8]) -> BTreeMap<u8, String> {
    let mut out = BTreeMap::new();
    let mut at = 0;
    while let Some(&code) = b.get(at) {
        if code == 0 {
            break;
        }
        let (text, used) = cstr(&b[at + 1..]);
        out.insert(code, text);
        at += 1 + used;
    }
    out
}

fn my_read_packet(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head).map_err(closed_unexpectedly)?;
    let mut body = vec![0; crate::protocols::mysql::length(head) - 4];
    r.read_exact(&mut body)?;
    Ok((head[3], body))
}

fn my_write_packet(w: &mut impl Write, seq: u8, body: &[u8]) -> io::Result<()> {
    let len = (body.len() as u32).to_le_bytes();
    let mut out = vec![len[0], len[1], len[2], seq];
    out.extend_from_slice(body);
    w.write_all(&out)
}

/// A length-encoded integer at `*at`.
fn my_lenenc(b: &[u8], at: &mut usize) -> Option<u64> {
    let first = *b.get(*at)?;
    *at += 1;
    let take = |at: &mut usize, n: usize| -> Option<u64> {
        let bytes = b.get(*at..*at + n)?;
        *at += n;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(bytes);
        Some(u64::from_le_bytes(v))
    };
    match first {
        0xfb => None,
        0xfc => take(at, 2),
        0xfd => take(at, 3),
        0xfe => take(at, 8),
        n => Some(u64::from(n)),
    }
}

fn my_error(body: &[u8]) -> String {
    // 0xFF, code (2 bytes), '#', SQLSTATE (5), message.
    let code = body
        .get(1..3)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .unwrap_or(0);
    let (state, msg) = if body.get(3) == Some(&b'#') {
        (
            String::from_utf8_lossy(body.get(4..9).unwrap_or_default()).into_owned(),
            String::from_utf8_lossy(body.get(9..).unwrap_or_default()).into_owned(),
        )
    } else {
        (
            String::new(),
            String::from_utf8_lossy(body.get(3..).unwrap_or_default()).into_owned(),
        )
    };
    format!("{code} ({state}): {msg}")
}

/// Runs `sql` over the MySQL/MariaDB protocol. Accounts without a
/// password only (enough for test servers started by a spec).
pub fn mysql_query(
    addr: &str,
    user: &str,
    password: &str,
    database: &str,
    sql: &str,
    timeout: Duration,
) -> io::Result<SqlResult> {
    if !password.is_empty() {
        return Err(io::Error::other(
            "mysql steps support accounts without a password only in this build",
        ));
    }
    let mut s = connect(addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut r = BufReader::new(s.try_clone()?);
    let (_, greeting) = my_read_packet(&mut r)?;
    if greeting.first() == Some(&0xff) {
        return Err(io::Error::other(my_error(&greeting)));
    }
    // CLIENT_PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH | CONNECT_WITH_DB
    let mut caps: u32 = 0x0000_0200 | 0x0000_8000 | 0x0008_0000;
    if !database.is_empty() {
        caps |= 0x0000_0008;
    }
    let mut resp = Vec::new();
    resp.extend_from_slice(&caps.to_le_bytes());
    resp.extend_from_slice(&(1u32 << 24).to_le_bytes());
    resp.push(33); // utf8_general_ci
    resp.extend_from_slice(&[0u8; 23]);
    resp.extend_from_slice(user.as_bytes());
    resp.push(0);
    resp.push(0); // empty auth response
    if !database.is_empty() {
        resp.extend_from_slice(database.as_bytes());
        resp.push(0);
    }
    resp.extend_from_slice(b"mysql_native_password\0");
    my_write_packet(&mut s, 1, &resp)?;
    loop {
        let (seq, body) = my_read_packet(&mut r)?;
        match body.first() {
            Some(0x00) => break,
            Some(0xff) => return Err(io::Error::other(my_error(&body))),
            // Auth switch: answer with an empty password again.
            Some(0xfe) => my_write_packet(&mut s, seq.wrapping_add(1), &[])?,
            _ => return Err(io::Error::other("unexpected MySQL handshake packet")),
        }
    }
    let mut q = vec![0x03];
    q.extend_from_slice(sql.as_bytes());
    my_write_packet(&mut s, 0, &q)?;
    let mut result = SqlResult::default();
    let (_, first) = my_read_packet(&mut r)?;
    match first.first() {
        Some(0xff) => {
            result.error = Some(my_error(&first));
            return Ok(result);
        }
        Some(0x00) => {
            let mut at = 1;
            let affected = my_lenenc(&first, &mut at).unwrap_or(0);
            result.tag = format!("OK {affected}");
            return Ok(result);
        }
        _ => {}
    }
    let mut at = 0;
    let columns = my_lenenc(&first, &mut at).unwrap_or(0) as usize;
    let mut names = Vec::with_capacity(columns);
    for _ in 0..columns {
        let (_, def) = my_read_packet(&mut r)?;
        // catalog, schema, table, org_table, name, ...
        let mut at = 0;
        let mut fields = Vec::new();
        for _ in 0..5 {
            let n = my_lenenc(&def, &mut at).unwrap_or(0) as usize;
            fields.push(
                String::from_utf8_lossy(def.get(at..at + n).unwrap_or_default()).into_owned(),
            );
            at += n;
        }
        names.push(fields.pop().unwrap_or_default());
    }
    // EOF after the column definitions (no CLIENT_DEPRECATE_EOF).
    my_read_packet(&mut r)?;
    loop {
        let (_, row) = my_read_packet(&mut r)?;
        match row.first() {
            Some(0xfe) if row.len() < 9 => break,
            Some(0xff) => {
                result.error = Some(my_error(&row));
                break;
            }
            _ => {}
        }
        let mut at = 0;
        let mut obj = serde_json::Map::new();
        for name in &names {
            let value = match my_lenenc(&row, &mut at) {
                None => Json::Null,
                Some(n) => {
                    let n = n as usize;
                    let v = String::from_utf8_lossy(row.get(at..at + n).unwrap_or_default())
                        .into_owned();
                    at += n;
                    json!(v)
                }
            };
            obj.insert(name.clone(), value);
        }
        result.rows.push(Json::Object(obj));
    }
    result.tag = format!("SELECT {}", result.rows.len());
    Ok(result)
}

/// A step that failed before any answer: the reason, as the step's error.
pub(crate) fn failed(e: impl std::fmt::Display) -> StepResult {
    StepResult::Reply(StepReply {
        error: e.to_string(),
        ..Default::default()
    })
}

/// A `query` or `exec` step on a `postgres` or `mysql` interface; the
/// login comes from the step's arguments, then the service's environment.
pub(crate) fn sql_step(protocol: &str, call: &StepCall, to: &Target) -> StepResult {
    let login = SqlLogin::resolve(
        protocol,
        to.env,
        call.str("user").map(str::to_string),
        call.str("password").map(str::to_string),
        call.str("database").map(str::to_string),
    );
    let sql = call.str("sql").unwrap_or_default();
    let timeout = call.timeout(Duration::from_secs(30));
    match sql_query(protocol, to.addr, &login, sql, timeout) {
        Ok(r) => StepResult::Reply(StepReply {
            ok: r.error.is_none(),
            error: r.error.unwrap_or_default(),
            body: r.tag.clone(),
            data: Some(if call.method == "exec" {
                json!({"tag": r.tag})
            } else {
                Json::Array(r.rows)
            }),
            ..Default::default()
        }),
        Err(e) => failed(e),
    }
}

/// `ready()` on a SQL interface: `SELECT 1` succeeds.
pub(crate) fn sql_ready(protocol: &str, to: &Target, timeout: Duration) -> Result<(), String> {
    let login = SqlLogin::resolve(protocol, to.env, None, None, None);
    let r = sql_query(protocol, to.addr, &login, "SELECT 1", timeout).map_err(|e| e.to_string())?;
    match r.error {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_rows_decode_with_nulls() {
        let mut desc = vec![0, 2];
        for name in ["id", "note"] {
            desc.extend_from_slice(name.as_bytes());
            desc.push(0);
            desc.extend_from_slice(&[0; 18]);
        }
        let cols = pg_row_description(&desc);
        assert_eq!(cols, ["id", "note"]);
        let mut row = vec![0, 2];
        row.extend_from_slice(&1i32.to_be_bytes());
        row.push(b'7');
        row.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(pg_data_row(&row, &cols), json!({"id": "7", "note": null}));
    }
}
