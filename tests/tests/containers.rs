//! Container mode on the real Docker engine, under Docker's default
//! seccomp profile: `image=` and `build=` services each run with
//! faultbox-shim as their entrypoint, and the same spec language reaches
//! them with syscall and protocol faults. `scripts/setup` starts `dockerd`
//! and builds every image used here from Debian packages
//! (tests/images/README.md); nothing is pulled from beyond this machine.

mod support;

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faultbox_agent::rule::parse_fault;
use faultbox_agent::syscalls::Arch;
use faultbox_agent::wire::{self, ControlMessage, LaunchSpec, OnDisconnect, ShimMessage};
use serde_json::Value;
use support::*;

const BASE: &str = "faultbox/debian:bookworm";

/// Docker must answer and the test images must exist: `scripts/setup`
/// provides both, so a missing one is a loud failure, not a skip.
fn docker_ready() {
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    assert!(
        info.as_ref().is_ok_and(|o| o.status.success()),
        "Docker is not reachable (run scripts/setup, which installs docker.io and starts dockerd): {info:?}"
    );
    for image in [
        BASE,
        "faultbox/postgres:test",
        "faultbox/redis:test",
        "faultbox/redis-forking:test",
        "faultbox/http:test",
    ] {
        let found = Command::new("docker")
            .args(["image", "inspect", image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "image {image} is missing (scripts/setup builds it)"
        );
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("docker");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `faultbox test` on `text` with JSON output and extra environment.
fn run_with(dir: &Scratch, text: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let path = dir.path("spec.star");
    std::fs::write(&path, text).expect("write spec");
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "240"])
        .arg(faultbox())
        .args(["test", &path])
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    finish(cmd.output().expect("run faultbox"))
}

fn run(dir: &Scratch, text: &str) -> (i32, Value, String) {
    let r = run_with(dir, text, &["--format", "json"], &[]);
    let doc = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}\n{}", r.stdout, r.stderr));
    (r.code, doc, r.stderr)
}

fn test_of<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["tests"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {doc:#}"))
}

fn events<'a>(test: &'a Value, kind: &str, service: &str) -> Vec<&'a Value> {
    test["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == kind && e["service"] == service)
        .collect()
}

/// Containers and networks carrying Faultbox's labels, as `name owner`.
fn labelled() -> Vec<String> {
    let mut all: Vec<String> = docker(&[
        "ps",
        "-a",
        "--filter",
        "label=faultbox.run",
        "--format",
        "{{.Names}} {{.Label \"faultbox.owner\"}}",
    ])
    .lines()
    .map(str::to_string)
    .collect();
    all.extend(
        docker(&[
            "network",
            "ls",
            "--filter",
            "label=faultbox.run",
            "--format",
            "{{.Name}} {{.Label \"faultbox.owner\"}}",
        ])
        .lines()
        .map(str::to_string),
    );
    all
}

/// Labelled things whose owner (`boot:pidns:pid:start`) has `pid`.
fn owned_by(pid: u32) -> Vec<String> {
    let pid = pid.to_string();
    labelled()
        .into_iter()
        .filter(|l| {
            l.split(' ')
                .nth(1)
                .is_some_and(|o| o.split(':').nth(2) == Some(pid.as_str()))
        })
        .collect()
}

/// Nothing any finished run made is left (the tests run one at a time,
/// so nothing else is running).
fn assert_nothing_left() {
    let left: Vec<String> = labelled();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn the_shim_as_entrypoint_faults_a_target_inside_a_container() {
    docker_ready();
    let dir = Scratch::new("container-shim");
    let run = dir.path("run");
    std::fs::create_dir_all(&run).expect("run dir");
    let listener = UnixListener::bind(format!("{run}/control.sock")).expect("listen");
    // The container's root may differ from ours in nothing but policy:
    // let it connect whatever user it runs as.
    let _ = std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777));
    let _ = std::fs::set_permissions(
        format!("{run}/control.sock"),
        std::fs::Permissions::from_mode(0o777),
    );
    let name = format!("faultbox-test-shim-{}", std::process::id());
    let _cleanup = Container(name.clone());
    let mut docker = Command::new("docker")
        .args(["run", "--rm", "--name", &name, "--label", "faultbox.test=1"])
        .args(["--network", "none"])
        .arg("-v")
        .arg(format!("{}:/faultbox/shim:ro", shim().display()))
        .arg("-v")
        .arg(format!("{run}:/faultbox/run"))
        .args([
            BASE,
            "/faultbox/shim",
            "--control",
            "unix:/faultbox/run/control.sock",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker run");

    listener.set_nonblocking(true).expect("nonblocking");
    let started = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the shim in the container never connected: {e}"),
        }
    };
    stream.set_nonblocking(false).expect("blocking");
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = BufWriter::new(stream);
    let hello: Option<ShimMessage> = wire::recv(&mut reader).expect("hello");
    assert!(
        matches!(hello, Some(ShimMessage::Hello { version, .. }) if version == wire::PROTOCOL_VERSION),
        "{hello:?}"
    );
    let rule = parse_fault("openat=EACCES:100%:/etc/hostname", Arch::native()).expect("rule");
    let spec = LaunchSpec {
        // A bare name: the shim looks it up on the target's PATH.
        program: "cat".into(),
        argv: vec![
            "cat".into(),
            "/etc/hostname".into(),
            "/etc/debian_version".into(),
        ],
        env: vec!["PATH=/usr/bin:/bin".into()],
        rules: vec![rule],
        seed: 1,
        on_disconnect: OnDisconnect::StopTarget,
        stop_grace_ms: 500,
        ..LaunchSpec::default()
    };
    wire::send(&mut writer, &ControlMessage::Launch(Box::new(spec))).expect("launch");
    writer.flush().expect("flush");

    let mut denied = Vec::new();
    let mut other_opens = Vec::new();
    let exit = loop {
        match wire::recv::<_, ShimMessage>(&mut reader) {
            Ok(Some(ShimMessage::Syscall(e))) if e.syscall == "openat" => {
                let path = e.path.clone().unwrap_or_default();
                if e.decision.starts_with("deny") {
                    denied.push(path);
                } else {
                    other_opens.push(path);
                }
            }
            Ok(Some(ShimMessage::Exited { code, .. })) => break code,
            Ok(Some(ShimMessage::LaunchFailed { message, .. })) => {
                panic!("the shim could not launch in the container: {message}")
            }
            Ok(Some(_)) => {}
            other => panic!("the shim's stream ended early: {other:?}"),
        }
    };
    let status = docker.wait().expect("wait docker");
    let mut out = String::new();
    let mut err = String::new();
    let _ = docker
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out);
    let _ = docker
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);

    assert_eq!(
        exit,
        Some(1),
        "cat fails on the denied file: {err}; denied {denied:?}, allowed {other_opens:?}"
    );
    assert_eq!(denied, ["/etc/hostname"], "{other_opens:?}");
    assert!(
        other_opens.iter().any(|p| p == "/etc/debian_version"),
        "{other_opens:?}"
    );
    assert!(err.contains("/etc/hostname: Permission denied"), "{err}");
    assert!(out.starts_with("12."), "the other file was read: {out:?}");
    assert_eq!(
        status.code(),
        Some(1),
        "the container exits with its target"
    );
}

#[test]
fn postgres_in_a_container_panics_on_a_wal_fdatasync_fault_and_a_forked_redis_sees_its_aof_fault() {
    docker_ready();
    let dir = Scratch::new("pg-redis");
    let text = r#"
db = service("db",
    interface("main", "postgres", 5432),
    image = "faultbox/postgres:test",
    healthcheck = ready(timeout = "60s"),
    ops = {"wal_sync": op(syscalls = ["fsync"], path = "**/pg_wal/**")},
)
cache = service("cache",
    interface("main", "redis", 6379),
    image = "faultbox/redis-forking:test",
    healthcheck = tcp("localhost:6379"),
    ops = {"aof": op(syscalls = ["write"], path = "**/appendonlydir/*")},
)

def test_wal_fsync_eio():
    assert_true(db.main.exec(sql = "CREATE TABLE t (id int)").ok)
    r = fault(db, wal_sync = deny("EIO"), run = lambda: db.main.exec(sql = "INSERT INTO t VALUES (1)"))
    assert_true(not r.ok, "the INSERT must fail")
    assert_eventually(service = "db", op = "wal_sync", decision = "deny(input/output error)")
    return r.error

def test_aof_enospc():
    assert_eq(cache.main.send(data = "SET a 1"), "+OK")
    got = fault(cache, aof = deny("ENOSPC"), run = lambda: [cache.main.send(data = "SET b 2"), cache.main.send(data = "SET c 3"), cache.main.send(data = "GET a")])
    assert_eq(got[1], "-MISCONF Errors writing to the AOF file: No space left on device")
    assert_eq(got[2], "$1", "reads still work")
"#;
    let (code, doc, stderr) = run(&dir, text);
    assert_eq!(code, 0, "{stderr}\n{doc:#}");
    let wal = test_of(&doc, "test_wal_fsync_eio");
    assert_eq!(wal["faults"][0]["hits"], 1, "{wal:#}");
    let denied: Vec<&Value> = events(wal, "syscall", "db")
        .into_iter()
        .filter(|e| e["fields"]["decision"] == "deny(input/output error)")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["fields"]["syscall"], "fdatasync");
    let path = denied[0]["fields"]["path"].as_str().unwrap_or_default();
    assert!(
        path.starts_with("/var/lib/postgresql/data/pg_wal/"),
        "the path as the container sees it: {path}"
    );
    let seen = wal["return_value"].as_str().unwrap_or_default();
    assert!(
        seen.contains("could not fdatasync") || seen.contains("closed the connection"),
        "what the client saw: {seen}"
    );
    let started = events(wal, "service_started", "db");
    assert!(
        started[0]["fields"]["image"] == "faultbox/postgres:test"
            && started[0]["fields"]["container"]
                .as_str()
                .is_some_and(|c| c.starts_with("faultbox-")),
        "{started:?}"
    );

    let aof = test_of(&doc, "test_aof_enospc");
    let shell = events(aof, "service_started", "cache")[0]["fields"]["pid"].clone();
    let writes: Vec<&Value> = events(aof, "syscall", "cache")
        .into_iter()
        .filter(|e| e["fields"]["op"] == "aof" && e["fields"]["decision"] != "allow")
        .collect();
    assert!(!writes.is_empty(), "{aof:#}");
    assert!(
        writes.iter().all(|e| e["fields"]["pid"] != shell),
        "the faults reached the server the entrypoint forked, not the shell ({shell}): {writes:?}"
    );
    assert_nothing_left();
}

/// A host binary (a small HTTP service running psql) reaches the
/// container database by `.internal_addr`, rewritten to the proxy.
#[test]
fn a_host_binary_reaches_a_container_database_through_its_proxy() {
    docker_ready();
    let dir = Scratch::new("host-to-container");
    let app = dir.path("app.py");
    std::fs::write(
        &app,
        r#"#!/usr/bin/python3
import os, subprocess
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            out, status = b"ok", 200
        else:
            p = subprocess.run(["psql", os.environ["DATABASE_URL"], "-tAc", "SELECT 6 * 7"], capture_output=True)
            out = (p.stdout or p.stderr).strip()
            status = 200 if p.returncode == 0 else 500
        self.send_response(status)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#,
    )
    .expect("app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let text = format!(
        r#"
db = service("db",
    interface("main", "postgres", 5432),
    image = "faultbox/postgres:test",
    healthcheck = ready(timeout = "60s"),
)
port = free_port()
app = service("app", "{app}",
    interface("public", "http", port),
    env = {{"PORT": str(port), "DATABASE_URL": "postgres://postgres@" + db.main.internal_addr + "/postgres"}},
    depends_on = [db],
    healthcheck = http("localhost:%d/health" % port),
)

def test_through_the_proxy():
    assert_eq(app.public.get(path = "/answer").body, "42")
    r = fault(db.main, error(query = "SELECT*", code = "57P01", message = "terminating connection"), run = lambda: app.public.get(path = "/answer"))
    assert_eq(r.status, 500)
    assert_true("terminating connection" in r.body, r.body)
"#
    );
    let (code, doc, stderr) = run(&dir, &text);
    let t = test_of(&doc, "test_through_the_proxy");
    assert_eq!(code, 0, "{stderr}\n{t:#}");
    let proxy = events(t, "proxy_started", "db");
    let listen = proxy[0]["fields"]["listen"].as_str().unwrap_or_default();
    assert!(
        !listen.starts_with("127."),
        "the proxy listens where containers reach it too: {listen}"
    );
    assert_nothing_left();
}

/// A container reaches another by `.internal_addr` (rewritten to the
/// proxy), with a protocol fault between them; `args=`, `entrypoint=`,
/// `volumes=` and `ports=` take effect.
#[test]
fn containers_reach_each_other_through_a_faulted_proxy_and_overrides_apply() {
    docker_ready();
    let dir = Scratch::new("container-to-container");
    std::fs::write(dir.path("data/note.txt"), "from the host\n").expect("note");
    let fixed = free_port();
    let text = format!(
        r#"
backend = service("backend",
    interface("main", "http", 8080),
    image = "faultbox/http:test",
    args = ["one", "two"],
    healthcheck = http("localhost:8080/health"),
)
web = service("web",
    interface("public", "http", 9090),
    image = "faultbox/http:test",
    entrypoint = ["sh", "-c", "PORT=9090 exec python3 /usr/local/bin/server.py from-entrypoint"],
    env = {{"BACKEND": backend.main.internal_addr, "VIA_HOST": "host.docker.internal:" + backend.main.proxy_port}},
    volumes = {{"{data}": "/data"}},
    ports = {{9090: {fixed}}},
    depends_on = [backend],
    healthcheck = http("localhost:9090/health"),
)

def test_wiring():
    assert_eq(backend.main.internal_addr, "backend:8080")
    assert_eq(web.public.addr, "127.0.0.1:{fixed}")
    assert_eq(web.public.get(path = "/argv").body, "from-entrypoint")
    assert_eq(backend.main.get(path = "/argv").body, "one two")
    assert_eq(web.public.get(path = "/file?path=/data/note.txt").body.strip(), "from the host")
    assert_eq(web.public.get(path = "/fetch?env=BACKEND").body, "200 hello from backend")
    # host.docker.internal is the gateway, where the proxies listen.
    assert_eq(web.public.get(path = "/fetch?env=VIA_HOST").body, "200 hello from backend")
    r = fault(backend.main, error(path = "/hello", status = 503), run = lambda: web.public.get(path = "/fetch?env=BACKEND"))
    assert_eq(r.body[:3], "503")
    return web.public.get(path = "/env?name=BACKEND").body
"#,
        data = dir.path("data"),
    );
    let (code, doc, stderr) = run(&dir, &text);
    let t = test_of(&doc, "test_wiring");
    assert_eq!(code, 0, "{stderr}\n{t:#}");
    // The web container was given the proxy, not backend:8080.
    let given = t["return_value"].as_str().unwrap_or_default();
    let proxy = events(t, "proxy_started", "backend")[0]["fields"]["listen"].clone();
    assert_eq!(Some(given), proxy.as_str());
    // The fixed host port is released with the container.
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", fixed)).is_ok(),
        "port {fixed} is free again"
    );
    assert_nothing_left();
}

#[test]
fn build_services_are_built_once_and_reused_services_keep_their_container() {
    docker_ready();
    let dir = Scratch::new("build-reuse");
    let ctx = dir.path("svc");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        format!("{ctx}/Dockerfile"),
        "FROM faultbox/http:test\nENV HOSTNAME=ignored\nCOPY stamp /stamp\nCMD [\"built\"]\n",
    )
    .expect("dockerfile");
    // A context no earlier run built.
    std::fs::write(format!("{ctx}/stamp"), format!("{:?}", Instant::now())).expect("stamp");
    let text = r#"
svc = service("svc",
    interface("main", "http", 8080),
    build = "./svc",
    healthcheck = http("localhost:8080/health"),
)
cache = service("cache",
    interface("main", "redis", 6379),
    image = "faultbox/redis:test",
    reuse = True,
    healthcheck = tcp("localhost:6379"),
)

def test_a_first():
    assert_eq(svc.main.get(path = "/argv").body, "built")
    assert_eq(cache.main.send(data = "INCR n"), ":1")

def test_b_second():
    assert_eq(cache.main.send(data = "INCR n"), ":2", "the same container")

def test_c_shutdown():
    cache.main.command("SHUTDOWN", "NOSAVE")
    assert_eventually(type = "service_exited", service = "cache", timeout = "5s")

def test_d_after_the_crash():
    assert_eq(cache.main.send(data = "INCR n"), ":1", "a fresh container replaced the dead one")
"#;
    let first = run_with(&dir, text, &["--format", "json"], &[]);
    assert_eq!(first.code, 0, "{}\n{}", first.stderr, first.stdout);
    assert!(
        first.stderr.contains("building faultbox-svc:"),
        "{}",
        first.stderr
    );
    let doc: Value = serde_json::from_str(&first.stdout).expect("json");
    let b = test_of(&doc, "test_b_second");
    let again = events(b, "service_started", "cache");
    assert_eq!(again[0]["fields"]["reused"], "true", "{again:?}");
    let a = test_of(&doc, "test_a_first");
    assert_eq!(
        events(a, "service_started", "cache")[0]["fields"]["container"],
        again[0]["fields"]["container"]
    );
    assert_eq!(events(b, "service_ready", "cache").len(), 1);
    let d = test_of(&doc, "test_d_after_the_crash");
    let fresh = events(d, "service_started", "cache");
    assert!(fresh[0]["fields"].get("reused").is_none(), "{fresh:?}");
    assert_ne!(
        fresh[0]["fields"]["container"],
        again[0]["fields"]["container"]
    );
    // Unchanged context: no second build.
    let second = run_with(&dir, text, &["--format", "json"], &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(!second.stderr.contains("building"), "{}", second.stderr);
    assert_nothing_left();
}

/// `seccomp=False` runs the image as it is: protocol faults apply, syscall
/// faults are refused by name, and its death is still a crash.
#[test]
fn a_container_without_the_shim_is_still_watched() {
    docker_ready();
    let dir = Scratch::new("no-seccomp");
    let text = r#"
plain = service("plain",
    interface("main", "http", 8080),
    image = "faultbox/http:test",
    seccomp = False,
    entrypoint = ["sh", "-c", "python3 /usr/local/bin/server.py & sleep 2; exit 3"],
    healthcheck = http("localhost:8080/health"),
)

def test_a_protocol_fault():
    r = fault(plain.main, error(path = "/hello", status = 418), run = lambda: plain.main.get(path = "/hello"))
    assert_eq(r.status, 418)

def test_b_syscall_fault():
    fault(plain, write = deny("EIO"), run = lambda: None)

def test_c_dies():
    # Outlives the container's two seconds.
    fault(plain.main, delay(path = "/hello", delay = "4s"), run = lambda: plain.main.get(path = "/hello"))
"#;
    let (code, doc, stderr) = run(&dir, text);
    assert_eq!(code, 2, "{stderr}");
    let a = test_of(&doc, "test_a_protocol_fault");
    assert_eq!(a["result"], "pass", "{a:#}");
    assert!(
        events(a, "service_started", "plain")[0]["fields"]
            .get("pid")
            .is_none(),
        "no shim, no target pid"
    );
    let b = test_of(&doc, "test_b_syscall_fault");
    assert_eq!(b["result"], "fail");
    assert!(
        b["reason"]
            .as_str()
            .is_some_and(|r| r.contains("runs with seccomp=False")),
        "{b:#}"
    );
    let c = test_of(&doc, "test_c_dies");
    assert_eq!(c["result"], "error", "{c:#}");
    assert!(
        c["reason"]
            .as_str()
            .is_some_and(|r| r.contains("'plain' exited with code 3")),
        "{c:#}"
    );
    assert_nothing_left();
}

const HOLDING: &str = r#"
cache = service("cache",
    interface("main", "redis", 6379),
    image = "faultbox/redis:test",
    healthcheck = tcp("localhost:6379"),
)

def test_long():
    assert_eq(cache.main.send(data = "PING"), "+PONG")
    # Holds the body for two minutes.
    fault(cache.main, delay(command = "GET", delay = "120s"), run = lambda: cache.main.send(data = "GET k"))
"#;

/// A `faultbox test` of [`HOLDING`], once its container runs and the body
/// holds.
fn holding_run(dir: &Scratch) -> Child {
    let path = dir.path("spec.star");
    std::fs::write(&path, HOLDING).expect("spec");
    let victim: Child = Command::new(faultbox())
        .args(["test", &path])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("faultbox");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !owned_by(victim.id()).iter().any(|l| l.contains("-cache-")) {
        assert!(Instant::now() < deadline, "the container never appeared");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Ready, and the body holding.
    std::thread::sleep(Duration::from_secs(2));
    victim
}

#[test]
fn an_interrupted_run_removes_its_containers_and_network() {
    docker_ready();
    let dir = Scratch::new("sigint");
    let mut run = holding_run(&dir);
    // SIGINT is 2 on every Linux architecture.
    faultbox_agent::process::kill(run.id() as i32, 2);
    let status = run.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    assert_eq!(owned_by(run.id()), Vec::<String>::new());
}

/// A SIGKILLed faultbox cannot clean up; its containers stop with their
/// shims (they lose their controller) and the next run removes them.
#[test]
fn what_a_killed_run_leaves_the_next_run_removes() {
    docker_ready();
    let dir = Scratch::new("sigkill");
    let mut victim = holding_run(&dir);
    let victim_pid = victim.id();
    let mine = || owned_by(victim_pid);
    let _ = victim.kill();
    let _ = victim.wait();
    let left = mine();
    assert!(
        left.len() >= 2,
        "a container and a network remain: {left:?}"
    );
    let again = Scratch::new("sigkill-next");
    let next = r#"
def test_nothing():
    assert_true(True)
c = service("c", interface("main", "tcp", 6379), image = "faultbox/redis:test", healthcheck = tcp("localhost:6379"))
"#;
    let (code, _, stderr) = run(&again, next);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(mine(), Vec::<String>::new(), "the next run removed them");
}

#[test]
fn an_image_only_a_local_registry_has_is_pulled_and_a_dead_registry_is_named() {
    docker_ready();
    let dir = Scratch::new("registry");
    let port = free_port();
    std::fs::write(
        dir.path("registry.yml"),
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path("data")
        ),
    )
    .expect("config");
    let registry = Command::new("docker-registry")
        .args(["serve", &dir.path("registry.yml")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (scripts/setup installs it)");
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _registry = Kill(registry);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the registry never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let image = format!("127.0.0.1:{port}/faultbox/pulled:{}", std::process::id());
    docker(&["tag", "faultbox/http:test", &image]);
    let pushed = Command::new("docker")
        .args(["push", &image])
        .output()
        .expect("push");
    assert!(pushed.status.success(), "{pushed:?}");
    docker(&["rmi", &image]);
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            docker(&["rmi", &self.0]);
        }
    }
    let _rmi = Rmi(image.clone());
    let text = format!(
        r#"
web = service("web", interface("main", "http", 8080), image = "{image}", healthcheck = http("localhost:8080/health"))

def test_pulled():
    assert_eq(web.main.get(path = "/hello").body, "hello from web")
"#
    );
    let r = run_with(&dir, &text, &[], &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.stdout);
    assert!(
        r.stderr.contains(&format!("pulling image {image}")),
        "progress on stderr: {}",
        r.stderr
    );

    let dead = free_port();
    let text = format!(
        r#"
web = service("web", interface("main", "http", 8080), image = "127.0.0.1:{dead}/faultbox/none:1")

def test_never():
    pass
"#
    );
    let r = run_with(&dir, &text, &[], &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let line = r.stderr.lines().last().unwrap_or_default();
    let dead_line = line.to_string();
    assert!(
        line.contains(&format!("image \"127.0.0.1:{dead}/faultbox/none:1\""))
            && line.contains("could not be pulled")
            && line.contains(&format!("127.0.0.1:{dead}")),
        "{}",
        r.stderr
    );

    // A registry that accepts and never answers: the pull times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        silent.set_nonblocking(true).expect("nonblocking");
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok((c, _)) = silent.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let text = format!(
        "web = service(\"web\", interface(\"main\", \"http\", 8080), image = \"127.0.0.1:{port}/faultbox/slow:1\")\ndef test_never():\n    pass\n"
    );
    let t = Instant::now();
    let r = run_with(&dir, &text, &[], &[("FAULTBOX_PULL_TIMEOUT", "2")]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let line = r.stderr.lines().last().unwrap_or_default();
    assert!(
        line.contains("took longer than 2s") && line.contains("FAULTBOX_PULL_TIMEOUT"),
        "{} (dead registry said: {dead_line})",
        r.stderr
    );
    drop(held);
    assert_nothing_left();
}

/// Each bad input gives one line naming the thing and the fix, exit 1,
/// and leaves no container or network behind.
#[test]
fn bad_container_input_is_one_clear_line() {
    docker_ready();
    let dir = Scratch::new("container-errors");
    std::fs::create_dir_all(dir.path("empty")).expect("empty");
    std::fs::create_dir_all(dir.path("broken")).expect("broken");
    std::fs::write(
        dir.path("broken/Dockerfile"),
        "FROM faultbox/debian:bookworm\nRUN echo compiling; echo 'error: it does not build' >&2; exit 3\n",
    )
    .expect("dockerfile");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = busy.local_addr().expect("addr").port();
    // Exit 1: found before anything starts. Exit 2: only starting the
    // container shows it, and the test errors, as a binary that dies at
    // start does.
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, Vec<String>);
    let cases: Vec<Case> = vec![
        (
            r#"s = service("s", interface("m", "tcp", 1), image = "faultbox/http:test")"#.into(),
            vec![("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
            strings(&[
                "Docker is not reachable at unix:///nonexistent/docker.sock",
                "start dockerd",
                "DOCKER_HOST",
            ]),
        ),
        (
            r#"s = service("s", interface("m", "tcp", 1), build = "./empty")"#.into(),
            vec![],
            strings(&["build=\"./empty\" has no Dockerfile", "point build= at"]),
        ),
        (
            r#"s = service("s", interface("m", "tcp", 1), build = "./broken")"#.into(),
            vec![],
            strings(&["building \"./broken\" failed", "it does not build"]),
        ),
        (
            r#"s = service("s", interface("m", "tcp", 1), image = "faultbox/debian:bookworm")"#
                .into(),
            vec![],
            strings(&["has neither ENTRYPOINT nor CMD", "args=[...]"]),
        ),
        (
            format!(
                r#"s = service("s", interface("m", "http", 8080), image = "faultbox/http:test", ports = {{8080: {busy_port}}})"#
            ),
            vec![],
            vec![format!("host port {busy_port} is already in use")],
        ),
        (
            r#"s = service("s", interface("m", "tcp", 1), image = "faultbox/http:test", entrypoint = ["sh", "-c", "echo boom; exit 7"])"#.into(),
            vec![],
            strings(&["service 's' exited with code 7"]),
        ),
        (
            r#"s = service("s", interface("m", "tcp", 1), image = "faultbox/http:test", entrypoint = ["no-such-program"])"#.into(),
            vec![],
            strings(&["\"no-such-program\" was not found on the target's PATH"]),
        ),
    ];
    for (decl, env, wants) in cases {
        let wants: Vec<&str> = wants.iter().map(String::as_str).collect();
        let text = format!("{decl}\n\ndef test_x():\n    pass\n");
        let r = run_with(&dir, &text, &[], &env);
        let at_start = decl.contains("entrypoint");
        assert_eq!(r.code, if at_start { 2 } else { 1 }, "{decl}: {}", r.stderr);
        // One line says it all.
        let line = r
            .stderr
            .lines()
            .find(|l| l.contains(wants[0]))
            .unwrap_or_else(|| panic!("{decl}: no line with {:?} in {}", wants[0], r.stderr));
        for want in &wants {
            assert!(line.contains(want), "{decl}: wanted {want:?} in {line}");
        }
        if decl.contains("boom") {
            assert!(
                r.stderr.contains("Its last output:\n    boom"),
                "{}",
                r.stderr
            );
        }
        assert_nothing_left();
    }
    drop(busy);

    // Mistakes a spec makes are load errors, before Docker is asked.
    for (decl, want) in [
        (
            r#"service("s", "/bin/true", interface("m", "tcp", 1), image = "x")"#,
            "image= runs a container, so there is no binary",
        ),
        (
            r#"service("s", interface("m", "tcp", 1), image = "x", remote = "h:1", healthcheck = tcp("h:1"))"#,
            "remote= names a service elsewhere; use one",
        ),
        (
            r#"service("s", interface("m", "tcp", 1), image = "x", build = "./y")"#,
            "image= and build= both given",
        ),
        (
            r#"service("s", "/bin/true", interface("m", "tcp", 1), ports = {1: 2})"#,
            "ports= publishes a container's ports",
        ),
    ] {
        let r = run_with(
            &dir,
            &format!("{decl}\n"),
            &["--dry-run"],
            &[("DOCKER_HOST", "unix:///nonexistent")],
        );
        assert_ne!(r.code, 0, "{decl}");
        assert!(r.stderr.contains(want), "{decl}: {}", r.stderr);
    }
    // --dry-run never talks to Docker.
    let r = run_with(
        &dir,
        "s = service(\"s\", interface(\"m\", \"tcp\", 1), image = \"faultbox/http:test\")\ndef test_x():\n    pass\n",
        &["--dry-run"],
        &[("DOCKER_HOST", "unix:///nonexistent")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}
