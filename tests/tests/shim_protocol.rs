//! The controller ⇄ shim protocol, driven by this test as the controller:
//! rules replaced while the target runs, rules the filter cannot serve
//! refused, and the event stream's shape.

mod support;

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faultbox_agent::process::make_inheritable;
use faultbox_agent::rule::{Rule, parse_fault};
use faultbox_agent::syscalls::Arch;
use faultbox_agent::tunnel::{self, Credentials};
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
        let shim = Command::new(shim())
            .arg("--control")
            .arg(format!("fd:{}", theirs.as_raw_fd()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn shim");
        drop(theirs);
        Controller::greet(shim, ours, intercept, rules)
    }

    /// The shim dials this controller over mutual TLS, as in a pod.
    fn launch_tls(intercept: &[&str], rules: Vec<Rule>, run: &RunCredentials) -> Controller {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shim = Command::new(shim())
            .arg("--control")
            .arg(format!("tls:{addr}@{}", run.shim.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn shim");
        let tcp = accept_within(&listener, Duration::from_secs(20));
        let config = tunnel::server_config(&run.controller).expect("server config");
        let ours = tunnel::accept(tcp, config).expect("the run's shim is accepted");
        Controller::greet(shim, ours, intercept, rules)
    }

    fn greet(
        mut shim: Child,
        ours: UnixStream,
        intercept: &[&str],
        rules: Vec<Rule>,
    ) -> Controller {
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
            inherit_env: false,
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

/// A run's CA with the controller's credentials and a directory laid out
/// as the shim's Secret is mounted in a pod (ca.crt, tls.crt, tls.key).
struct RunCredentials {
    controller: Credentials,
    shim: PathBuf,
    root: PathBuf,
}

impl Drop for RunCredentials {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn run_credentials(name: &str) -> RunCredentials {
    let root = std::env::temp_dir().join(format!("faultbox-tls-{}-{name}", std::process::id()));
    let (ctl, shim) = (root.join("controller"), root.join("shim"));
    for d in [&ctl, &shim] {
        std::fs::create_dir_all(d).expect("dir");
    }
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    for (dir, subject) in [(&ctl, tunnel::CONTROLLER_NAME), (&shim, "shim")] {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![subject.to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).expect("write");
        std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write");
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write");
    }
    RunCredentials {
        controller: Credentials::in_dir(&ctl),
        shim,
        root,
    }
}

fn accept_within(listener: &TcpListener, limit: Duration) -> TcpStream {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                return s;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the shim never dialled: {e}"),
        }
    }
}

#[test]
fn over_mutual_tls_the_shim_serves_its_controller_as_over_a_socket_pair() {
    let run = run_credentials("ok");
    let rule = parse_fault("openat=EACCES:100%:/etc/hostname", Arch::native()).expect("rule");
    let mut c = Controller::launch_tls(&["openat"], vec![rule], &run);
    assert_eq!(c.open("/etc/hostname"), "open /etc/hostname EACCES");
    assert!(
        c.open("/etc/passwd").ends_with(" ok"),
        "the rule's glob spares it"
    );
    let denied =
        c.until(|m| matches!(m, ShimMessage::Syscall(e) if e.decision.starts_with("deny")));
    let ShimMessage::Syscall(e) = denied else {
        unreachable!()
    };
    assert_eq!(e.path.as_deref(), Some("/etc/hostname"));
    drop(c.stdin.take());
    let exit = c.until(|m| matches!(m, ShimMessage::Exited { .. }));
    assert!(
        matches!(exit, ShimMessage::Exited { code: Some(0), .. }),
        "{exit:?}"
    );
    assert!(c.shim.wait().expect("wait").success());
}

#[test]
fn a_shim_with_another_runs_credentials_is_refused_before_a_message() {
    let run = run_credentials("run");
    let stranger = run_credentials("stranger");
    // The stranger knows the run's CA but holds another run's certificate.
    std::fs::copy(run.shim.join("ca.crt"), stranger.shim.join("ca.crt")).expect("copy");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let child = Command::new(shim())
        .arg("--control")
        .arg(format!("tls:{addr}@{}", stranger.shim.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shim");
    let tcp = accept_within(&listener, Duration::from_secs(20));
    let config = tunnel::server_config(&run.controller).expect("server config");
    let refused = tunnel::accept(tcp, config).map(|_| ());
    assert!(
        matches!(refused, Err(tunnel::TunnelError::Handshake { .. })),
        "{refused:?}"
    );
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("faultbox-shim:"), "{err}");
}

#[test]
fn the_shim_installs_a_copy_of_itself() {
    let dir = std::env::temp_dir().join(format!("faultbox-install-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let dest = dir.join("faultbox-shim");
    let out = Command::new(shim())
        .arg("--install")
        .arg(&dest)
        .output()
        .expect("install");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(&dest).expect("copy"),
        std::fs::read(shim()).expect("shim")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dest).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    let out = Command::new(shim())
        .arg("--install")
        .arg(Path::new("/nonexistent/dir/x"))
        .output()
        .expect("install");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--install /nonexistent/dir/x"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_inheriting_target_gets_the_shims_environment_under_the_controllers() {
    // A pod's shim has the image's environment; the controller's variables
    // go over it.
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    make_inheritable(&theirs).expect("inheritable");
    let shim = Command::new(shim())
        .arg("--control")
        .arg(format!("fd:{}", theirs.as_raw_fd()))
        .env("FROM_IMAGE", "image")
        .env("OVERRIDDEN", "image")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn shim");
    drop(theirs);
    let mut reader = BufReader::new(ours.try_clone().expect("clone"));
    let mut writer = BufWriter::new(ours);
    let _: Option<ShimMessage> = wire::recv(&mut reader).expect("hello");
    let spec = LaunchSpec {
        program: "sh".into(),
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo \"$FROM_IMAGE $OVERRIDDEN $ONLY_SPEC\"".into(),
        ],
        env: vec!["OVERRIDDEN=spec".into(), "ONLY_SPEC=spec".into()],
        inherit_env: true,
        seed: 1,
        ..LaunchSpec::default()
    };
    wire::send(&mut writer, &ControlMessage::Launch(Box::new(spec))).expect("launch");
    writer.flush().expect("flush");
    loop {
        match wire::recv::<_, ShimMessage>(&mut reader) {
            Ok(Some(ShimMessage::Exited { .. })) => break,
            Ok(Some(ShimMessage::LaunchFailed { message, .. })) => panic!("{message}"),
            Ok(Some(_)) => {}
            other => panic!("ended early: {other:?}"),
        }
    }
    let out = shim.wait_with_output().expect("wait");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "image spec spec"
    );
}
