//! `faultbox test` end to end: specs against real services (the helper's
//! `serve` mode, the demo services, and bad input), checked through the
//! exit code, the JSON document and the human summary.
//!
//! Run serially (`--test-threads=1`): every test starts real processes
//! under seccomp and some bind fixed ports.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Run, Scratch, faultbox, faultbox_raw, finish, helper};

/// A free TCP port on loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A spec with one helper service `svc` on a fresh port, its WAL in the
/// scratch dir, followed by `body`.
fn spec_with_service(dir: &Scratch, extra_kwargs: &str, body: &str) -> (String, u16) {
    let port = free_port();
    let wal = dir.path("data/svc.wal");
    let text = format!(
        r#"
svc = service(
    "svc",
    "{helper}",
    interface("main", "tcp", {port}),
    args = ["serve", "{port}", "{wal}"],
    healthcheck = tcp("localhost:{port}", timeout = "5s"),
    {extra_kwargs}
)

def persist():
    return svc.main.send(data = "PERSIST x")

{body}
"#,
        helper = helper(),
    );
    (text, port)
}

/// Writes `text` as `spec.star` in `dir` and runs `faultbox test` on it.
fn run_spec(dir: &Scratch, text: &str, args: &[&str]) -> Run {
    let path = dir.path("spec.star");
    std::fs::write(&path, text).expect("write spec");
    run_file(&path, args)
}

fn run_file(path: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "120"])
        .arg(faultbox())
        .arg("test")
        .arg(path)
        .args(args);
    finish(cmd.output().expect("run faultbox test"))
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        )
    })
}

/// Runs `text` with `--format json`, checks the exit code and returns the
/// report.
fn json_run(dir: &Scratch, text: &str, code: i32) -> (Run, Value) {
    let run = run_spec(dir, text, &["--format", "json"]);
    assert_eq!(run.code, code, "{}", run.stderr);
    let doc = json(&run);
    (run, doc)
}

fn test_named<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["tests"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no test {name} in {doc:#}"))
}

fn codes(test: &Value) -> Vec<String> {
    test["diagnostics"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|x| x["code"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn demo_spec_passes_every_story_with_faults_that_fire() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.star");
    let run = run_file(
        &spec.to_string_lossy(),
        &["--format", "json", "--seed", "7"],
    );
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let doc = json(&run);
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["pass"], 6);
    assert_eq!(doc["fail"], 0);
    let fsync = test_named(&doc, "test_wal_fsync_failure");
    assert_eq!(fsync["result"], "pass");
    assert_eq!(fsync["seed"], 7);
    assert_eq!(fsync["faults"][0]["service"], "inventory");
    assert_eq!(fsync["faults"][0]["syscall"], "fsync");
    assert_eq!(fsync["faults"][0]["action"], "deny");
    assert_eq!(fsync["faults"][0]["errno"], "EIO");
    assert_eq!(fsync["faults"][0]["hits"], 1);
    assert_eq!(fsync["faults"][0]["label"], "disk failure");
    let unreachable = test_named(&doc, "test_inventory_unreachable");
    assert_eq!(unreachable["faults"][0]["hits"], 1);
    let slow = test_named(&doc, "test_inventory_slow");
    let delayed: Vec<&Value> = slow["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "syscall" && e["fields"]["decision"] == "delay(500ms)")
        .collect();
    assert_eq!(delayed.len(), 1, "{slow:#}");
    assert_eq!(delayed[0]["fields"]["latency_ms"], "500");
    // Every test ran against fresh services: the stock check in the fsync
    // test saw the full 100 although other tests reserved before it.
    assert!(
        run.stderr.contains("--- PASS: test_happy_path"),
        "{}",
        run.stderr
    );
}

#[test]
fn fsync_fault_reaches_the_service_and_is_counted() {
    let dir = Scratch::new("spec-fsync");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_fsync_eio():
    r = fault(svc, fsync = deny("EIO"), run = persist)
    assert_eq(r, "ERR EIO")
    assert_eq(persist(), "OK", "the fault window is closed")
"#,
    );
    let (_, doc) = json_run(&dir, &text, 0);
    let t = test_named(&doc, "test_fsync_eio");
    assert_eq!(t["faults"][0]["hits"], 1);
    assert_eq!(t["assertions"], 2);
    let denied: Vec<&Value> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "syscall" && e["fields"]["decision"] == "deny(input/output error)")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["fields"]["syscall"], "fsync");
    assert!(
        denied[0]["fields"]["path"]
            .as_str()
            .unwrap_or("")
            .ends_with("svc.wal")
    );
    assert!(denied[0]["vector_clock"]["svc"].as_u64().unwrap_or(0) > 0);
    let kinds: Vec<&str> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .filter(|k| *k != "syscall" && !k.starts_with("proxy_conn"))
        .collect();
    assert_eq!(
        kinds,
        [
            "service_started",
            "service_ready",
            "proxy_started",
            "fault_applied",
            "step_send",
            "step_recv",
            "fault_removed",
            "step_send",
            "step_recv",
            "service_exited"
        ]
    );
}

/// `--normalize` twice (different generated seeds, pids, inodes, log
/// directories) gives the same file and `faultbox diff` says so; a run with
/// a fault gives a diff naming the line; `--shiviz` gives a log ShiViz's
/// regex splits into valid clocks. And the bad inputs.
#[test]
fn normalized_traces_compare_across_runs_and_diff_names_the_change() {
    let dir = Scratch::new("spec-normalize");
    let body = |fsync: &str| {
        format!(
            r#"
def test_persist():
    assert_eq({fsync}, "OK")
    assert_eq(persist(), "OK")
"#
        )
    };
    // Both intercept fsync (a fault window each); they differ in its
    // decision.
    let (plain, _) = spec_with_service(
        &dir,
        "",
        &body("fault(svc, fsync = delay(\"1ms\"), run = persist)"),
    );
    let faulted = plain.replace(
        "assert_eq(fault(svc, fsync = delay(\"1ms\"), run = persist), \"OK\")",
        "assert_eq(fault(svc, fsync = deny(\"EIO\"), run = persist), \"ERR EIO\")",
    );
    assert_ne!(plain, faulted);
    let (a, b, c) = (dir.path("a.norm"), dir.path("b.norm"), dir.path("c.norm"));
    let viz = dir.path("run.shiviz");
    for (text, out, extra) in [
        (&plain, &a, vec!["--shiviz", viz.as_str()]),
        (&plain, &b, vec![]),
        (&faulted, &c, vec![]),
    ] {
        let mut args = vec!["--normalize", out.as_str()];
        args.extend(extra);
        let run = run_spec(&dir, text, &args);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    let diff = |x: &str, y: &str| faultbox_raw(&["diff", x, y]);
    let same = diff(&a, &b);
    assert_eq!(
        (same.code, same.stdout.as_str()),
        (0, "traces are identical\n"),
        "{}",
        same.stderr
    );
    let text = std::fs::read_to_string(&a).expect("a.norm");
    assert!(
        text.starts_with("=== test_persist ===\n--- svc ---\nservice_started\n"),
        "{text}"
    );
    assert!(
        text.contains("fault_applied\nfsync delay(1ms) $SPEC/data/svc.wal\nfault_removed\n"),
        "{text}"
    );
    assert!(!text.contains("pid"), "{text}");

    let changed = diff(&a, &c);
    assert_eq!(changed.code, 2, "{}", changed.stdout);
    assert!(
        changed.stdout.starts_with("traces differ ("),
        "{}",
        changed.stdout
    );
    assert!(
        changed.stdout.contains(&format!(
            "  test_persist / svc, line {}:\n",
            1 + text
                .lines()
                .position(|l| l.starts_with("fsync delay"))
                .expect("the fsync line")
        )),
        "{}",
        changed.stdout
    );
    assert!(
        changed
            .stdout
            .contains("    + fsync deny(input/output error) $SPEC/data/svc.wal"),
        "{}",
        changed.stdout
    );
    assert!(
        changed
            .stdout
            .contains("    - fsync delay(1ms) $SPEC/data/svc.wal"),
        "{}",
        changed.stdout
    );

    // The ShiViz log: the regex line, an empty line, then `host {clock}
    // event` lines whose clocks grow per host.
    let log = std::fs::read_to_string(&viz).expect("shiviz");
    let mut lines = log.lines();
    assert_eq!(
        lines.next(),
        Some(r"(?<host>\S+) (?<clock>\{.*?\}) (?<event>.*)")
    );
    assert_eq!(lines.next(), Some(""));
    let mut last: std::collections::BTreeMap<String, u64> = Default::default();
    let mut n = 0;
    for l in lines {
        let (host, rest) = l.split_once(' ').expect("host");
        let end = rest.find('}').expect("clock") + 1;
        let clock: std::collections::BTreeMap<String, u64> =
            serde_json::from_str(&rest[..end]).expect("clock json");
        let own = clock[host];
        assert_eq!(own, last.get(host).copied().unwrap_or(0) + 1, "{l}");
        last.insert(host.to_string(), own);
        n += 1;
    }
    assert!(
        n > 5 && last.contains_key("svc") && last.contains_key("test"),
        "{log}"
    );

    // Bad input: a missing file, a file that is no trace, an unwritable
    // --normalize (refused before anything runs).
    let missing = diff(&a, &dir.path("nope.norm"));
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    assert!(missing.stderr.contains("nope.norm"), "{}", missing.stderr);
    let notes = dir.file("notes.txt");
    let junk = diff(&a, &notes);
    assert_eq!(junk.code, 1);
    assert!(
        junk.stderr.contains("notes.txt is not a normalized trace"),
        "{}",
        junk.stderr
    );
    let started = Instant::now();
    let bad = run_spec(&dir, &plain, &["--normalize", "/nonexistent/dir/x.norm"]);
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(
        bad.stderr
            .contains("cannot write the trace to /nonexistent/dir/x.norm"),
        "{}",
        bad.stderr
    );
    assert!(!bad.stderr.contains("PASS"), "nothing ran: {}", bad.stderr);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// `faultbox check`: the demo is clean (exit 0); a syntax error, an
/// unknown keyword and a `--test` that matches nothing are error findings
/// (exit 2) with their codes, in text and JSON; a missing file is exit 1.
#[test]
fn check_reports_findings_with_codes_and_exit_codes() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.star");
    let demo = demo.to_string_lossy();
    let clean = faultbox_raw(&["check", &demo]);
    assert_eq!(clean.code, 0, "{}", clean.stderr);
    assert!(
        clean
            .stdout
            .contains("2 services, 6 tests, 0 errors, 0 warnings"),
        "{}",
        clean.stdout
    );
    let dir = Scratch::new("check");
    let syntax = dir.path("syntax.star");
    std::fs::write(&syntax, "def test_a(:\n    pass\n").expect("write");
    let run = faultbox_raw(&["check", &syntax]);
    assert_eq!(run.code, 2);
    assert!(
        run.stdout.starts_with("error: [SPEC_SYNTAX] "),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("syntax.star:1:12"), "{}", run.stdout);
    let kwarg = dir.path("kwarg.star");
    std::fs::write(&kwarg, "service(\"a\", \"/bin/true\", healthchek = 1)\n").expect("write");
    let run = faultbox_raw(&["check", &kwarg, "--format", "json"]);
    assert_eq!(run.code, 2);
    let doc: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["findings"][0]["code"], "SPEC_LOAD_FAILED");
    assert!(
        doc["findings"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("healthchek")),
        "{doc:#}"
    );
    let run = faultbox_raw(&["check", &demo, "--test", "nope", "--format", "json"]);
    assert_eq!(run.code, 2);
    let doc: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(doc["findings"][0]["code"], "NO_MATCHING_TEST");
    assert_eq!(doc["tests"].as_array().map(Vec::len), Some(6));
    let missing = faultbox_raw(&["check", &dir.path("nope.star")]);
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("no such spec file"),
        "{}",
        missing.stderr
    );
}

/// `await_event` returns a real service's event, `await_stable` waits
/// for its quiet, `sleep` waits, and a sleep past `--timeout` is refused
/// at once with what the test has left.
#[test]
fn waiting_builtins_work_on_a_real_trace() {
    let dir = Scratch::new("spec-waits");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_waits():
    assert_eq(fault(svc, fsync = delay("1ms"), run = persist), "OK")
    e = await_event(type = "syscall", syscall = "fsync", timeout = "5s")
    assert_true(e.path.endswith("svc.wal"), e.path)
    assert_eq(e.service, "svc")
    await_stable(quiescence_window = "200ms", timeout = "5s")
    sleep("50ms")
    assert_eq(eventually(lambda e: e.syscall == "fsync").seq, e.seq)

def test_always_denied():
    always(lambda e: not e.decision.startswith("deny"), during = lambda: fault(svc, fsync = deny("EIO"), run = persist))

def test_oversleeps():
    sleep("10m")
"#,
    );
    let started = Instant::now();
    let run = run_spec(&dir, &text, &["--format", "json", "--timeout", "5s"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let doc = json(&run);
    assert_eq!(test_named(&doc, "test_waits")["result"], "pass", "{doc:#}");
    let denied = test_named(&doc, "test_always_denied");
    assert_eq!(denied["result"], "fail", "{denied:#}");
    assert!(
        denied["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("always: event #") && r.contains("fsync")),
        "{denied:#}"
    );
    let over = test_named(&doc, "test_oversleeps");
    assert_ne!(over["result"], "pass");
    let reason = over["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("sleep(600s): the test has") && reason.contains("--timeout"),
        "{reason}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused at once"
    );
}

/// A call the window decided belongs to it even when its event comes
/// after the window closed: a delayed fsync still held when `fault()`
/// returns is counted from the shim's own counters, not from the trace.
#[test]
fn a_call_still_held_when_its_window_closes_counts_as_a_hit() {
    let dir = Scratch::new("spec-late");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_late():
    r = fault(svc, fsync = delay("600ms"), run = lambda: svc.main.send(data = "PERSIST_LATER a"))
    assert_eq(r, "OK")
    svc.main.send(data = "SLEEP 900")
    assert_eventually(service = "svc", syscall = "fsync", decision = "delay*")
"#,
    );
    let (_, doc) = json_run(&dir, &text, 0);
    let t = test_named(&doc, "test_late");
    assert_eq!(t["faults"][0]["hits"], 1, "{t:#}");
    assert!(!codes(t).contains(&"FAULT_NOT_FIRED".to_string()), "{t:#}");
    let kinds: Vec<&str> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| {
            e["type"] == "fault_removed"
                || (e["type"] == "syscall" && e["fields"]["syscall"] == "fsync")
        })
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(kinds, ["fault_removed", "syscall"], "the event came late");
}

#[test]
fn nth_trigger_and_stacked_windows_keep_their_counts() {
    let dir = Scratch::new("spec-stack");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_nth():
    got = fault(svc, fsync = deny("EIO", trigger = "nth=3"), run = lambda: [persist() for _ in range(4)])
    assert_eq(got, ["OK", "OK", "ERR EIO", "OK"])

def test_after():
    got = fault(svc, fsync = deny("EIO", trigger = "after=2"), run = lambda: [persist() for _ in range(4)])
    assert_eq(got, ["OK", "OK", "ERR EIO", "ERR EIO"])

def test_stack():
    fault_start(svc, fsync = deny("EIO", trigger = "nth=2"))
    first = persist()
    inner = fault(svc, fsync = deny("ENOSPC"), run = persist)
    second = persist()
    fault_stop(svc)
    after = persist()
    assert_eq([first, inner, second, after], ["OK", "ERR ENOSPC", "ERR EIO", "OK"])
"#,
    );
    let (_, doc) = json_run(&dir, &text, 0);
    assert_eq!(test_named(&doc, "test_nth")["faults"][0]["hits"], 1);
    assert_eq!(test_named(&doc, "test_after")["faults"][0]["hits"], 2);
    let stack = test_named(&doc, "test_stack");
    let hits = support::hits(stack);
    assert_eq!(hits, [1, 1], "inner then outer: {stack:#}");
}

#[test]
fn probabilities_replay_for_the_same_seed() {
    let dir = Scratch::new("spec-seed");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_flaky():
    got = fault(svc, fsync = deny("EIO", probability = "50%"), run = lambda: [persist() for _ in range(24)])
    print("RESULTS " + ",".join(got))
    return got
"#,
    );
    let results = |seed: &str| {
        let run = run_spec(&dir, &text, &["--seed", seed]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        run.stderr
            .lines()
            .find(|l| l.starts_with("RESULTS "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no RESULTS line in {}", run.stderr))
    };
    let a = results("11");
    assert_eq!(a, results("11"), "same seed, same decisions");
    assert!(a.contains("ERR EIO") && a.contains("OK"), "{a}");
    assert_ne!(a, results("12"), "another seed, other decisions");
}

#[test]
fn ops_with_a_path_glob_fault_only_those_files() {
    let dir = Scratch::new("spec-ops");
    let other = dir.file("data/config.txt");
    let (text, _) = spec_with_service(
        &dir,
        r#"ops = {"persist": op(syscalls = ["write", "fsync"], path = "*.wal"), "read_config": op(syscalls = ["open"])},"#,
        &format!(
            r#"
def test_ops():
    def body():
        return [persist(), svc.main.send(data = "OPEN {other}")]
    assert_eq(fault(svc, persist = deny("ENOSPC"), run = body), ["ERR ENOSPC", "OK"])
    assert_eq(fault(svc, read_config = deny("EACCES"), run = body)[1], "ERR EACCES")
"#
        ),
    );
    let (_, doc) = json_run(&dir, &text, 0);
    let t = test_named(&doc, "test_ops");
    let op_events: Vec<&Value> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["fields"]["op"] == "persist")
        .collect();
    assert_eq!(op_events.len(), 1, "{t:#}");
    assert_eq!(op_events[0]["fields"]["syscall"], "write");
}

#[test]
fn failing_assertion_is_reported_with_location_reason_and_replay() {
    let dir = Scratch::new("spec-fail");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_expects_too_much():
    r = fault(svc, fsync = deny("EIO"), run = persist)
    assert_eq(r, "OK", "writes must survive")
"#,
    );
    let run = run_spec(&dir, &text, &["--format", "json", "--seed", "3"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let doc = json(&run);
    let t = test_named(&doc, "test_expects_too_much");
    assert_eq!(t["result"], "fail");
    assert_eq!(t["failure_type"], "assertion");
    assert_eq!(
        t["reason"],
        "assert_eq failed: \"ERR EIO\" != \"OK\" (writes must survive)"
    );
    assert_eq!(t["assertion"]["func"], "assert_eq");
    assert_eq!(t["assertion"]["expected"], "\"OK\"");
    assert!(
        t["assertion"]["line"].as_u64().is_some_and(|l| l > 10),
        "{t:#}"
    );
    assert!(codes(t).contains(&"ASSERTION_MISMATCH".to_string()));
    let spec = dir.path("spec.star");
    let replay = format!("faultbox test {spec} --test expects_too_much --seed 3");
    assert_eq!(t["replay_command"], replay.as_str());
    assert!(
        run.stderr.contains("--- FAIL: test_expects_too_much ("),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!("  replay: {replay}")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("0 passed, 1 failed"), "{}", run.stderr);
}

#[test]
fn event_assertions_filter_and_order_the_trace() {
    let dir = Scratch::new("spec-events");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_events():
    fault(svc, fsync = deny("EIO", label = "disk"), run = persist)
    persist()
    assert_eventually(service = "svc", syscall = "fsync", decision = "deny*")
    assert_eventually(where = lambda e: e.label == "disk")
    assert_never(service = "svc", syscall = "fsync", decision = "delay*")
    assert_before(first = {"type": "fault_applied"}, then = {"syscall": "fsync", "decision": "allow"})
    denied = events(syscall = "fsync", where = lambda e: e.decision.startswith("deny"))
    assert_eq(len(denied), 1)
    assert_eq(denied[0].service, "svc")
    assert_true(denied[0].path.endswith(".wal"), message = denied[0].path)

def test_never_fails():
    fault(svc, fsync = deny("EIO"), run = persist)
    assert_never(syscall = "fsync", decision = "deny*")
"#,
    );
    let (_, doc) = json_run(&dir, &text, 2);
    let ok = test_named(&doc, "test_events");
    assert_eq!(ok["result"], "pass", "{ok:#}");
    assert_eq!(ok["assertions"], 7);
    let never = test_named(&doc, "test_never_fails");
    assert!(
        never["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("assert_never: found matching event #")),
        "{never:#}"
    );
}

#[test]
fn http_steps_healthchecks_env_and_loaded_modules_work_together() {
    let dir = Scratch::new("spec-http");
    let port = free_port();
    std::fs::write(
        dir.path("lib.star"),
        "def greet(name):\n    return struct(text = \"hi \" + name)\n",
    )
    .expect("lib");
    std::fs::create_dir_all(dir.path("conf")).expect("conf dir");
    std::fs::write(
        dir.path("conf/settings.json"),
        r#"{"mode": "strict", "n": 3}"#,
    )
    .expect("json");
    std::fs::write(
        dir.path("conf/settings.yaml"),
        "mode: relaxed\nlist: [1, 2]\n",
    )
    .expect("yaml");
    std::fs::write(
        dir.path("conf/helpers.star"),
        "load(\"nested.star\", \"base\")\nsettings = load_json(\"settings.json\")\nassert_eq(base, 1)\n",
    )
    .expect("helpers");
    std::fs::write(dir.path("conf/nested.star"), "base = 1\n").expect("nested");
    let text = format!(
        r#"
load("lib.star", "greet")
load("conf/helpers.star", "settings")
yaml = load_yaml("conf/settings.yaml")

web = service(
    "web",
    "{helper}",
    interface("http", "http", {port}),
    args = ["serve", "{port}"],
    env = {{"GREETING": "from-spec", "COUNT": 3}},
    healthcheck = http("localhost:{port}/health", expect_status = 200),
)

def test_http():
    r = web.get(path = "/orders/7")
    assert_eq(r.status, 200)
    assert_eq(r.data["path"], "/orders/7")
    assert_true(r.ok)
    missing = web.http.get(path = "/missing")
    assert_eq(missing.status, 404)
    assert_eq(web.http.addr, "localhost:{port}")
    assert_eq(web.http.port, {port})
    assert_eq(greet("x").text, "hi x")
    assert_eq(settings["mode"], "strict")
    assert_eq(yaml["list"], [1, 2])

def test_env_wins_over_inherited():
    assert_eq(web.get(path = "/env/GREETING").data["env"], "from-spec")
    assert_eq(web.get(path = "/env/COUNT").data["env"], "3")
    assert_eq(web.get(path = "/env/OUTER_ONLY").data["env"], "kept")
"#,
        helper = helper(),
    );
    let path = dir.path("spec.star");
    std::fs::write(&path, text).expect("spec");
    let out = Command::new(faultbox())
        .args(["test", &path, "--format", "json"])
        .env("GREETING", "from-shell")
        .env("OUTER_ONLY", "kept")
        .output()
        .expect("run");
    let run = finish(out);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = json(&run);
    let t = test_named(&doc, "test_http");
    assert_eq!(t["result"], "pass");
    let recv: Vec<&Value> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "step_recv")
        .collect();
    assert_eq!(recv[0]["fields"]["status_code"], "200");
    assert_eq!(recv[0]["event_type"], "step_recv.web");
    // The test's clock absorbed the service's after the step.
    assert!(
        recv[0]["vector_clock"]["web"].as_u64().unwrap_or(0) >= 2,
        "{:#}",
        recv[0]
    );
}

fn http_service_spec(body: &str) -> (String, u16) {
    let port = free_port();
    let text = format!(
        r#"
web = service(
    "web",
    "{helper}",
    interface("api", "http", {port}),
    args = ["serve", "{port}"],
    healthcheck = http("localhost:{port}/health"),
)
{body}
"#,
        helper = helper(),
    );
    (text, port)
}

#[test]
fn a_crashed_service_is_an_error_unless_the_test_asserts_it() {
    let dir = Scratch::new("spec-crash");
    let (text, _) = http_service_spec(
        r#"
def test_crash_unexpected():
    r = web.get(path = "/exit")
    assert_true(not r.ok, "the request died with the service")

def test_crash_expected():
    r = web.get(path = "/exit")
    assert_true(not r.ok)
    assert_eventually(type = "service_exited", service = "web", exit_code = "3", timeout = "3s")
"#,
    );
    let (_, doc) = json_run(&dir, &text, 2);
    let t = test_named(&doc, "test_crash_unexpected");
    assert_eq!(t["result"], "error", "{t:#}");
    assert_eq!(t["failure_type"], "service_crashed");
    assert_eq!(
        t["reason"],
        "service 'web' exited with code 3 during the test"
    );
    assert!(codes(t).contains(&"SERVICE_CRASHED".to_string()), "{t:#}");
    let t = test_named(&doc, "test_crash_expected");
    assert_eq!(t["result"], "pass", "{t:#}");
    assert!(!codes(t).contains(&"SERVICE_CRASHED".to_string()), "{t:#}");
}

#[test]
fn healthcheck_timeout_and_hung_body_are_distinct_errors() {
    let dir = Scratch::new("spec-hang");
    let port = free_port();
    let listens = free_port();
    // The service listens on another port than its healthcheck probes.
    let text = format!(
        r#"
svc = service(
    "svc",
    "{helper}",
    interface("main", "tcp", {port}),
    args = ["serve", "{listens}"],
    healthcheck = tcp("localhost:{port}", timeout = "700ms"),
)

def test_never_ready():
    pass
"#,
        helper = helper(),
    );
    let started = Instant::now();
    let run = run_spec(&dir, &text, &["--format", "json"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let t = test_named(&json(&run), "test_never_ready").clone();
    assert_eq!(t["result"], "error");
    assert_eq!(t["failure_type"], "service_start");
    assert!(
        codes(&t).contains(&"HEALTHCHECK_TIMEOUT".to_string()),
        "{t:#}"
    );
    assert!(
        t["reason"]
            .as_str()
            .is_some_and(|r| r.contains("healthcheck tcp://localhost:")
                && r.contains("did not pass within 700ms")),
        "{t:#}"
    );

    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_hangs():
    svc.main.send(data = "SLEEP 20000", timeout = "30s")
"#,
    );
    let run = run_spec(&dir, &text, &["--format", "json", "--timeout", "1s"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let t = test_named(&json(&run), "test_hangs").clone();
    assert_eq!(t["result"], "error", "{t:#}");
    assert_eq!(t["failure_type"], "timeout");
    assert!(
        codes(&t).contains(&"TIMEOUT_NO_FAULTS".to_string()),
        "{t:#}"
    );
    assert!(
        started.elapsed().as_secs() < 20,
        "took {:?}",
        started.elapsed()
    );
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(marker) {
            found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn no_process_is_left_behind_after_failures_and_timeouts() {
    let dir = Scratch::new("spec-leftovers");
    let (text, port) = spec_with_service(
        &dir,
        "",
        r#"
def test_fails():
    fault_start(svc, fsync = deny("EIO"))
    fail("boom")

def test_hangs():
    svc.main.send(data = "SLEEP 20000", timeout = "30s")
"#,
    );
    let run = run_spec(&dir, &text, &["--timeout", "1s"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let left = processes_with(&format!("serve {port}"));
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        run.stderr.contains("reason: fail: boom (at "),
        "{}",
        run.stderr
    );
}

#[test]
fn runs_use_successive_seeds_and_show_fail_hides_passes() {
    let dir = Scratch::new("spec-runs");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_ok():
    assert_eq(persist(), "OK")
"#,
    );
    let run = run_spec(&dir, &text, &["--format", "json", "--runs", "3"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let seeds: Vec<u64> = json(&run)["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .filter_map(|t| t["seed"].as_u64())
        .collect();
    assert_eq!(seeds, [0, 1, 2]);
    assert!(
        run.stderr.contains("--- PASS: test_ok (3/3 runs) ---"),
        "{}",
        run.stderr
    );
    let run = run_spec(
        &dir,
        &text,
        &["--format", "json", "--runs", "2", "--show", "fail"],
    );
    assert_eq!(run.code, 0);
    assert_eq!(json(&run)["tests"].as_array().map(Vec::len), Some(0));
    assert!(!run.stderr.contains("--- PASS"), "{}", run.stderr);
}

#[test]
fn unfired_faults_warn_and_print_the_zero_traffic_block() {
    let dir = Scratch::new("spec-zero");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_quiet():
    fault(svc, fsync = deny("EIO"), run = lambda: svc.main.send(data = "PING"))
"#,
    );
    let (run, doc) = json_run(&dir, &text, 0);
    let t = test_named(&doc, "test_quiet");
    let c = codes(t);
    assert!(c.contains(&"FAULT_NOT_FIRED".to_string()), "{c:?}");
    assert!(c.contains(&"TEST_NO_ASSERTIONS".to_string()), "{c:?}");
    assert!(
        t["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["type"] == "fault_zero_traffic" && e["fields"]["syscall"] == "fsync")
    );
    assert!(
        run.stderr
            .contains("Zero-traffic faults (1): rule installed, matched no syscalls"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("test_quiet — svc.fsync (deny)"),
        "{}",
        run.stderr
    );
}

#[test]
fn dry_run_lists_without_starting_anything() {
    let dir = Scratch::new("spec-dry");
    let (text, port) = spec_with_service(
        &dir,
        "",
        "def test_b():\n    pass\n\ndef test_a():\n    pass\n\ndef helper_not_a_test():\n    pass\n",
    );
    let run = run_spec(&dir, &text, &["--dry-run"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("Services: 1\n  - svc"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("Tests: 2\n  - test_a\n  - test_b\n"),
        "{}",
        run.stdout
    );
    assert!(processes_with(&format!("serve {port}")).is_empty());
    let run = run_spec(&dir, &text, &["--dry-run", "--test", "b"]);
    assert!(
        run.stdout.contains("Tests: 1\n  - test_b\n"),
        "{}",
        run.stdout
    );
    let run = run_spec(&dir, &text, &["--dry-run", "--test", "~_b$"]);
    assert!(
        run.stdout.contains("Tests: 1\n  - test_b\n"),
        "{}",
        run.stdout
    );
    refused_saying(
        "bad-regex",
        &text,
        &["--dry-run", "--test", "~(b"],
        &["error: --test \"~(b\": not a regular expression"],
    );
}

/// Runs a spec expected to be refused before anything starts.
fn refused(name: &str, text: &str, args: &[&str]) -> Run {
    let dir = Scratch::new(name);
    let run = run_spec(&dir, text, args);
    assert_eq!(run.code, 1, "{name}: {}\n{}", run.stdout, run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run
}

/// A spec `text` (run with `args`) that exits 1 with each of `says` in
/// its error.
fn refused_saying(name: &str, text: &str, args: &[&str], says: &[&str]) -> Run {
    let r = refused(name, text, args);
    for s in says {
        assert!(r.stderr.contains(s), "{name}: wanted {s:?} in {}", r.stderr);
    }
    r
}

#[test]
fn bad_specs_give_one_clear_error_and_exit_1() {
    let cases: &[(&str, &str, &[&str], &[&str])] = &[
        (
            "bad-syntax",
            "def test_a(:\n    pass\n",
            &[],
            &["spec.star:1:", "def test_a(:"],
        ),
        (
            "bad-kwarg",
            "svc = service(\"a\", \"/bin/true\", cmd = [\"x\"])\n",
            &[],
            &["there is no cmd="],
        ),
        (
            "unsupported",
            "x = fault_matrix(scenarios = [])\n",
            &[],
            &["fault_matrix() is not supported by this build"],
        ),
        (
            "bad-errno",
            "x = deny(\"EIOO\")\n",
            &[],
            &["unknown errno \"EIOO\" (did you mean EIO?)"],
        ),
        (
            "bad-trigger",
            "x = deny(\"EIO\", trigger = \"nth=0\")\n",
            &[],
            &["trigger=\"nth=0\" is not valid"],
        ),
        (
            "bad-prob",
            "x = deny(\"EIO\", probability = \"150%\")\n",
            &[],
            &["outside 0%..100%"],
        ),
        (
            "bad-type",
            "i = interface(\"main\", \"tcp\", \"80\")\n",
            &[],
            &["port must be an integer 1..65535, got \"80\""],
        ),
        (
            "bad-op",
            "o = op(syscalls = [\"fsyncc\"])\n",
            &[],
            &["did you mean fsync?"],
        ),
        (
            "cycle",
            "a = service(\"a\", \"/bin/true\", depends_on = [\"b\"])\nb = service(\"b\", \"/bin/true\", depends_on = [a])\ndef test_x():\n    pass\n",
            &[],
            &["depends_on cycle: a → b → a"],
        ),
        (
            "missing-binary",
            "a = service(\"a\", \"./no-such-program\")\ndef test_x():\n    pass\n",
            &[],
            &["service \"a\"", "no-such-program does not exist"],
        ),
        (
            "no-match",
            "def test_x():\n    pass\n",
            &["--test", "nope"],
            &["no test matched \"nope\" (available: test_x)"],
        ),
    ];
    for (name, text, args, says) in cases {
        refused_saying(name, text, args, says);
    }
    let r = refused_saying(
        "bad-kwarg2",
        "svc = service(\"a\", \"/bin/true\", helthcheck = tcp(\"localhost:1\"))\n",
        &[],
        &[
            "service(): unknown keyword argument \"helthcheck\" (did you mean healthcheck?); accepted: name, binary, image, build, args, entrypoint, env, depends_on, healthcheck, ops, user, remote, ports, volumes, reuse, seccomp, nondeterministic_ok",
            "spec.star:1:",
        ],
    );
    assert!(
        r.stderr
            .starts_with("error: service(): unknown keyword argument"),
        "the first line says what is wrong: {}",
        r.stderr
    );
    let run = run_file("/no/such/spec.star", &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("cannot read spec /no/such/spec.star"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_busy_port_is_refused_before_any_test_runs() {
    let dir = Scratch::new("spec-busy");
    let squatter = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = squatter.local_addr().expect("addr").port();
    let text = format!(
        "svc = service(\"svc\", \"{}\", interface(\"main\", \"tcp\", {port}), args = [\"serve\", \"{port}\"])\ndef test_x():\n    pass\n",
        helper()
    );
    let run = run_spec(&dir, &text, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("port {port} of svc.main is already in use")),
        "{}",
        run.stderr
    );
}

#[test]
fn a_busy_udp_port_is_refused_before_any_test_runs() {
    let squatter = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = squatter.local_addr().expect("addr").port();
    let text = format!(
        "svc = service(\"svc\", \"{}\", interface(\"dgram\", \"udp\", {port}), args = [\"udp-echo\", \"{port}\"])\ndef test_x():\n    pass\n",
        helper()
    );
    refused_saying(
        "spec-busy-udp",
        &text,
        &[],
        &[&format!("port {port} of svc.dgram is already in use")],
    );
}

#[test]
fn a_fault_outside_the_filter_is_refused_not_ignored() {
    let dir = Scratch::new("spec-filter");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_computed():
    name = "fs" + "ync"
    fault(svc, run = persist, **{name: deny("EIO")})
"#,
    );
    let (_, doc) = json_run(&dir, &text, 2);
    let t = test_named(&doc, "test_computed");
    assert!(
        t["reason"]
            .as_str()
            .is_some_and(|r| r.contains("FAULT_NOT_FILTERABLE") && r.contains("fsync")),
        "{t:#}"
    );
}

#[test]
fn user_runs_the_service_under_another_account() {
    let dir = Scratch::new("spec-user");
    let (text, _) = spec_with_service(
        &dir,
        r#"user = "nobody","#,
        r#"
def test_nobody():
    assert_true(svc.main.send(data = "WHOAMI").startswith("uid=65534 "))
"#,
    );
    let run = run_spec(&dir, &text, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (text, _) = spec_with_service(
        &dir,
        r#"user = "no-such-account","#,
        "def test_x():\n    pass\n",
    );
    let (_, doc) = json_run(&dir, &text, 2);
    let t = test_named(&doc, "test_x");
    assert!(
        t["reason"]
            .as_str()
            .is_some_and(|r| r.contains("user=\"no-such-account\": no such account in /etc/passwd")),
        "{t:#}"
    );
}

#[test]
fn trace_and_fault_all_windows_record_and_fault_every_listed_service() {
    let dir = Scratch::new("spec-trace");
    let port2 = free_port();
    let (text, _) = spec_with_service(
        &dir,
        "",
        &format!(
            r#"
other = service(
    "other",
    "{helper}",
    interface("main", "tcp", {port2}),
    args = ["serve", "{port2}", "{wal}"],
    healthcheck = tcp("localhost:{port2}"),
)

def both():
    return [persist(), other.main.send(data = "PERSIST y")]

def test_all():
    assert_eq(fault_all([svc, other], fsync = deny("EROFS"), run = both), ["ERR errno30", "ERR errno30"])

def test_trace():
    trace(svc, syscalls = ["openat"], run = lambda: svc.main.send(data = "OPEN /etc/hostname"))
    trace_start(other, syscalls = ["fsync"])
    other.main.send(data = "PERSIST z")
    trace_stop(other)
    assert_eventually(service = "svc", syscall = "openat", path = "/etc/hostname", decision = "trace")
    assert_eventually(service = "other", syscall = "fsync", decision = "trace")
    return "traced"

def test_system_path_spared():
    fault(svc, openat = deny("ENOENT"), run = lambda: svc.main.send(data = "OPEN /etc/ld.so.cache"))
    assert_eventually(service = "svc", syscall = "openat", path = "/etc/ld.so.cache", decision = "allow (system path)")
"#,
            helper = helper(),
            wal = dir.path("data/other.wal"),
        ),
    );
    let out_file = dir.path("out.json");
    let run = run_spec(
        &dir,
        &text,
        &["--output", &out_file, "--debug", "--log-format=json"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).expect("--output file"))
            .expect("json");
    let all = test_named(&doc, "test_all");
    let services: Vec<&str> = all["faults"]
        .as_array()
        .expect("faults")
        .iter()
        .filter_map(|f| f["service"].as_str())
        .collect();
    assert_eq!(services.len(), 2, "{all:#}");
    assert!(services.contains(&"svc") && services.contains(&"other"));
    assert!(
        all["faults"]
            .as_array()
            .expect("faults")
            .iter()
            .all(|f| f["hits"] == 1)
    );
    let traced = test_named(&doc, "test_trace");
    assert_eq!(traced["return_value"], "traced");
    assert!(
        traced["faults"]
            .as_array()
            .expect("faults")
            .iter()
            .all(|f| f["action"] == "trace"),
        "{traced:#}"
    );
    assert!(!codes(traced).contains(&"FAULT_NOT_FIRED".to_string()));
    // --debug prints return values; the log lines are JSON.
    assert!(run.stderr.contains("  return: traced\n"), "{}", run.stderr);
    assert!(
        run.logs
            .iter()
            .any(|l| l["msg"] == "running test" && l["test"] == "test_trace"),
        "{}",
        run.stderr
    );
}

#[test]
fn protocol_faults_answer_for_the_upstream_on_matching_requests_only() {
    let dir = Scratch::new("spec-proxy");
    let (text, port) = http_service_spec(
        r#"
def test_error_on_post_orders():
    def calls():
        return [web.post(path = "/orders", body = "{}"), web.get(path = "/orders"), web.get(path = "/health")]
    got = fault(web.api, error(method = "POST", path = "/orders", status = 503, message = "overloaded"), run = calls)
    assert_eq(got[0].status, 503)
    assert_eq(got[0].data["error"], "overloaded")
    assert_eq(got[1].status, 200, "GET is not matched")
    assert_eq(got[2].data["path"], "/health")
    assert_eq(web.post(path = "/orders").status, 200, "the window is closed")

def test_response_delay_and_drop():
    r = fault(web.api, delay(delay = "300ms", path = "/slow/*"), response(path = "/slow/*", status = 201, body = "made up"), run = lambda: web.get(path = "/slow/x"))
    assert_eq(r.status, 201)
    assert_eq(r.body, "made up")
    assert_true(r.duration_ms >= 300, str(r.duration_ms))
    d = fault(web.api, drop(path = "/gone"), run = lambda: web.get(path = "/gone"))
    assert_true(not d.ok, "a dropped request has no response")
    assert_true("reset" in d.error, "an http drop is a reset: " + d.error)
    f = fault(web.api, drop(path = "/gone", reset = False), run = lambda: web.get(path = "/gone"))
    assert_true(not f.ok and "reset" not in f.error, "reset=False closes: " + f.error)

def test_unfired():
    fault(web.api, error(path = "/never"), run = lambda: web.get(path = "/"))

def test_env_points_at_the_proxy():
    fault_start(web.api, error(path = "/x", status = 418))
    assert_eq(web.get(path = "/x").status, 418)
    fault_stop(web.api)
    assert_eq(web.get(path = "/x").status, 200)
"#,
    );
    let (_, doc) = json_run(&dir, &text, 0);
    let t = test_named(&doc, "test_error_on_post_orders");
    assert_eq!(t["faults"][0]["interface"], "api");
    assert_eq!(t["faults"][0]["action"], "error");
    assert_eq!(t["faults"][0]["syscall"], "POST /orders");
    assert_eq!(t["faults"][0]["hits"], 1);
    let kinds: Vec<&str> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .filter(|k| k.starts_with("proxy"))
        .collect();
    assert!(kinds.contains(&"proxy_started"), "{kinds:?}");
    assert!(kinds.contains(&"proxy_fault_applied") && kinds.contains(&"proxy_fault_removed"));
    assert_eq!(
        kinds.iter().filter(|k| **k == "proxy").count(),
        1,
        "{kinds:?}"
    );
    let closed: Vec<&Value> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "proxy_conn_close")
        .collect();
    assert!(
        closed
            .iter()
            .all(|e| e["fields"]["bytes_c2s"].as_str().unwrap_or("0") != "0"),
        "{closed:?}"
    );
    let unfired = test_named(&doc, "test_unfired");
    assert!(
        codes(unfired).contains(&"FAULT_NOT_FIRED".to_string()),
        "{unfired:#}"
    );
    let _ = port;
}

#[test]
fn udp_interfaces_relay_datagrams_and_delay_drop_and_duplicate_them() {
    let dir = Scratch::new("spec-udp");
    let port = free_port();
    let text = format!(
        r#"
echo = service(
    "echo",
    "{helper}",
    interface("dgram", "udp", {port}),
    args = ["udp-echo", "{port}"],
    healthcheck = ready(),
)

def test_udp():
    assert_eq(echo.dgram.send(data = "hi"), "echo hi")
    slow = fault(echo.dgram, delay(delay = "300ms", method = "slow"), run = lambda: echo.dgram.send(data = "slow one"))
    assert_eq(slow, "echo slow one")
    # The relay decides datagrams in arrival order, so a send that waits
    # for its answer is a barrier for the fire-and-forget one before it.
    def then_count(data):
        return lambda: [echo.dgram.send_no_reply(data = data), echo.dgram.send(data = "COUNT")][1]
    fault(echo.dgram, duplicate(method = "twice"), run = then_count("twice"))
    got = fault(echo.dgram, drop(method = "lost"), run = then_count("lost"))
    # ready()'s empty probe datagram, hi, slow one, twice twice; lost never arrived
    assert_eq(got, "count 5")
"#,
        helper = helper(),
    );
    let run = run_spec(&dir, &text, &["--format", "json"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, run.stdout);
    let doc = json(&run);
    let t = test_named(&doc, "test_udp");
    let hits = support::hits(t);
    assert_eq!(hits, [1, 1, 1], "{t:#}");
    let slow = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["type"] == "step_recv" && e["fields"]["body"] == "echo slow one")
        .expect("the slow answer");
    let ms: u64 = slow["fields"]["duration_ms"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    assert!(ms >= 300, "the datagram was held: {ms} ms");
}

#[test]
fn dry_run_warns_of_a_missing_binary_and_refuses_an_unknown_account() {
    let dir = Scratch::new("spec-dry-checks");
    let text = r#"
later = service("later", "./not-built-yet", interface("main", "tcp", 19102))
def test_x():
    pass
"#;
    let run = run_spec(&dir, text, &["--dry-run"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("WARNING: service \"later\"") && run.stderr.contains("does not exist"),
        "{}",
        run.stderr
    );
    // From the spec's own directory, the path reads as the spec wrote it.
    let here = Command::new(faultbox())
        .current_dir(dir.path(""))
        .args(["test", "spec.star", "--dry-run"])
        .output()
        .expect("faultbox");
    let stderr = String::from_utf8_lossy(&here.stderr);
    assert!(
        stderr.contains(": ./not-built-yet does not exist"),
        "{stderr}"
    );
    let text = r#"
svc = service("svc", "/bin/true", interface("main", "tcp", 19103), user = "no-such-account-fb")
def test_x():
    pass
"#;
    let run = run_spec(&dir, text, &["--dry-run"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("no such account"), "{}", run.stderr);
}

#[test]
fn protocol_rules_a_protocol_cannot_apply_are_refused() {
    // Written out in a fault window: refused when the spec loads (exit 1,
    // the file and line named, nothing started).
    let dir = Scratch::new("spec-proxy-bad");
    let (text, port) = spec_with_service(
        &dir,
        "",
        r#"
def test_error_on_tcp():
    fault(svc.main, error(status = 503), run = persist)
"#,
    );
    let run = run_spec(&dir, &text, &["--format", "json"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "spec.star:16: fault(svc.main, error(...)): error() does not apply to tcp interfaces"
        ),
        "{}",
        run.stderr
    );
    assert!(processes_with(&format!("serve {port}")).is_empty());
    let (text, _) = http_service_spec(
        r#"
def test_query_on_http():
    fault(web.api, delay(delay = "1s"), error(query = "SELECT*"), run = lambda: None)
"#,
    );
    let run = run_spec(&dir, &text, &["--format", "json"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("query= applies to postgres and mysql interfaces, not http"),
        "{}",
        run.stderr
    );
    // Built elsewhere (a variable here): refused when the window opens.
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
BAD = error(status = 503)

def test_error_on_tcp():
    fault(svc.main, BAD, run = persist)
"#,
    );
    let (_, doc) = json_run(&dir, &text, 2);
    let t = test_named(&doc, "test_error_on_tcp");
    assert!(
        t["reason"]
            .as_str()
            .is_some_and(|r| r.contains("error() does not apply to tcp interfaces")),
        "{t:#}"
    );
    let r = refused("proxy-topic", "x = drop(topic = \"orders\")\n", &[]);
    assert!(
        r.stderr.contains("topic= matches message-broker traffic"),
        "{}",
        r.stderr
    );
}

#[test]
fn dependents_reach_services_through_their_proxies() {
    let dir = Scratch::new("spec-proxy-env");
    let (port_a, port_b) = (free_port(), free_port());
    let text = format!(
        r#"
a = service("a", "{helper}", interface("main", "tcp", {port_a}), args = ["serve", "{port_a}"], healthcheck = tcp("localhost:{port_a}"))
b = service(
    "b", "{helper}", interface("api", "http", {port_b}), args = ["serve", "{port_b}"],
    env = {{"A_ADDR": a.main.addr, "A_PROXY": a.main.proxy_addr, "LITERAL": "127.0.0.1:{port_a}0"}},
    depends_on = [a],
    healthcheck = http("localhost:{port_b}/"),
)

def test_env():
    addr = b.get(path = "/env/A_ADDR").data["env"]
    assert_true(addr.startswith("127.0.0.1:") and addr != "127.0.0.1:{port_a}", addr)
    assert_eq(b.get(path = "/env/A_PROXY").data["env"], addr)
    assert_eq(b.get(path = "/env/FAULTBOX_A_MAIN_ADDR").data["env"], addr)
    assert_eq(b.get(path = "/env/LITERAL").data["env"], "127.0.0.1:{port_a}0", "a longer port is left alone")
"#,
        helper = helper(),
    );
    let run = run_spec(&dir, &text, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn remote_services_are_proxied_not_launched() {
    let dir = Scratch::new("spec-remote");
    let remote_port = free_port();
    // The "remote" service: started by the test, not by faultbox.
    let mut server = Command::new(helper())
        .args(["serve", &remote_port.to_string()])
        .spawn()
        .expect("start the remote");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", remote_port)).is_err() {
        assert!(Instant::now() < deadline, "remote did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let local = free_port();
    let text = format!(
        r#"
load("@faultbox/discovery/k8s.star", "k8s")

api = service(
    "api",
    interface("http", "http", {remote_port}),
    remote = "127.0.0.1",
    healthcheck = tcp("127.0.0.1:{remote_port}"),
)
client = service(
    "client", "{helper}", interface("main", "http", {local}),
    args = ["serve", "{local}"],
    env = {{"API": api.http.addr}},
    depends_on = [api],
    healthcheck = tcp("localhost:{local}"),
)

def test_remote():
    assert_eq(k8s.endpoint("db", 5432, namespace = "dev"), "db.dev.svc.cluster.local:5432")
    assert_eq(k8s.local("db", 5432), "db.default:5432")
    assert_eq(api.http.addr, "127.0.0.1:{remote_port}")
    assert_eq(api.get(path = "/x").status, 200)
    r = fault(api.http, error(path = "/x", status = 503), run = lambda: api.get(path = "/x"))
    assert_eq(r.status, 503)
    proxied = client.get(path = "/env/API").data["env"]
    assert_true(proxied != "127.0.0.1:{remote_port}" and proxied.startswith("127.0.0.1:"), proxied)

def test_no_syscall_faults_on_remote():
    fault(api, write = deny("EIO"), run = lambda: None)
"#,
        helper = helper(),
    );
    let run = run_spec(&dir, &text, &["--format", "json"]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(run.code, 2, "{}", run.stderr);
    let doc = json(&run);
    assert_eq!(
        test_named(&doc, "test_remote")["result"],
        "pass",
        "{}",
        run.stderr
    );
    let t = test_named(&doc, "test_no_syscall_faults_on_remote");
    assert!(
        t["reason"]
            .as_str()
            .is_some_and(|r| r.contains("is a remote service: syscall faults need a process")),
        "{t:#}"
    );
    let r = refused(
        "remote-args",
        "x = service(\"x\", interface(\"m\", \"tcp\", 1), remote = \"db\", args = [\"-v\"], healthcheck = tcp(\"db:1\"))\n",
        &[],
    );
    assert!(
        r.stderr.contains("args= needs a process Faultbox starts"),
        "{}",
        r.stderr
    );
    let r = refused(
        "remote-health",
        "x = service(\"x\", interface(\"m\", \"tcp\", 1), remote = \"db\")\n",
        &[],
    );
    assert!(
        r.stderr.contains("a remote service needs healthcheck="),
        "{}",
        r.stderr
    );
}

#[test]
fn recipes_load_from_the_binary_and_are_listed() {
    let dir = Scratch::new("spec-recipes");
    let (text, _) = http_service_spec(
        r#"
load("@faultbox/recipes/http.star", http_faults = "http")

def test_rate_limited():
    r = fault(web.api, http_faults.rate_limited(path = "/orders"), run = lambda: web.post(path = "/orders"))
    assert_eq(r.status, 429)
    assert_true("rate limit" in r.data["error"])
    assert_eq(web.post(path = "/health").status, 200)
"#,
    );
    let run = run_spec(&dir, &text, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let list = support::faultbox_raw(&["recipes", "list"]);
    assert_eq!(list.code, 0);
    for name in ["http.rate_limited(", "redis.oom(", "postgres.disk_full("] {
        assert!(
            list.stdout.contains(name),
            "{name} missing from:\n{}",
            list.stdout
        );
    }
    let show = support::faultbox_raw(&["recipes", "show", "postgres.disk_full"]);
    assert_eq!(show.code, 0);
    assert!(show.stdout.contains("code = \"53100\""), "{}", show.stdout);
    assert!(
        show.stdout
            .starts_with("load(\"@faultbox/recipes/postgres.star\", \"postgres\")")
    );
    let bad = support::faultbox_raw(&["recipes", "show", "postgres.nope"]);
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("no recipe named \"postgres.nope\""),
        "{}",
        bad.stderr
    );
    let r = refused(
        "recipe-missing",
        "load(\"@faultbox/recipes/kafka.star\", \"kafka\")\n",
        &[],
    );
    assert!(r.stderr.contains("SPEC_RECIPE_NOT_FOUND"), "{}", r.stderr);
}

/// `openssl s_server -www` on a fresh port with `cert`/`key` (and `extra`
/// arguments), once it accepts connections.
fn s_server(cert: &str, key: &str, extra: &[&str]) -> (std::process::Child, u16) {
    let port = free_port();
    let server = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .args(["-cert", cert, "-key", key])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s_server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (server, port)
}

#[test]
fn ready_on_an_http_interface_with_tls_probes_over_tls() {
    let dir = Scratch::new("spec-tls-ready");
    let (cert, key) = support::server_cert(&dir, "up");
    let (mut server, port) = s_server(&cert, &key, &[]);
    let text = format!(
        r#"
probed = service(
    "probed",
    interface("https", "http", {port}, tls = tls_cert(ca = "up.pem")),
    remote = "localhost",
    healthcheck = ready(timeout = "5s"),
)

def test_ready():
    assert_eq(probed.get(path = "/").status, 200)
"#
    );
    let run = run_spec(&dir, &text, &["--format", "json"]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        run.code, 0,
        "a TLS-only server passes ready(): {}",
        run.stderr
    );
}

#[test]
fn tls_interfaces_terminate_and_reoriginate_tls_with_rules_on_the_plaintext() {
    let dir = Scratch::new("spec-tls");
    let (cert, key) = support::server_cert(&dir, "up");
    let (mut server, port) = s_server(&cert, &key, &[]);
    let text = format!(
        r#"
verified = service(
    "verified",
    interface("https", "http", {port}, tls = tls_cert(ca = "up.pem")),
    remote = "localhost",
    healthcheck = tcp("127.0.0.1:{port}"),
)
unverified = service(
    "unverified",
    interface("https", "http", {port}, tls = True),
    remote = "127.0.0.1",
    healthcheck = tcp("127.0.0.1:{port}"),
)

def test_tls_both_legs():
    ok = verified.get(path = "/")
    assert_eq(ok.status, 200, ok.error)
    r = fault(verified.https, error(path = "/orders", status = 503), run = lambda: verified.get(path = "/orders"))
    assert_eq(r.status, 503)

def test_untrusted_upstream_is_refused():
    r = unverified.get(path = "/")
    assert_true(not r.ok, "the upstream's self-signed certificate is not in the system store")
"#
    );
    let run = run_spec(&dir, &text, &["--format", "json"]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = json(&run);
    let t = test_named(&doc, "test_tls_both_legs");
    assert!(
        t["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["type"] == "proxy_started" && e["fields"]["mode"] == "tls"),
        "{t:#}"
    );
    let announced: Vec<&Value> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "proxy_started")
        .collect();
    assert_eq!(announced.len(), 2, "one per TLS interface: {announced:?}");
    assert!(
        announced.iter().all(|e| e["fields"]["mode"] == "tls"),
        "{announced:?}"
    );
    let r = refused("tls-bad", "x = tls_cert(proxy_cert = \"a.pem\")\n", &[]);
    assert!(r.stderr.contains("give both or neither"), "{}", r.stderr);
}

/// `fbgrpc serve` (tonic) behind a grpc interface, and `fbgrpc front`,
/// an HTTP service calling it with tonic's client through the proxy.
fn grpc_spec(dir: &Scratch, tls: &str, body: &str) -> String {
    let dir = dir.path("");
    let (rpc, web) = (free_port(), free_port());
    let bin = env!("CARGO_BIN_EXE_fbgrpc");
    let (serve_args, iface_tls, front_env) = if tls.is_empty() {
        (format!(r#"["serve", "{rpc}"]"#), String::new(), "")
    } else {
        (
            format!(r#"["serve", "{rpc}", "{dir}/up.pem", "{dir}/up.key"]"#),
            format!(", tls = {tls}"),
            r#", "ECHO_TLS": "1""#,
        )
    };
    format!(
        r#"
load("@faultbox/recipes/grpc.star", "grpc")

echo = service(
    "echo",
    "{bin}",
    interface("rpc", "grpc", {rpc}{iface_tls}),
    args = {serve_args},
    healthcheck = tcp("localhost:{rpc}"),
)
front = service(
    "front",
    "{bin}",
    interface("http", "http", {web}),
    args = ["front", "{web}"],
    env = {{"ECHO_ADDR": "localhost:{rpc}"{front_env}}},
    depends_on = [echo],
    healthcheck = tcp("localhost:{web}"),
)

SAY = "/faultbox.test.Echo/Say"

# EchoRequest{{text: "hi"}} in protobuf: field 1, length 2.
HI = "\x0a\x02hi"

def say(text):
    return front.http.get(path = "/say/" + text).body
{body}
"#
    )
}

#[test]
fn grpc_faults_reach_a_real_grpc_client_as_real_statuses() {
    let dir = Scratch::new("spec-grpc");
    let text = grpc_spec(
        &dir,
        "",
        r#"
def test_error_is_a_grpc_status_and_never_reaches_the_server():
    got = fault(echo.rpc, error(method = SAY, status = "UNAVAILABLE", message = "pool exhausted: 100%"), run = lambda: say("hi"))
    assert_eq(got, "grpc 14 pool exhausted: 100%")
    assert_eq(say("after"), "ok echo: after 1", "the injected call never reached the server")

def test_step_calls_and_method_matching():
    r = echo.rpc.call(method = SAY, body = HI)
    assert_eq(r.status, 0, r.error)
    assert_true("echo: hi" in r.body, r.body)
    other = fault(echo.rpc, error(method = "/faultbox.test.Echo/Other", status = 5), run = lambda: echo.rpc.call(method = SAY, body = HI))
    assert_eq(other.status, 0, "another method's rule does not fire")
    g = fault(echo.rpc, error(method = "/faultbox.test.*", status = 8, message = "quota"), run = lambda: echo.rpc.call(method = SAY, body = HI))
    assert_eq(g.status, 8)
    assert_eq(g.data["code_name"], "RESOURCE_EXHAUSTED")
    assert_eq(g.data["message"], "quota")
    assert_true(not g.ok)

def test_delay_drop_response_and_recipes():
    slow = fault(echo.rpc, delay(method = SAY, delay = "300ms"), run = lambda: front.http.get(path = "/say/slow"))
    assert_true(slow.duration_ms >= 300, str(slow.duration_ms))
    assert_eq(slow.body, "ok echo: slow 1")
    cut = fault(echo.rpc, drop(method = SAY), run = lambda: say("x"))
    # A cut connection: tonic reports UNKNOWN "transport error", grpc-go
    # UNAVAILABLE.
    assert_true(cut.startswith("grpc 2 ") or cut.startswith("grpc 14 "), cut)
    fake = fault(echo.rpc, response(method = SAY, body = "\x0a\x04fake"), run = lambda: say("y"))
    assert_eq(fake, "ok fake 0")
    late = fault(echo.rpc, grpc.deadline_exceeded(method = SAY), run = lambda: say("z"))
    assert_eq(late, "grpc 4 deadline passed before the call finished")
    assert_eq(say("fail"), "grpc 9 asked to fail", "the server's own statuses pass through")
    # retryable() at probability 1: always one of the three retryable codes.
    for i in range(5):
        r = fault(echo.rpc, grpc.retryable(method = SAY, probability = 1.0), run = lambda: say("r"))
        assert_true(r.split(" ")[1] in ["14", "4", "10"], r)

def test_unfired():
    fault(echo.rpc, grpc.unavailable(method = "/faultbox.test.Echo/Never"), run = lambda: say("a"))
"#,
    );
    let run = run_spec(&dir, &text, &["--format", "json", "--seed", "7"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let doc = json(&run);
    let t = test_named(
        &doc,
        "test_error_is_a_grpc_status_and_never_reaches_the_server",
    );
    assert_eq!(t["faults"][0]["interface"], "rpc");
    assert_eq!(t["faults"][0]["syscall"], "/faultbox.test.Echo/Say");
    assert_eq!(t["faults"][0]["hits"], 1);
    let fired: Vec<&Value> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "proxy")
        .collect();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0]["fields"]["request"], "/faultbox.test.Echo/Say");
    assert_eq!(fired[0]["fields"]["protocol"], "grpc");
    let unfired = test_named(&doc, "test_unfired");
    assert!(
        codes(unfired).contains(&"FAULT_NOT_FIRED".to_string()),
        "{unfired:#}"
    );
    // Rules grpc cannot apply are refused when the spec loads, naming what
    // grpc matches.
    for (rule, want) in [
        ("error(path = \"/x\")", "grpc rules match method="),
        ("error(status = 503)", "status=503 is not a gRPC error code"),
        (
            "response(method = SAY, status = 200)",
            "response() on grpc interfaces answers OK",
        ),
    ] {
        let bad =
            format!("{text}\ndef test_bad():\n    fault(echo.rpc, {rule}, run = lambda: None)\n");
        let run = run_spec(&dir, &bad, &["--format", "json"]);
        assert_eq!(run.code, 1, "{rule}: {}", run.stderr);
        assert!(run.stderr.contains(want), "{rule}: {}", run.stderr);
    }
    let r = refused("grpc-name", "x = error(status = \"UNAVAIL\")\n", &[]);
    assert!(r.stderr.contains("is not a gRPC code name"), "{}", r.stderr);
}

#[test]
fn grpc_over_tls_keeps_h2_on_both_legs_and_rules_on_the_plaintext() {
    let dir = Scratch::new("spec-grpc-tls");
    support::server_cert(&dir, "up");
    let text = grpc_spec(
        &dir,
        r#"tls_cert(ca = "up.pem")"#,
        r#"
def test_tls():
    assert_eq(say("a"), "ok echo: a 1")
    got = fault(echo.rpc, grpc.unavailable(method = SAY), run = lambda: say("b"))
    assert_eq(got, "grpc 14 service is not accepting calls right now")
    r = echo.rpc.call(method = SAY, body = HI)
    assert_eq(r.status, 0, r.error)
    assert_true("echo: hi" in r.body, r.body)
"#,
    );
    let path = dir.path("spec.star");
    std::fs::write(&path, &text).expect("write spec");
    let run = run_file(&path, &["--format", "json"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
}

#[test]
fn tls_upstreams_that_demand_a_client_certificate_get_faultboxs() {
    let dir = Scratch::new("spec-mtls");
    let (cert, key) = support::server_cert(&dir, "up");
    // A client CA and a client certificate it signed.
    let script = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=client-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
  -keyout cca.key -out cca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=faultbox-client -keyout client.key -out client.csr 2>/dev/null
printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA cca.pem -CAkey cca.key -CAcreateserial -days 2 \
  -extfile client.ext -out client.pem 2>/dev/null
"#;
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir.path(""))
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server refuses any client without a certificate from cca.pem.
    let cca = dir.path("cca.pem");
    let (mut server, port) = s_server(&cert, &key, &["-Verify", "1", "-CAfile", &cca]);
    let text = format!(
        r#"
def remote(name, tls):
    return service(name, interface("https", "http", {port}, tls = tls), remote = "localhost",
                   healthcheck = tcp("127.0.0.1:{port}"))

mtls = remote("mtls", tls_cert(ca = "up.pem", client_cert = "client.pem", client_key = "client.key"))
nocert = remote("nocert", tls_cert(ca = "up.pem"))
blind = remote("blind", tls_cert(insecure = True, client_cert = "client.pem", client_key = "client.key"))

def test_client_certificate():
    r = mtls.get(path = "/")
    assert_eq(r.status, 200, r.error)

def test_without_one_the_upstream_refuses():
    r = nocert.get(path = "/")
    assert_true(not r.ok, "s_server -Verify must refuse a client without a certificate")

def test_insecure_skips_the_upstream_check():
    r = blind.get(path = "/")
    assert_eq(r.status, 200, r.error)
"#
    );
    let run = run_spec(&dir, &text, &["--format", "json"]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let doc = json(&run);
    for name in [
        "test_client_certificate",
        "test_without_one_the_upstream_refuses",
        "test_insecure_skips_the_upstream_check",
    ] {
        assert_eq!(test_named(&doc, name)["result"], "pass", "{name}");
    }
}

/// Starts `faultbox test` on a spec whose first test blocks in a step,
/// sends `signals` once its service listens, and returns the exit code,
/// stderr, the `--output` report and how long the exit took.
fn interrupted_run(name: &str, signals: &[&str]) -> (Option<i32>, String, Value, Duration, u16) {
    use std::io::Read;
    let dir = Scratch::new(name);
    let (text, port) = spec_with_service(
        &dir,
        "",
        r#"
def test_a_blocks():
    svc.main.send(data = "SLEEP 20000")

def test_b_never_runs():
    pass
"#,
    );
    let spec = dir.path("spec.star");
    std::fs::write(&spec, text).expect("write spec");
    let report = dir.path("report.json");
    let mut child = Command::new(faultbox())
        .args(["test", &spec, "--output", &report])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn faultbox");
    let listening = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            listening.elapsed() < Duration::from_secs(10),
            "the service never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The body's step is sent right after the healthcheck passes.
    std::thread::sleep(Duration::from_millis(300));
    let begin = Instant::now();
    for sig in signals {
        Command::new("kill")
            .args([*sig, &child.id().to_string()])
            .status()
            .expect("kill");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.wait().expect("wait");
    let took = begin.elapsed();
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    let doc = std::fs::read_to_string(&report)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    (status.code(), stderr, doc, took, port)
}

fn port_freed(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn sigint_and_sigterm_stop_the_running_test_report_it_interrupted_and_exit_128_plus_signal() {
    for (sig, code, name) in [("-INT", 130, "SIGINT"), ("-TERM", 143, "SIGTERM")] {
        let (status, stderr, doc, took, port) = interrupted_run("spec-interrupt", &[sig]);
        assert_eq!(status, Some(code), "{name}: {stderr}");
        assert!(took < Duration::from_secs(8), "{name}: took {took:?}");
        assert!(
            stderr.contains(&format!("interrupted by {name}: 0 passed, 0 failed")),
            "{stderr}"
        );
        assert!(
            stderr.contains("--- INTERRUPTED: test_a_blocks"),
            "{stderr}"
        );
        assert_eq!(doc["interrupted"], 1, "{doc:#}");
        let tests = doc["tests"].as_array().expect("tests");
        assert_eq!(tests.len(), 1, "the second test never ran: {doc:#}");
        assert_eq!(tests[0]["name"], "test_a_blocks");
        assert_eq!(tests[0]["result"], "interrupted");
        // The service was stopped before faultbox exited.
        assert!(
            port_freed(port, Duration::from_millis(200)),
            "{name}: port {port} still served"
        );
    }
}

#[test]
fn a_second_sigint_exits_at_once_and_the_service_still_goes_away() {
    let (status, stderr, _, took, port) = interrupted_run("spec-interrupt2", &["-INT", "-INT"]);
    assert_eq!(status, Some(130), "{stderr}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The shims lose their controller and stop their targets.
    assert!(
        port_freed(port, Duration::from_secs(5)),
        "port {port} still served"
    );
}

#[test]
fn a_spec_past_its_memory_budget_is_refused_naming_the_line() {
    let started = Instant::now();
    refused_saying(
        "mem-one",
        "x = 1\ny = [0] * 2000000000\n",
        &[],
        &["more than its memory budget of 1 GiB (at ", "spec.star:2)"],
    );
    refused_saying(
        "mem-doubling",
        "l = [0]\nfor i in range(40):\n    l = l + l\n",
        &[],
        &["memory budget of 1 GiB", "spec.star:3)"],
    );
    let r = refused_saying(
        "mem-flag",
        "big = [0] * 3000000\n",
        &["--load-memory", "16MiB"],
        &["memory budget of 16 MiB", "--load-memory"],
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(30));
    // Within the budget, the same spec loads (and its top level runs once
    // where it can be seen).
    let dir = Scratch::new("mem-ok");
    let run = run_spec(
        &dir,
        "big = [0] * 3000000\nprint(\"loaded\", len(big))\ndef test_x():\n    pass\n",
        &["--dry-run"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let printed = format!("{}{}", run.stdout, run.stderr);
    assert_eq!(printed.matches("loaded 3000000").count(), 1, "{printed}");
    refused_saying(
        "mem-bad-flag",
        "def test_x():\n    pass\n",
        &["--load-memory", "lots"],
        &["--load-memory \"lots\": not a size"],
    );
}

#[test]
fn load_timeout_is_a_flag_and_names_where_evaluation_was() {
    let started = Instant::now();
    refused_saying(
        "load-timeout",
        "x = 0\nfor i in range(2147483647):\n    x += 1\n",
        &["--load-timeout", "1s"],
        &["did not finish loading within 1s", "spec.star:3"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}: the probe and the load must not each wait the full timeout",
        started.elapsed()
    );
}

#[test]
fn the_same_rule_in_many_windows_is_one_record_with_added_counters() {
    let dir = Scratch::new("spec-many-windows");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_loop():
    for i in range(300):
        assert_eq(fault(svc, fsync = deny("EIO"), run = persist), "ERR EIO")
    fault(svc, fsync = deny("EIO", label = "other"), run = lambda: None)
"#,
    );
    let (_, doc) = json_run(&dir, &text, 0);
    let t = test_named(&doc, "test_loop");
    let faults = t["faults"].as_array().expect("faults");
    assert_eq!(faults.len(), 2, "{t:#}");
    assert_eq!(faults[0]["windows"], 300);
    assert_eq!(faults[0]["hits"], 300);
    assert_eq!(faults[1]["windows"], 1);
    assert_eq!(faults[1]["label"], "other");
    assert_eq!(faults[1]["hits"], 0);
}

/// The events of `test` of type `kind`.
fn events_of<'a>(test: &'a Value, kind: &str) -> Vec<&'a Value> {
    test["events"]
        .as_array()
        .map(|all| all.iter().filter(|e| e["type"] == kind).collect())
        .unwrap_or_default()
}

/// `determinism()` on a real service: a raw clock read, randomness and
/// connects to undeclared ports become `unmediated_io` events; strict,
/// the first untolerated one fails the test naming it; a connect to a
/// declared port is mediated; tolerated kinds pass.
#[test]
fn determinism_reports_unmediated_io_and_strict_mode_fails_on_it() {
    let dir = Scratch::new("spec-determinism");
    let stray = free_port();
    let body = format!(
        r#"
def ask(cmd):
    r = svc.main.send(data = cmd)
    return r

def test_clock():
    assert_true(ask("CLOCK").startswith("OK"))

def test_dns():
    ask("CONNECT 53")

def test_stray():
    ask("CONNECT {stray}")

def test_declared():
    ask("CONNECT " + str(svc.main.port))
    assert_never(type = "unmediated_io", category = "network-unmediated")

def test_random_tolerated():
    assert_true(ask("RANDOM").startswith("OK"))
    assert_eventually(type = "unmediated_io", category = "rand", tolerated = "true")
"#
    );
    let (text, _) = spec_with_service(&dir, "nondeterministic_ok = [\"rand\"],", &body);
    let text = format!("determinism()\n{text}");
    let run = run_spec(&dir, &text, &["--format", "json"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let doc = json(&run);
    for (test, category, what) in [
        ("test_clock", "clock", "clock_gettime".to_string()),
        ("test_dns", "dns", "connect 127.0.0.1:53".to_string()),
        (
            "test_stray",
            "network-unmediated",
            format!("connect 127.0.0.1:{stray}"),
        ),
    ] {
        let t = test_named(&doc, test);
        assert_eq!(t["result"], "fail", "{test}: {t:#}");
        let reason = t["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with(&format!(
                "strict determinism: service \"svc\" did {category} I/O Faultbox does not mediate ({what}, event #"
            )) && reason.contains(&format!("nondeterministic_ok=[\"{category}\"]")),
            "{test}: {reason}"
        );
        let odd = events_of(t, "unmediated_io");
        assert!(
            odd.iter().any(|e| e["fields"]["category"] == category
                && e["fields"]["tolerated"] == "false"),
            "{test}: {odd:#?}"
        );
    }
    assert_eq!(
        test_named(&doc, "test_declared")["result"],
        "pass",
        "{doc:#}"
    );
    assert_eq!(
        test_named(&doc, "test_random_tolerated")["result"],
        "pass",
        "{doc:#}"
    );

    // Not strict: the same clock read is reported and the test passes.
    let (text, _) = spec_with_service(
        &dir,
        "",
        "def test_clock():\n    svc.main.send(data = \"CLOCK\")\n    assert_eventually(type = \"unmediated_io\", category = \"clock\", syscall = \"clock_gettime\")\n",
    );
    let text = format!("determinism(strict = False, allow = [\"rand\"])\n{text}");
    let run = run_spec(&dir, &text, &["--format", "json"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
}

/// What `determinism()` refuses at load, each with a line that says why.
#[test]
fn determinism_refuses_what_this_build_cannot_detect() {
    let dir = Scratch::new("spec-determinism-bad");
    for (head, words) in [
        ("determinism(level = \"L2\")", "detects level L1 only"),
        ("determinism(runtime = \"gvisor\")", "has no gvisor runtime"),
        (
            "determinism(allow = [\"fs-unmediated\"])",
            "not detected by this build",
        ),
        (
            "determinism(allow = [\"time\"])",
            "unknown kind \"time\"; the kinds are clock, rand, dns, network-unmediated",
        ),
        ("determinism()\ndeterminism()", "called twice"),
    ] {
        let (text, _) = spec_with_service(&dir, "", "def test_x():\n    pass\n");
        let run = run_spec(&dir, &format!("{head}\n{text}"), &[]);
        assert_eq!(run.code, 1, "{head}: {}", run.stderr);
        assert!(run.stderr.contains(words), "{head}: {}", run.stderr);
    }
    let (text, _) = spec_with_service(
        &dir,
        "nondeterministic_ok = [\"clock\"],",
        "def test_x():\n    pass\n",
    );
    let run = run_spec(&dir, &text, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("the spec never calls it; add determinism()"),
        "{}",
        run.stderr
    );
}

/// `partition(a, b)` on three real services that dial each other: a and
/// b cannot connect either way, directly or through the other's proxy;
/// c reaches both and both reach c; after the partition all paths work
/// again, and the split shows in the trace and in the fault records.
#[test]
fn a_partition_splits_two_services_and_leaves_the_third_alone() {
    let dir = Scratch::new("spec-partition");
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let svc = |name: &str, port: u16| {
        format!(
            "{name} = service(\"{name}\", \"{helper}\", interface(\"main\", \"tcp\", {port}), args = [\"serve\", \"{port}\"], healthcheck = tcp(\"localhost:{port}\", timeout = \"5s\"))\n",
            helper = helper()
        )
    };
    let text = format!(
        r#"{a}{b}{c}
def dial(src, dst):
    return src.main.send(data = "CONNECT " + str(dst))

def test_split():
    def during():
        assert_eq(dial(a, {pb}), "ERR ECONNREFUSED")
        assert_eq(dial(b, {pa}), "ERR ECONNREFUSED")
        assert_eq(dial(a, b.main.proxy_port), "ERR ECONNREFUSED")
        assert_eq(dial(b, a.main.proxy_port), "ERR ECONNREFUSED")
        assert_eq(dial(a, {pc}), "OK")
        assert_eq(dial(c, {pa}), "OK")
        assert_eq(dial(c, b.main.proxy_port), "OK")
        assert_eq(dial(b, {pc}), "OK")
    partition(a, b, run = during)
    assert_eq(dial(a, {pb}), "OK")
    assert_eq(dial(b, a.main.proxy_port), "OK")
    assert_eventually(type = "partition_applied", between = "a,b")
    assert_eventually(type = "partition_removed", between = "a,b")

def test_open_split():
    partition_start(b, a)
    assert_eq(dial(a, {pb}), "ERR ECONNREFUSED")
    partition_stop(a, b)
    assert_eq(dial(a, {pb}), "OK")
"#,
        a = svc("a", pa),
        b = svc("b", pb),
        c = svc("c", pc),
    );
    let (_, doc) = json_run(&dir, &text, 0);
    let split = test_named(&doc, "test_split");
    let faults = split["faults"].as_array().cloned().unwrap_or_default();
    let partition_hits = |service: &str| {
        faults
            .iter()
            .find(|f| f["service"] == service && f["label"] == "partition(a, b)")
            .and_then(|f| f["hits"].as_u64())
    };
    assert_eq!(partition_hits("a"), Some(2), "{faults:#?}");
    assert_eq!(partition_hits("b"), Some(2), "{faults:#?}");
}

/// A spec-wide monitor on a real service stops the test at the step
/// whose syscall broke it, and leaves a clean test alone.
#[test]
fn a_monitor_fails_the_test_at_the_step_that_broke_it() {
    let dir = Scratch::new("spec-monitor");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
monitor("fsync_never_denied", on = {"syscall": "fsync"},
        check = lambda e, s: not e.decision.startswith("deny"))

def test_denied():
    fault(svc, fsync = deny("EIO"), run = persist)
    fail("not reached: the monitor stops the test at the step")

def test_clean():
    assert_eq(persist(), "OK")
"#,
    );
    let (_, doc) = json_run(&dir, &text, 2);
    let denied = test_named(&doc, "test_denied");
    let reason = denied["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("monitor \"fsync_never_denied\" violated at event #")
            && reason.contains("(service=svc type=syscall)"),
        "{denied:#}"
    );
    assert_eq!(test_named(&doc, "test_clean")["result"], "pass", "{doc:#}");
}

/// Hold and release on a real service, with `parallel()`: a held fsync
/// waits until a concurrent branch releases it with EIO (the client sees
/// the errno), a call still held when its window closes runs, and the
/// trace shows each call held and then released.
#[test]
fn held_calls_wait_for_release_and_parallel_runs_branches_together() {
    let dir = Scratch::new("spec-hold");
    let (text, _) = spec_with_service(
        &dir,
        "",
        r#"
def test_released_with_eio():
    def both():
        return parallel(persist, lambda: release("w", decision = deny("EIO")))
    r = fault(svc, fsync = hold(tag = "w"), run = both)
    assert_eq(r[0], "ERR EIO")
    assert_eq(r[1], 1)
    assert_eventually(type = "syscall", syscall = "fsync", decision = "hold(w)")
    assert_eventually(type = "syscall", syscall = "fsync", decision = "deny(input/output error) (released)")

def test_window_end_lets_it_run():
    fault(svc, fsync = hold(tag = "w"), run = lambda: svc.main.send(data = "PERSIST_LATER y"))
    assert_eventually(type = "syscall", syscall = "fsync", decision = "allow (released)", timeout = "3s")

def test_parallel_results_in_order():
    r = parallel(lambda: svc.main.send(data = "PING"), lambda: 7, lambda: svc.main.send(data = "ENV NOPE"))
    assert_eq(r, ["PONG", 7, "<unset>"])

def test_unknown_tag():
    fault(svc, fsync = hold(tag = "w"), run = lambda: release("x"))

def test_nothing_held():
    fault(svc, fsync = hold(tag = "w"), run = lambda: release("w", timeout = "100ms"))

def test_one_branch():
    parallel(persist)

def test_failing_branch():
    parallel(persist, lambda: fail("boom"))

def test_window_in_a_branch():
    r = parallel(lambda: fault(svc, fsync = deny("EIO"), run = persist), lambda: 1)
    assert_eq(r, ["ERR EIO", 1])

def test_unread_failure():
    def quiet():
        svc.main.send(data = "EXIT 0")
        svc.main.send(data = "PING")
        return "done"
    parallel(quiet, lambda: 2)
"#,
    );
    let run = run_spec(&dir, &text, &["--format", "json"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let doc = json(&run);
    for t in [
        "test_released_with_eio",
        "test_window_end_lets_it_run",
        "test_parallel_results_in_order",
        "test_window_in_a_branch",
    ] {
        assert_eq!(
            test_named(&doc, t)["result"],
            "pass",
            "{t}: {:#}",
            test_named(&doc, t)
        );
    }
    for (t, words) in [
        (
            "test_unknown_tag",
            "release(\"x\"): no hold(tag=\"x\") rule is in force; in force: w",
        ),
        (
            "test_nothing_held",
            "release(\"w\"): no call was held under \"w\" within 100ms",
        ),
        (
            "test_one_branch",
            "parallel(): give two callables or more (got 1)",
        ),
        ("test_failing_branch", "parallel(): callable 2 ("),
        (
            "test_unread_failure",
            "parallel(): callable 1 (spec.star.quiet) failed: svc.main.send",
        ),
    ] {
        let test = test_named(&doc, t);
        assert_eq!(test["result"], "fail", "{t}: {test:#}");
        let reason = test["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(words), "{t}: {reason}");
    }
    assert!(
        test_named(&doc, "test_failing_branch")["reason"]
            .as_str()
            .is_some_and(|r| r.contains("(spec.star.lambda) failed: fail: boom")),
        "{doc:#}"
    );
}

/// `--explore all` on two services written to concurrently: every
/// interleaving of their held calls is a run of its own, the first that
/// breaks the test's ordering stops the test with a replay command, and
/// that command plays the same interleaving: 20 replays give the same
/// normalized trace.
#[test]
fn explore_plays_interleavings_and_a_failing_one_replays_exactly() {
    let dir = Scratch::new("spec-explore");
    let svc = |name: &str| {
        let port = free_port();
        format!(
            "{name} = service(\"{name}\", \"{helper}\", interface(\"main\", \"tcp\", {port}), args = [\"serve\", \"{port}\", \"{wal}\"], healthcheck = tcp(\"localhost:{port}\", timeout = \"5s\"))\n",
            helper = helper(),
            wal = dir.path(&format!("{name}.wal")),
        )
    };
    let text = format!(
        r#"{a}{b}
def test_a_writes_first():
    trace(a, syscalls = ["write", "fsync"], run = lambda: parallel(
        lambda: a.main.send(data = "PERSIST x"),
        lambda: b.main.send(data = "PERSIST y"),
    ))
    assert_before(first = {{"service": "a", "syscall": "write", "decision": "*(released)"}},
                  then = {{"service": "b", "syscall": "write", "decision": "*(released)"}})

def test_alone():
    a.main.send(data = "PERSIST z")
"#,
        a = svc("a"),
        b = svc("b"),
    );
    let run = run_spec(
        &dir,
        &text,
        &["--format", "json", "--explore", "all", "--seed", "1"],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    let doc = json(&run);
    // Every interleaving played is a result of its own; the first fails.
    let played: Vec<&Value> = doc["tests"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|t| t["name"] == "test_a_writes_first")
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(played.len(), 2, "{doc:#}");
    assert_eq!(played[0]["result"], "pass", "{:#}", played[0]);
    assert_eq!(played[0]["interleaving"]["index"], 0, "{:#}", played[0]);
    let failing = played[1];
    assert_eq!(failing["result"], "fail", "{failing:#}");
    let index = failing["interleaving"]["index"].as_u64().expect("index");
    let of = failing["interleaving"]["of"].as_u64().expect("of");
    // Two services, one held call each per round, three rounds (a write
    // of the text, of the newline, the fsync; the reply is a sendto, not
    // in the filter): 2^3 orders; b first in the first round fails, and
    // that is index 1.
    assert_eq!((index, of), (1, 8), "{failing:#}");
    let replay = failing["replay_command"].as_str().unwrap_or_default();
    assert!(
        replay.ends_with("--test a_writes_first --seed 1 --explore all --explore-index 1"),
        "{replay}"
    );
    assert!(
        run.stderr.contains(
            "--explore: test_alone has no parallel() whose branches held a call; it ran once"
        ),
        "{}",
        run.stderr
    );
    // The replay, 20 times: the same failure and the same trace.
    let mut traces = std::collections::BTreeSet::new();
    for i in 0..20 {
        let norm = dir.path(&format!("replay-{i}.norm"));
        let again = run_spec(
            &dir,
            &text,
            &[
                "--test",
                "a_writes_first",
                "--seed",
                "1",
                "--explore",
                "all",
                "--explore-index",
                "1",
                "--normalize",
                &norm,
            ],
        );
        assert_eq!(again.code, 2, "replay {i}: {}", again.stderr);
        traces.insert(std::fs::read_to_string(&norm).expect("normalized trace"));
    }
    assert_eq!(traces.len(), 1, "replays differ: {traces:#?}");
    let trace = traces.into_iter().next().unwrap_or_default();
    assert!(trace.contains("explore_round 1 b:write a:write"), "{trace}");
}
