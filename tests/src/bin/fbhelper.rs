//! A small target program for end-to-end tests: it performs syscalls the
//! tests fault, and prints what it saw (the errno name, or `ok`) and how
//! long each call took, one line per call.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(1) => "EPERM",
        Some(2) => "ENOENT",
        Some(5) => "EIO",
        Some(11) => "EAGAIN",
        Some(12) => "ENOMEM",
        Some(13) => "EACCES",
        Some(28) => "ENOSPC",
        Some(32) => "EPIPE",
        Some(101) => "ENETUNREACH",
        Some(104) => "ECONNRESET",
        Some(110) => "ETIMEDOUT",
        Some(111) => "ECONNREFUSED",
        Some(n) => return format!("errno{n}"),
        None => return format!("error({e})"),
    };
    name.to_string()
}

fn outcome<T>(r: &io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".to_string(),
        Err(e) => errno_name(e),
    }
}

/// The value, or: print what failed (as the tests read it) and exit 3.
fn must<T>(what: &str, r: io::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            println!("{what} {}", errno_name(&e));
            std::process::exit(3);
        }
    }
}

fn ms(since: Instant) -> u128 {
    since.elapsed().as_millis()
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    match args.get(i).and_then(|a| a.parse().ok()) {
        Some(v) => v,
        None => {
            eprintln!("fbhelper: missing or bad {what}");
            std::process::exit(2);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let out = io::stdout();
    let mut out = out.lock();
    match cmd {
        // open PATH... : open each path for reading
        "open" => {
            for path in &args[1..] {
                let t = Instant::now();
                let r = File::open(path);
                let _ = writeln!(out, "open {path} {} ms={}", outcome(&r), ms(t));
            }
        }
        // write N PATH : N small writes to one file, then counts by outcome
        "write" => {
            let n: usize = arg(&args, 1, "count");
            let path: String = arg(&args, 2, "path");
            let mut f = must(
                &format!("open {path}"),
                OpenOptions::new().create(true).append(true).open(&path),
            );
            let mut line = String::new();
            for _ in 0..n {
                let r = f.write(b"0123456789abcdef");
                line.push_str(&outcome(&r));
                line.push(' ');
            }
            let _ = writeln!(out, "writes {}", line.trim_end());
        }
        // fsync N PATH : N rounds of write + fsync, one line per fsync
        "fsync" => {
            let n: usize = arg(&args, 1, "count");
            let path: String = arg(&args, 2, "path");
            let mut f = must(
                &format!("open {path}"),
                OpenOptions::new().create(true).append(true).open(&path),
            );
            for i in 1..=n {
                let _ = f.write_all(b"record\n");
                let r = f.sync_all();
                let _ = writeln!(out, "fsync {i} {}", outcome(&r));
            }
        }
        // connect-self N : listen on loopback, connect to it N times
        "connect-self" => {
            let n: usize = arg(&args, 1, "count");
            let listener = must("bind", TcpListener::bind("127.0.0.1:0"));
            let addr = listener.local_addr().ok();
            for i in 1..=n {
                let t = Instant::now();
                let r = match addr {
                    Some(a) => TcpStream::connect(a),
                    None => Err(io::Error::other("no address")),
                };
                let _ = writeln!(out, "connect {i} {} ms={}", outcome(&r), ms(t));
            }
        }
        // sendto-self N : N UDP datagrams to a socket of our own
        "sendto-self" => {
            let n: usize = arg(&args, 1, "count");
            let sock = must("bind", UdpSocket::bind("127.0.0.1:0"));
            let addr = sock.local_addr().ok();
            let mut buf = [0u8; 16];
            for i in 1..=n {
                let t = Instant::now();
                let r = match addr {
                    Some(a) => sock.send_to(b"ping", a),
                    None => Err(io::Error::other("no address")),
                };
                let _ = writeln!(out, "sendto {i} {} ms={}", outcome(&r), ms(t));
                let _ = sock.recv_from(&mut buf);
            }
        }
        // two-threads SLOW_PATH FAST_PATH : one thread writes SLOW_PATH while
        // the main thread opens FAST_PATH 100 ms later
        "two-threads" => {
            let slow: String = arg(&args, 1, "slow path");
            let fast: String = arg(&args, 2, "fast path");
            let writer = thread::spawn(move || {
                let t = Instant::now();
                let r = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&slow)
                    .and_then(|mut f| f.write(b"x"));
                (outcome(&r), ms(t))
            });
            thread::sleep(Duration::from_millis(100));
            let t = Instant::now();
            let r = File::open(&fast);
            let _ = writeln!(out, "open {fast} {} ms={}", outcome(&r), ms(t));
            let _ = out.flush();
            if let Ok((result, took)) = writer.join() {
                let _ = writeln!(out, "write {result} ms={took}");
            }
        }
        // connect ADDR : one TCP connect
        "connect" => {
            let addr: String = arg(&args, 1, "address");
            let t = Instant::now();
            let r = TcpStream::connect(&addr);
            let _ = writeln!(out, "connect {addr} {} ms={}", outcome(&r), ms(t));
        }
        // open-stdin : open each path read from stdin, until end of input
        "open-stdin" => {
            let mut line = String::new();
            while io::stdin()
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                let path = line.trim().to_string();
                let r = File::open(&path);
                let _ = writeln!(out, "open {path} {}", outcome(&r));
                let _ = out.flush();
                line.clear();
            }
        }
        // serve PORT [WAL] : a line-protocol TCP server (see `serve`)
        "serve" => serve(arg(&args, 1, "port"), args.get(2).cloned()),
        // udp-echo PORT : answers each datagram with `echo <it>`; `COUNT`
        // answers how many datagrams came before it
        "udp-echo" => udp_echo(arg(&args, 1, "port")),
        // exit N : exit with code N
        "exit" => std::process::exit(arg(&args, 1, "code")),
        // pid : print our pid as the target sees it
        "pid" => {
            let _ = writeln!(out, "pid {}", std::process::id());
        }
        _ => {
            eprintln!(
                "usage: fbhelper open|write|fsync|connect|connect-self|sendto-self|two-threads|open-stdin|serve|exit|pid ..."
            );
            std::process::exit(2);
        }
    }
}

/// A service for spec tests, on 127.0.0.1:PORT. One command per line,
/// one answer line each:
///
/// - `PING` → `PONG`
/// - `PERSIST TEXT` → append TEXT to the WAL, fsync → `OK` or `ERR <errno>`
/// - `PERSIST_LATER TEXT` → a thread appends and fsyncs; `OK` 200 ms
///   later, whether or not the fsync has returned
/// - `OPEN PATH` → open PATH for reading → `OK` or `ERR <errno>`
/// - `CONNECT PORT` → connect to 127.0.0.1:PORT → `OK` or `ERR <errno>`
/// - `CLOCK` → read CLOCK_REALTIME with a raw `clock_gettime` syscall
///   (not the vDSO, so a filter sees it) → `OK <seconds>`
/// - `RANDOM` → 8 bytes from the `getrandom` syscall → `OK <hex>`
/// - `ENV NAME` → the variable's value
/// - `WHOAMI` → `uid=N pid=N`
/// - `SLEEP MS` → wait, then `OK`
/// - `EXIT CODE` → exit the process
/// - `SH TEXT` → run `sh -c "$FBHELPER_SH"` with `ARG=TEXT` →
///   `exit N: <its stdout and stderr, lines joined by " | ">` (a real
///   client, such as psql, run on demand)
///
/// `GET /trigger?leak=clock|rand|dns|network` first reads the clock, draws
/// randomness, or dials port 53 or port 9 (nothing declares them).
///
/// An HTTP/1.x request line (any method) gets an HTTP 200 answer, so the same
/// server serves `http(...)` healthchecks and HTTP steps; `GET /exit`
/// makes the process exit with code 3 without answering; `GET /env/NAME`
/// answers the variable's value in the `env` field.
fn udp_echo(port: u16) {
    let sock = must("bind", UdpSocket::bind(("127.0.0.1", port)));
    let mut seen = 0u64;
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
        let answer = if text == "COUNT" {
            format!("count {seen}")
        } else {
            seen += 1;
            format!("echo {text}")
        };
        let _ = sock.send_to(answer.as_bytes(), from);
    }
}

fn append_synced(path: &str, text: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

fn serve(port: u16, wal: Option<String>) {
    use std::io::{BufRead, BufReader};
    let listener = must("bind", TcpListener::bind(("127.0.0.1", port)));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let wal = wal.clone();
        thread::spawn(move || {
            let Ok(reader) = conn.try_clone() else { return };
            let mut conn = conn;
            let mut reader = BufReader::new(reader);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let line = line.trim_end().to_string();
                let http = line.ends_with(" HTTP/1.1") || line.ends_with(" HTTP/1.0");
                if http {
                    // Skip the headers, keep Content-Length, drop the body.
                    let mut length = 0usize;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.trim().eq_ignore_ascii_case("content-length")
                        {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    let _ = std::io::Read::read_exact(&mut reader, &mut body);
                    let rest = line.split_once(' ').map(|(_, r)| r).unwrap_or("/");
                    let path = rest.split_whitespace().next().unwrap_or("/");
                    // The kinds of I/O determinism() reports, on demand.
                    match path {
                        "/trigger?leak=clock" => drop(kernel::raw_clock()),
                        "/trigger?leak=rand" => drop(kernel::raw_random()),
                        "/trigger?leak=dns" => drop(TcpStream::connect(("127.0.0.1", 53))),
                        "/trigger?leak=network" => drop(TcpStream::connect(("127.0.0.1", 9))),
                        _ => {}
                    }
                    if path == "/exit" {
                        std::process::exit(3);
                    }
                    let status = if path == "/missing" {
                        "404 Not Found"
                    } else {
                        "200 OK"
                    };
                    let env = path
                        .strip_prefix("/env/")
                        .map(|name| std::env::var(name).unwrap_or_else(|_| "<unset>".into()))
                        .unwrap_or_default();
                    let body = format!("{{\"path\": \"{path}\", \"env\": \"{env}\"}}");
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                let reply = match cmd {
                    "PING" => "PONG".to_string(),
                    "PERSIST" => match &wal {
                        None => "ERR no wal".to_string(),
                        Some(path) => match append_synced(path, arg) {
                            Ok(()) => "OK".to_string(),
                            Err(e) => format!("ERR {}", errno_name(&e)),
                        },
                    },
                    "PERSIST_LATER" => match &wal {
                        None => "ERR no wal".to_string(),
                        Some(path) => {
                            let (path, text) = (path.clone(), arg.to_string());
                            thread::spawn(move || append_synced(&path, &text));
                            // Time for the thread to reach its fsync, so a
                            // test's window is open when it is decided.
                            thread::sleep(Duration::from_millis(200));
                            "OK".to_string()
                        }
                    },
                    "OPEN" => match File::open(arg) {
                        Ok(_) => "OK".to_string(),
                        Err(e) => format!("ERR {}", errno_name(&e)),
                    },
                    "CONNECT" => match arg.parse::<u16>() {
                        Ok(p) => match TcpStream::connect(("127.0.0.1", p)) {
                            Ok(_) => "OK".to_string(),
                            Err(e) => format!("ERR {}", errno_name(&e)),
                        },
                        Err(_) => "ERR bad port".to_string(),
                    },
                    "CLOCK" => kernel::raw_clock(),
                    "RANDOM" => kernel::raw_random(),
                    "ENV" => std::env::var(arg).unwrap_or_else(|_| "<unset>".into()),
                    "WHOAMI" => format!("uid={} pid={}", whoami(), std::process::id()),
                    "SLEEP" => {
                        thread::sleep(Duration::from_millis(arg.parse().unwrap_or(0)));
                        "OK".to_string()
                    }
                    "EXIT" => std::process::exit(arg.parse().unwrap_or(1)),
                    "SH" => run_sh(arg),
                    _ => format!("ERR unknown command {cmd:?}"),
                };
                if writeln!(conn, "{reply}").is_err() {
                    return;
                }
            }
        });
    }
}

/// Raw syscalls a seccomp filter sees (libc would answer the clock from
/// the vDSO): the only unsafe code of the test programs.
#[allow(unsafe_code)]
mod kernel {
    /// The clock through the syscall itself: libc would answer from the
    /// vDSO, which no seccomp filter sees.
    pub fn raw_clock() -> String {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `ts`, which lives
        // across the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_clock_gettime,
                libc::CLOCK_REALTIME,
                &mut ts as *mut libc::timespec,
            )
        };
        if rc != 0 {
            return format!(
                "ERR {}",
                super::errno_name(&std::io::Error::last_os_error())
            );
        }
        format!("OK {}", ts.tv_sec)
    }

    pub fn raw_random() -> String {
        let mut buf = [0u8; 8];
        // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getrandom,
                buf.as_mut_ptr(),
                buf.len(),
                0 as libc::c_uint,
            )
        };
        if n != buf.len() as i64 {
            return format!(
                "ERR {}",
                super::errno_name(&std::io::Error::last_os_error())
            );
        }
        let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
        format!("OK {hex}")
    }
}

fn run_sh(arg: &str) -> String {
    let Ok(script) = std::env::var("FBHELPER_SH") else {
        return "ERR FBHELPER_SH is not set".to_string();
    };
    match std::process::Command::new("sh")
        .args(["-c", &script])
        .env("ARG", arg)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            format!(
                "exit {}: {}",
                out.status.code().unwrap_or(-1),
                lines.join(" | ")
            )
        }
        Err(e) => format!("ERR sh: {e}"),
    }
}

fn whoami() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_default()
}
