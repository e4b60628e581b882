//! `faultbox run` end to end: the real CLI, the static shim and real
//! programs under a real seccomp filter. Each example of the CLI
//! reference's `faultbox run` section is a test here, asserting the errno
//! the target saw. Run serially (`--test-threads=1`): they fork and time
//! delays.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn shim_is_a_fully_static_binary() {
    let out = Command::new("ldd").arg(shim()).output().expect("run ldd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("statically linked") || text.contains("not a dynamic executable"),
        "ldd says: {text}"
    );
}

#[test]
fn version_is_printed() {
    let run = faultbox_raw(&["--version"]);
    assert_eq!(run.code, 0);
    assert!(run.stdout.starts_with("faultbox "), "{}", run.stdout);
}

#[test]
fn deny_every_open_spares_the_dynamic_linker() {
    // faultbox run --fault "openat=ENOENT:100%" ./my-service
    let dir = Scratch::new("open-all");
    let conf = dir.file("app.conf");
    let run = faultbox_run(&[
        "--fault",
        "openat=ENOENT:100%",
        "--",
        helper(),
        "open",
        &conf,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.lines("open"),
        vec![format!("open {conf} ENOENT ms={}", millis(&run.stdout))]
    );
    let denied = run.syscalls("deny");
    assert!(denied.iter().any(|e| e["path"] == conf.as_str()));
    assert!(
        run.syscalls("allow").is_empty(),
        "allowed calls are DEBUG only"
    );
}

/// `scripts/build` builds `faultbox` and `faultbox-shim` in one cargo
/// invocation (as `cargo build --workspace` does), so the shim gets the
/// features the CLI's dependencies turn on, serde_json's
/// `arbitrary_precision` among them. That shim must launch and fault.
#[test]
fn shim_built_with_the_whole_workspace_runs_a_fault() {
    let unified = bin_dir().join("faultbox-shim-unified");
    assert!(
        unified.exists(),
        "{} is missing: scripts/build makes it",
        unified.display()
    );
    let dir = Scratch::new("unified-shim");
    let conf = dir.file("app.conf");
    let out = Command::new("timeout")
        .args(["-k", "5", "60"])
        .arg(faultbox())
        .args([
            "run",
            "--log-format=json",
            "--fault",
            "openat=ENOENT:100%",
            "--",
        ])
        .args([helper(), "open", &conf])
        .env("FAULTBOX_SHIM", &unified)
        .output()
        .expect("run faultbox");
    let run = finish(out);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.lines("open"),
        vec![format!("open {conf} ENOENT ms={}", millis(&run.stdout))]
    );
}

#[test]
fn deny_opens_only_under_the_glob() {
    // faultbox run --fault "openat=ENOENT:100%:/data/*" ./my-service
    let dir = Scratch::new("open-glob");
    let inside = dir.file("data/orders.db");
    let outside = dir.file("other.db");
    let glob = format!("openat=ENOENT:100%:{}", dir.path("data/*"));
    let run = faultbox_run(&["--fault", &glob, "--", helper(), "open", &inside, &outside]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines = run.lines("open");
    assert!(
        lines[0].starts_with(&format!("open {inside} ENOENT")),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with(&format!("open {outside} ok")),
        "{lines:?}"
    );
}

#[test]
fn twenty_percent_write_errors_replay_with_a_seed() {
    // faultbox run --fault "write=EIO:20%" ./my-service
    let dir = Scratch::new("write20");
    let file = dir.path("out.log");
    let glob = format!("write=EIO:20%:{file}");
    let go = || {
        faultbox_run(&[
            "--seed",
            "42",
            "--fault",
            &glob,
            "--",
            helper(),
            "write",
            "1000",
            &file,
        ])
    };
    let first = go();
    assert_eq!(first.code, 0, "{}", first.stderr);
    let failed = first.stdout.matches("EIO").count();
    assert!(
        (120..=280).contains(&failed),
        "{failed} of 1000 writes failed"
    );
    assert_eq!(first.syscalls("deny").len(), failed);
    let second = go();
    assert_eq!(first.stdout, second.stdout, "same seed, same decisions");
}

#[test]
fn every_connect_is_refused() {
    // faultbox run --fault "connect=ECONNREFUSED:100%" ./my-service
    let run = faultbox_run(&[
        "--fault",
        "connect=ECONNREFUSED:100%",
        "--",
        helper(),
        "connect-self",
        "3",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines = run.lines("connect");
    assert_eq!(lines.len(), 3);
    assert!(
        lines.iter().all(|l| l.contains("ECONNREFUSED")),
        "{lines:?}"
    );
}

#[test]
fn every_connect_is_delayed() {
    // faultbox run --fault "connect=delay:200ms:100%" ./my-service
    let run = faultbox_run(&[
        "--fault",
        "connect=delay:200ms:100%",
        "--",
        helper(),
        "connect-self",
        "2",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for line in run.lines("connect") {
        assert!(line.contains(" ok "), "{line}");
        assert!(millis(&line) >= 200, "{line}");
    }
    let delayed = run.syscalls("delay(200ms)");
    assert_eq!(delayed.len(), 2);
    assert!(
        delayed
            .iter()
            .all(|e| e["latency_ms"].as_u64().unwrap_or(0) >= 200)
    );
}

#[test]
fn a_fifth_of_sends_are_delayed() {
    // faultbox run --fault "sendto=delay:50ms:20%" ./my-service
    let run = faultbox_run(&[
        "--seed",
        "7",
        "--fault",
        "sendto=delay:50ms:20%",
        "--",
        helper(),
        "sendto-self",
        "40",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines = run.lines("sendto");
    assert_eq!(lines.len(), 40);
    let slow = lines.iter().filter(|l| millis(l) >= 50).count();
    assert!((2..=16).contains(&slow), "{slow} of 40 sends delayed");
    assert_eq!(run.syscalls("delay").len(), slow);
}

#[test]
fn slow_opens_under_data_and_occasional_write_errors() {
    // faultbox run --fault "openat=delay:100ms:100%:/data/*" --fault "write=EIO:5%" ./my-service
    let dir = Scratch::new("combo");
    let slow = dir.file("data/a");
    let fast = dir.file("b");
    let out = dir.path("out.log");
    let delay = format!("openat=delay:100ms:100%:{}", dir.path("data/*"));
    let script = format!(
        "{h} open {slow} {fast}; {h} write 400 {out} > {report}",
        h = helper(),
        report = dir.path("report")
    );
    // Seed 3 leaves the helper's two stdout lines alone; the decisions are
    // a pure function of the seed, so this never flakes.
    let run = faultbox_run(&[
        "--seed",
        "3",
        "--fault",
        &delay,
        "--fault",
        "write=EIO:5%",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let opens = run.lines("open");
    assert_eq!(opens.len(), 2, "{}", run.stdout);
    assert!(millis(&opens[0]) >= 100, "{opens:?}");
    assert!(millis(&opens[1]) < 100, "{opens:?}");
    let report = std::fs::read_to_string(dir.path("report")).unwrap_or_default();
    let failed = report.matches("EIO").count();
    assert!(
        (3..=45).contains(&failed),
        "{failed} of 400 writes failed: {report}"
    );
}

#[test]
fn refuse_thirty_percent_and_delay_the_rest() {
    // faultbox run --fault "connect=ECONNREFUSED:30%" --fault "connect=delay:200ms:70%" ./my-service
    let run = faultbox_run(&[
        "--seed",
        "11",
        "--fault",
        "connect=ECONNREFUSED:30%",
        "--fault",
        "connect=delay:200ms:70%",
        "--",
        helper(),
        "connect-self",
        "20",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines = run.lines("connect");
    let refused = lines.iter().filter(|l| l.contains("ECONNREFUSED")).count();
    assert!((1..=12).contains(&refused), "{refused} of 20 refused");
    for line in lines.iter().filter(|l| l.contains(" ok ")) {
        assert!(millis(line) >= 200, "the rest are delayed: {line}");
    }
}

#[test]
fn fsync_fails_after_the_first_two() {
    // faultbox run --fault "fsync=EIO:100%:after=2" ./my-service
    let dir = Scratch::new("wal");
    let wal = dir.path("wal.log");
    let run = faultbox_run(&[
        "--fault",
        "fsync=EIO:100%:after=2",
        "--",
        helper(),
        "fsync",
        "4",
        &wal,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.lines("fsync"),
        vec!["fsync 1 ok", "fsync 2 ok", "fsync 3 EIO", "fsync 4 EIO"]
    );
}

#[test]
fn fs_fault_sync_is_the_same_as_fsync() {
    // faultbox run --fs-fault "sync=EIO:100%:after=2" ./my-service
    let dir = Scratch::new("fs-sync");
    let wal = dir.path("wal.log");
    let run = faultbox_run(&[
        "--fs-fault",
        "sync=EIO:100%:after=2",
        "--",
        helper(),
        "fsync",
        "3",
        &wal,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.lines("fsync"),
        vec!["fsync 1 ok", "fsync 2 ok", "fsync 3 EIO"]
    );
}

#[test]
fn fs_fault_write_covers_write_syscalls() {
    // faultbox run --fs-fault "write=EIO:10%" ./my-service (here 100%, on one file)
    let dir = Scratch::new("fs-write");
    let file = dir.path("out.log");
    let rule = format!("write=EIO:100%:{file}");
    let run = faultbox_run(&["--fs-fault", &rule, "--", helper(), "write", "3", &file]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.lines("writes"), vec!["writes EIO EIO EIO"]);
}

#[test]
fn only_the_third_open_under_data_fails() {
    // faultbox run --fault "openat=ENOENT:100%:/data/*:nth=3" ./my-service
    let dir = Scratch::new("nth");
    let files: Vec<String> = ["data/1", "other", "data/2", "data/3", "data/4"]
        .iter()
        .map(|f| dir.file(f))
        .collect();
    let rule = format!("openat=ENOENT:100%:{}:nth=3", dir.path("data/*"));
    let mut args = vec!["--fault", &rule, "--", helper(), "open"];
    args.extend(files.iter().map(String::as_str));
    let run = faultbox_run(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let outcomes: Vec<&str> = run
        .lines("open")
        .iter()
        .map(|l| if l.contains("ENOENT") { "ENOENT" } else { "ok" })
        .collect();
    assert_eq!(outcomes, vec!["ok", "ok", "ok", "ENOENT", "ok"]);
}

#[test]
fn env_is_added_and_wins_over_the_inherited_value() {
    // faultbox run --env DB_URL=postgres://localhost/db --env PORT=8080 ./my-service
    let run = {
        let mut cmd = Command::new(faultbox());
        cmd.env("PORT", "1111").args([
            "run",
            "--log-format=json",
            "--env",
            "DB_URL=postgres://localhost/db",
            "--env=PORT=8080",
            "--",
            "sh",
            "-c",
            "echo $DB_URL $PORT",
        ]);
        finish(cmd.output().expect("run faultbox"))
    };
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "postgres://localhost/db 8080");
}

#[test]
fn debug_logs_allowed_calls_and_json_has_the_documented_fields() {
    // faultbox run --debug --fault "openat=ENOENT:50%" ./my-service
    let dir = Scratch::new("debug");
    let file = dir.file("x");
    let run = faultbox_run(&[
        "--debug",
        "--fault",
        "openat=ENOENT:0%",
        "--",
        helper(),
        "open",
        &file,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let allowed = run.syscalls("allow");
    assert!(
        allowed
            .iter()
            .any(|e| e["decision"] == "allow" && e["path"] == file.as_str())
    );
    assert!(
        allowed
            .iter()
            .any(|e| e["decision"] == "allow (system path)")
    );
    for record in &run.logs {
        for field in ["time", "level", "msg", "component", "session_id"] {
            assert!(record.get(field).is_some(), "{field} missing in {record}");
        }
        assert_eq!(record["component"], "engine");
    }
    let e = allowed[0];
    for field in ["name", "pid", "decision"] {
        assert!(e.get(field).is_some(), "{field} missing in {e}");
    }
    assert_eq!(e["level"], "DEBUG");
    let done = run.logs_with("session completed");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["exit_code"], 0);
    assert!(done[0]["duration"].as_u64().unwrap_or(0) > 0);
    assert_eq!(done[0]["state"], "stopped");
    let time = run.logs[0]["time"].as_str().unwrap_or("");
    assert_eq!(time.len(), "2026-11-22T07:54:00.096073654Z".len(), "{time}");
}

#[test]
fn console_format_is_coloured_and_readable() {
    let dir = Scratch::new("console");
    let file = dir.file("x");
    let mut cmd = Command::new(faultbox());
    cmd.args([
        "run",
        "--log-format=console",
        "--fault",
        "openat=EACCES:100%",
        "--",
        helper(),
        "open",
        &file,
    ]);
    let run = finish(cmd.output().expect("run faultbox"));
    assert_eq!(run.code, 0);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("syscall intercepted"))
        .unwrap_or_else(|| panic!("no interception line in {}", run.stderr));
    assert!(line.contains("\x1b[32mINF"), "{line:?}");
    assert!(line.contains("[engine]"), "{line:?}");
    assert!(line.contains("deny(permission denied)"), "{line:?}");
    assert!(
        line.chars().nth(2) == Some(':') && line.chars().nth(8) == Some('.'),
        "{line:?}"
    );
}

#[test]
fn exit_codes_pass_through() {
    assert_eq!(faultbox_run(&["--", helper(), "exit", "42"]).code, 42);
    assert_eq!(faultbox_run(&["--", helper(), "exit", "0"]).code, 0);
    // Not isolated: as PID 1 of its namespace the shell could not kill
    // itself (the kernel drops signals an init sends itself).
    let killed = faultbox_run(&["--no-isolation", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(killed.code, 137, "{}", killed.stderr);
    let exited = killed.logs_with("target exited with error");
    assert_eq!(exited[0]["signal"], 9);
}

#[test]
fn a_program_that_cannot_execute_exits_127() {
    let dir = Scratch::new("exec");
    let script = dir.path("broken.sh");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").expect("write script");
    Command::new("chmod")
        .args(["+x", &script])
        .status()
        .expect("chmod");
    let run = faultbox_run(&["--", &script]);
    assert_eq!(run.code, 127, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("interpreter or dynamic loader is missing"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_delay_in_one_thread_does_not_block_another() {
    let dir = Scratch::new("threads");
    let slow = dir.path("slow");
    let fast = dir.file("fast");
    let delay = format!("write=delay:1s:100%:{slow}");
    let deny = format!("openat=EACCES:100%:{fast}");
    let run = faultbox_run(&[
        "--fault",
        &delay,
        "--fault",
        &deny,
        "--",
        helper(),
        "two-threads",
        &slow,
        &fast,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let open = &run.lines("open")[0];
    assert!(open.contains("EACCES"), "{open}");
    assert!(
        millis(open) < 300,
        "open waited behind the delayed write: {open}"
    );
    let write = &run.lines("write")[0];
    assert!(millis(write) >= 1000, "{write}");
}

#[test]
fn a_child_of_a_shell_wrapper_is_faulted_with_its_own_pid() {
    let dir = Scratch::new("wrapper");
    let file = dir.file("data/a");
    let rule = format!("openat=ENOENT:100%:{}", dir.path("data/*"));
    let script = format!("cat {file}; echo rc=$?");
    let run = faultbox_run(&["--fault", &rule, "--", "sh", "-c", &script]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "rc=1");
    assert!(run.stderr.contains("No such file or directory"));
    let target = run.logs_with("target started")[0]["pid"].as_u64();
    let denied = run.syscalls("deny");
    assert_eq!(denied.len(), 1);
    assert_ne!(
        denied[0]["pid"].as_u64(),
        target,
        "the event names cat, not sh"
    );
}

#[test]
fn the_target_is_pid_1_unless_isolation_is_off() {
    let isolated = faultbox_run(&["--", helper(), "pid"]);
    assert_eq!(isolated.stdout.trim(), "pid 1", "{}", isolated.stderr);
    let plain = faultbox_run(&["--no-isolation", "--", helper(), "pid"]);
    assert_ne!(plain.stdout.trim(), "pid 1");
}

#[test]
fn the_network_is_isolated_unless_host_network_is_asked() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let isolated = faultbox_run(&["--", helper(), "connect", &addr]);
    assert!(
        isolated.stdout.contains("ECONNREFUSED"),
        "{}",
        isolated.stdout
    );
    let host = faultbox_run(&["--host-network", "--", helper(), "connect", &addr]);
    assert!(
        host.stdout.contains(" ok "),
        "{}{}",
        host.stdout,
        host.stderr
    );
}

#[test]
fn sigterm_reaches_the_target() {
    for (flags, expected) in [(vec!["--no-isolation"], 143), (vec![], 137)] {
        // Isolated, sleep is PID 1 and ignores SIGTERM: the grace period
        // ends in SIGKILL. Without isolation SIGTERM kills it outright.
        let mut cmd = Command::new(faultbox());
        cmd.args(["run", "--log-format=json"])
            .args(&flags)
            .args(["--", "sleep", "30"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn faultbox");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        while !line.contains("target started") {
            line.clear();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
        }
        let begin = Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(expected), "flags {flags:?}");
        assert!(begin.elapsed() < Duration::from_secs(6));
    }
}

#[test]
fn losing_the_controller_releases_held_calls_and_stops_the_target() {
    let dir = Scratch::new("lost");
    let file = dir.file("held");
    let rule = format!("openat=delay:60s:100%:{file}");
    let mut child = Command::new(faultbox())
        .args([
            "run",
            "--log-format=json",
            "--fault",
            &rule,
            "--",
            helper(),
            "open",
            &file,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn faultbox");
    thread::sleep(Duration::from_millis(700));
    let shim = children(child.id());
    assert_eq!(shim.len(), 1, "one shim under faultbox");
    let targets = children(shim[0]);
    assert_eq!(targets.len(), 1, "one target under the shim");
    let _ = child.kill();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(8);
    while !(gone(shim[0]) && gone(targets[0])) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(gone(targets[0]), "target left running");
    assert!(gone(shim[0]), "shim left running");
    let mut out = String::new();
    let _ = child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    assert!(
        out.contains(&format!("open {file} ok")),
        "the held open was released: {out:?}"
    );
}

#[test]
fn the_descriptor_limit_is_raised_to_the_hard_limit() {
    let hard = Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .expect("sh");
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_string();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} run --no-isolation -- sh -c 'ulimit -Sn'",
            faultbox().display()
        ))
        .output()
        .expect("run faultbox");
    let run = finish(out);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.stdout.trim(),
        hard,
        "the target inherits the raised limit"
    );
}

#[test]
fn malformed_input_is_one_line_exit_1_and_starts_nothing() {
    let dir = Scratch::new("bad");
    let not_exec = dir.file("plain.txt");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--fault", "openat=EIOO:100%", "--", "true"],
            "unknown errno \"EIOO\" (did you mean EIO?)",
        ),
        (
            vec!["--fault", "write=EIO:150%", "--", "true"],
            "probability \"150%\" is out of range",
        ),
        (
            vec!["--fault", "fsync=EIO:100%:nth=0", "--", "true"],
            "nth counts calls from 1",
        ),
        (
            vec!["--fault", "connect=delay:fast:100%", "--", "true"],
            "invalid duration \"fast\"",
        ),
        (
            vec!["--fault", "opnat=EIO:100%", "--", "true"],
            "unknown syscall \"opnat\" (did you mean openat?)",
        ),
        (
            vec!["--fs-fault", "wirte=EIO:1%", "--", "true"],
            "did you mean write?",
        ),
        (
            vec!["--env", "NOEQUALS", "--", "true"],
            "expected KEY=VALUE",
        ),
        (
            vec!["--", "./no-such-binary"],
            "binary \"./no-such-binary\" not found",
        ),
        (vec!["--", "no-such-binary-xyz"], "not found in PATH"),
        // A misspelled trigger used to become a path glob that never matched.
        (
            vec!["--fault", "openat=ENOENT:100%:NTH=1", "--", "true"],
            "unknown trigger \"NTH=1\" (did you mean nth=1?)",
        ),
        (
            vec!["--fault", "openat=ENOENT:100%:after", "--", "true"],
            "did you mean after=N?",
        ),
        (
            vec!["--fault", "openat=ENOENT:1e2%", "--", "true"],
            "invalid probability \"1e2%\"",
        ),
        (
            vec!["--fault", "write=EIO:20", "--", "true"],
            "write \"20%\" for a percentage",
        ),
        (
            vec!["--fault", "fsync=EIO:100%:nth= 3", "--", "true"],
            "(write nth=3)",
        ),
        (
            vec![
                "--fault",
                "connect=delay:9223372036854775807ns:100%",
                "--",
                "true",
            ],
            "longer than a day",
        ),
        (
            vec!["--fault", "connect=delay:90m:100%", "--", "true"],
            "write it in hours",
        ),
        (vec!["--", &not_exec], "is not executable"),
        (vec!["--", "/tmp"], "is a directory"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["run"];
        full.extend(args.iter().copied());
        let run = faultbox_raw(&full);
        assert_eq!(run.code, 1, "{args:?}: {}", run.stderr);
        assert_eq!(
            run.stderr.trim().lines().count(),
            1,
            "{args:?}: {}",
            run.stderr
        );
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
        assert!(
            !run.stderr.contains("session starting"),
            "{args:?} started something"
        );
    }
    let unknown_flag = faultbox_raw(&["run", "--frobnicate", "--", "true"]);
    assert_eq!(unknown_flag.code, 1);
    // Bytes that are not UTF-8 name the rule in one line too.
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new(faultbox())
        .arg("run")
        .arg("--fault")
        .arg(std::ffi::OsStr::from_bytes(b"openat=ENOENT\xff:100%"))
        .args(["--", "true"])
        .output()
        .expect("run faultbox");
    let run = finish(out);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("--fault") && run.stderr.contains("not valid UTF-8"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_kernel_without_user_notification_is_reported() {
    // strace makes seccomp() fail with ENOSYS, as on a kernel without it.
    let out = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=seccomp",
            "-e",
            "inject=seccomp:error=ENOSYS",
        ])
        .arg(faultbox())
        .args(["run", "--fault", "openat=EIO:1%", "--", "true"])
        .output()
        .expect("strace is installed by scripts/setup");
    let run = finish(out);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("does not support seccomp user notification"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
}

#[test]
fn the_shim_explains_its_usage() {
    let out = Command::new(shim()).output().expect("run shim");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: faultbox-shim --control"));
}

#[test]
fn the_readme_example_fails_the_third_fsync() {
    let dir = Scratch::new("readme");
    let wal = dir.path("orders.wal");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/wal.py");
    let run = faultbox_run(&[
        "--fault",
        "fsync=EIO:100%:after=2",
        "--",
        "python3",
        example,
        &wal,
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        run.stdout.lines().collect::<Vec<_>>(),
        vec![
            "order-1: durable",
            "order-2: durable",
            "order-3: fsync failed: Input/output error (errno 5); refusing to acknowledge, exiting",
        ]
    );
    assert_eq!(
        std::fs::read_to_string(&wal)
            .unwrap_or_default()
            .lines()
            .count(),
        3
    );
}

#[test]
fn the_targets_own_flags_pass_through_after_the_separator() {
    // faultbox run --debug -- ./my-service --port 8080
    let run = faultbox_run(&[
        "--debug",
        "--",
        "sh",
        "-c",
        "echo \"$@\"",
        "sh",
        "--port",
        "8080",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "--port 8080");
}

#[test]
fn nothing_the_target_started_outlives_it() {
    // Without a PID namespace nothing kills the tree for us: the shim, as
    // subreaper, must.
    let run = faultbox_run(&["--no-isolation", "--", "sh", "-c", "sleep 30 & echo $!"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let pid: u32 = run.stdout.trim().parse().expect("background pid");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !gone(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(gone(pid), "background sleep {pid} outlived its target");
}

#[test]
fn a_missing_shim_is_one_clear_line() {
    let out = Command::new(faultbox())
        .env("FAULTBOX_SHIM", "/nonexistent/faultbox-shim")
        .args(["run", "--", "true"])
        .output()
        .expect("run faultbox");
    let run = finish(out);
    assert_eq!(run.code, 1);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("FAULTBOX_SHIM=/nonexistent/faultbox-shim is not an executable file"),
        "{}",
        run.stderr
    );
}

#[test]
fn logs_are_json_when_stderr_is_piped() {
    let run = faultbox_raw(&["run", "--", "true"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.logs.is_empty());
    assert_eq!(
        run.logs.len(),
        run.stderr.lines().count(),
        "every line is JSON: {}",
        run.stderr
    );
}

#[test]
fn a_target_already_under_a_listener_gets_a_named_error_not_a_hang() {
    // faultbox inside faultbox: the inner one's filter cannot have a
    // listener of its own (the kernel allows one per process): EBUSY.
    let inner = faultbox();
    let inner = inner.to_string_lossy();
    let run = faultbox_run(&[
        "--fault",
        "openat=ENOENT:100%:/nonexistent/*",
        "--",
        &inner,
        "run",
        "--fault",
        "write=EIO:100%:/nonexistent/*",
        "--",
        "/bin/true",
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "another seccomp user-notification listener already supervises this process (EBUSY"
        ),
        "{}",
        run.stderr
    );
}
