//! Shared helpers for the end-to-end tests: where the built binaries are,
//! running `faultbox` with a time limit, parsing its JSON logs, and scratch
//! directories.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

/// Directory holding `faultbox` and the static `faultbox-shim`
/// (`$FAULTBOX_BIN_DIR`, or `target/debug` as `scripts/build` leaves it).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FAULTBOX_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug");
    assert!(
        dir.join("faultbox-shim").exists(),
        "no faultbox-shim in {}: run scripts/build first (scripts/test does)",
        dir.display()
    );
    dir
}

/// The `faultbox` binary.
pub fn faultbox() -> PathBuf {
    bin_dir().join("faultbox")
}

/// The static `faultbox-shim` binary.
pub fn shim() -> PathBuf {
    bin_dir().join("faultbox-shim")
}

/// The test target program.
pub fn helper() -> &'static str {
    env!("CARGO_BIN_EXE_fbhelper")
}

/// What one `faultbox` run produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// Every JSON log line of stderr.
    pub logs: Vec<Value>,
}

impl Run {
    /// Log records with this `msg`.
    pub fn logs_with(&self, msg: &str) -> Vec<&Value> {
        self.logs.iter().filter(|l| l["msg"] == msg).collect()
    }

    /// `syscall intercepted` records whose decision starts with `prefix`.
    pub fn syscalls(&self, prefix: &str) -> Vec<&Value> {
        self.logs_with("syscall intercepted")
            .into_iter()
            .filter(|l| {
                l["decision"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(prefix))
            })
            .collect()
    }

    /// Lines of stdout that start with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<String> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }
}

/// Runs `faultbox <args>` with JSON logs and a 60 s limit.
pub fn faultbox_run(args: &[&str]) -> Run {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60"])
        .arg(faultbox())
        .arg("run")
        .arg("--log-format=json");
    cmd.args(args);
    finish(cmd.output().expect("run faultbox"))
}

/// Runs `faultbox` with exactly `args` (no flags added).
pub fn faultbox_raw(args: &[&str]) -> Run {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60"]).arg(faultbox()).args(args);
    cmd.stdin(Stdio::null());
    finish(cmd.output().expect("run faultbox"))
}

pub fn finish(out: Output) -> Run {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let logs = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
        logs,
    }
}

/// A fresh scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "faultbox-e2e-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("scratch dir");
        Scratch(dir)
    }

    /// A path inside the scratch dir, created with some content.
    pub fn file(&self, rel: &str) -> String {
        let p = self.0.join(rel);
        std::fs::write(&p, "content\n").expect("write scratch file");
        p.to_string_lossy().into_owned()
    }

    /// A path inside the scratch dir (not created).
    pub fn path(&self, rel: &str) -> String {
        self.0.join(rel).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The number at the end of `ms=N` in a helper line.
pub fn millis(line: &str) -> u64 {
    line.rsplit("ms=")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ms= in {line:?}"))
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Live children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// A self-signed server certificate for `localhost` and 127.0.0.1 made
/// by openssl in `dir`: the paths of the certificate and its key.
pub fn server_cert(dir: &Scratch, name: &str) -> (String, String) {
    let (cert, key) = (
        dir.path(&format!("{name}.pem")),
        dir.path(&format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // CA:FALSE: webpki (rustls) refuses a CA certificate as a server's.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-keyout", &key, "-out", &cert])
        .output()
        .expect("openssl (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The `hits` of each fault window a test's report lists, in order.
pub fn hits(test: &Value) -> Vec<u64> {
    test["faults"]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|f| f["hits"].as_u64().unwrap_or(u64::MAX))
                .collect()
        })
        .unwrap_or_default()
}
