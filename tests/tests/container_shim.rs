//! The shim as a container's entrypoint on the real Docker engine, under
//! Docker's default seccomp profile: it dials its controller over a Unix
//! socket in a bind-mounted directory, installs its filter, and a fault
//! reaches the target inside the container. The groundwork of container
//! mode; `scripts/setup` starts `dockerd` and builds the base image.

mod support;

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultbox_agent::rule::parse_fault;
use faultbox_agent::syscalls::Arch;
use faultbox_agent::wire::{self, ControlMessage, LaunchSpec, OnDisconnect, ShimMessage};
use support::*;

const BASE: &str = "faultbox/debian:bookworm";

/// Docker must answer, and the base image must exist: `scripts/setup`
/// provides both, so a missing one is a loud failure, not a skip.
fn docker_ready() {
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    assert!(
        info.as_ref().is_ok_and(|o| o.status.success()),
        "Docker is not reachable (run scripts/setup, which installs docker.io and starts dockerd): {info:?}"
    );
    let image = Command::new("docker")
        .args(["image", "inspect", BASE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        image.is_ok_and(|s| s.success()),
        "image {BASE} is missing (scripts/setup builds it with debootstrap)"
    );
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
        program: "/bin/cat".into(),
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
