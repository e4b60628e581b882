//! The controller ⇄ shim protocol, driven by this test as the controller:
//! rules replaced while the target runs, rules the filter cannot serve
//! refused, and the event stream's shape.

mod support;

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use faultbox_agent::process::make_inheritable;
use faultbox_agent::rule::{Rule, parse_fault};
use faultbox_agent::syscalls::Arch;
use faultbox_agent::wire::{
    self, ControlMessage, Isolation, LaunchSpec, OnDisconnect, ShimMessage,
};
use support::*;

struct Controller {
    shim: Child,
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Controller {
    fn launch(intercept: &[&str], rules: Vec<Rule>) -> Controller {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        make_inheritable(&theirs).expect("inheritable");
        let mut shim = Command::new(shim())
            .arg("--control")
            .arg(format!("fd:{}", theirs.as_raw_fd()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn shim");
        drop(theirs);
        let mut reader = BufReader::new(ours.try_clone().expect("clone"));
        let mut writer = BufWriter::new(ours);
        let hello: Option<ShimMessage> = wire::recv(&mut reader).expect("hello");
        assert!(matches!(
            hello,
            Some(ShimMessage::Hello {
                version: wire::PROTOCOL_VERSION,
                ..
            })
        ));
        let spec = LaunchSpec {
            program: helper().to_string(),
            argv: vec!["fbhelper".into(), "open-stdin".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            cwd: None,
            intercept: intercept.iter().map(|s| s.to_string()).collect(),
            rules,
            seed: 5,
            isolation: Isolation::default(),
            on_disconnect: OnDisconnect::StopTarget,
            stop_grace_ms: 500,
            user: None,
        };
        wire::send(&mut writer, &ControlMessage::Launch(Box::new(spec))).expect("launch");
        writer.flush().expect("flush");
        let stdin = shim.stdin.take();
        let stdout = BufReader::new(shim.stdout.take().expect("stdout"));
        Controller {
            shim,
            reader,
            writer,
            stdin,
            stdout,
        }
    }

    fn next(&mut self) -> ShimMessage {
        match wire::recv(&mut self.reader) {
            Ok(Some(m)) => m,
            other => panic!("shim stream ended: {other:?}"),
        }
    }

    /// Skips messages until one matches.
    fn until(&mut self, pred: impl Fn(&ShimMessage) -> bool) -> ShimMessage {
        loop {
            let m = self.next();
            if pred(&m) {
                return m;
            }
        }
    }

    fn send(&mut self, m: &ControlMessage) {
        wire::send(&mut self.writer, m).expect("send");
        self.writer.flush().expect("flush");
    }

    /// Asks the target to open `path` and returns its verdict line.
    fn open(&mut self, path: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{path}").expect("write stdin");
        stdin.flush().expect("flush stdin");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read target");
        line.trim().to_string()
    }
}

#[test]
fn rules_can_be_replaced_while_the_target_runs() {
    let dir = Scratch::new("setrules");
    let file = dir.file("data/x");
    let mut c = Controller::launch(&["openat"], Vec::new());
    let installed = c.until(|m| matches!(m, ShimMessage::FilterInstalled { .. }));
    assert!(
        matches!(installed, ShimMessage::FilterInstalled { syscalls, .. } if syscalls == vec!["openat".to_string()])
    );
    c.until(|m| matches!(m, ShimMessage::Started { .. }));
    assert_eq!(c.open(&file), format!("open {file} ok"));

    let rule = parse_fault(
        &format!("openat=ENOENT:100%:{}", dir.path("data/*")),
        Arch::native(),
    )
    .expect("rule");
    c.send(&ControlMessage::SetRules { rules: vec![rule] });
    // The control socket and the target's stdin race; retry until the new
    // rule is in force rather than sleeping a guessed amount.
    let mut got = String::new();
    for _ in 0..50 {
        got = c.open(&file);
        if got.ends_with("ENOENT") {
            break;
        }
    }
    assert_eq!(got, format!("open {file} ENOENT"));
    let event = c.until(|m| matches!(m, ShimMessage::Syscall(e) if e.decision.starts_with("deny")));
    let ShimMessage::Syscall(event) = event else {
        unreachable!()
    };
    assert_eq!(event.syscall, "openat");
    assert_eq!(event.path.as_deref(), Some(file.as_str()));
    assert_eq!(event.errno.as_deref(), Some("ENOENT"));
    assert!(event.seq > 0 && event.time_ns > 0 && event.pid > 0);

    // fsync is outside the filter fixed at launch: refused, old rules stay.
    let fsync = parse_fault("fsync=EIO:100%", Arch::native()).expect("rule");
    c.send(&ControlMessage::SetRules { rules: vec![fsync] });
    let rejected = c.until(|m| matches!(m, ShimMessage::RulesRejected { .. }));
    assert!(
        matches!(&rejected, ShimMessage::RulesRejected { message } if message.contains("does not intercept")),
        "{rejected:?}"
    );
    assert_eq!(c.open(&file), format!("open {file} ENOENT"));

    c.stdin = None;
    let exited = c.until(|m| matches!(m, ShimMessage::Exited { .. }));
    assert!(
        matches!(exited, ShimMessage::Exited { code: Some(0), .. }),
        "{exited:?}"
    );
    let status = c.shim.wait().expect("wait shim");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_target_without_a_filter_refuses_syscall_rules() {
    let mut c = Controller::launch(&[], Vec::new());
    let installed = c.until(|m| matches!(m, ShimMessage::FilterInstalled { .. }));
    assert!(
        matches!(installed, ShimMessage::FilterInstalled { syscalls, .. } if syscalls.is_empty())
    );
    let rule = parse_fault("openat=ENOENT:100%", Arch::native()).expect("rule");
    c.send(&ControlMessage::SetRules { rules: vec![rule] });
    let rejected = c.until(|m| matches!(m, ShimMessage::RulesRejected { .. }));
    assert!(
        matches!(&rejected, ShimMessage::RulesRejected { message } if message.contains("without a seccomp filter"))
    );
    c.send(&ControlMessage::Stop);
    let exited = c.until(|m| matches!(m, ShimMessage::Exited { .. }));
    // Not isolated here, so SIGTERM ends the target directly.
    assert!(
        matches!(
            exited,
            ShimMessage::Exited {
                signal: Some(15),
                ..
            }
        ),
        "{exited:?}"
    );
    let _ = c.shim.wait();
}

#[test]
fn an_unknown_syscall_in_the_launch_request_fails_the_launch() {
    let mut c = Controller::launch(&["notasyscall"], Vec::new());
    let failed = c.next();
    assert!(
        matches!(&failed, ShimMessage::LaunchFailed { message, exit_code: 1 } if message.contains("unknown syscall \"notasyscall\"")),
        "{failed:?}"
    );
    assert_eq!(c.shim.wait().expect("wait").code(), Some(1));
}
