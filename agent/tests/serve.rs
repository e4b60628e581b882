//! The notification loop on the caller's thread, against the real kernel:
//! `Supervisor::serve` must answer the target's calls and return once the
//! target tree is gone (an orphaned filter makes RECV fail at once, every
//! time: a loop that retried would spin forever), and `leave` must end it
//! while a descendant still holds the filter.
//!
//! Forks targets under seccomp filters: run serially (`--test-threads=1`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultbox_agent::process::{self, ChildSpec};
use faultbox_agent::rule::parse_fault;
use faultbox_agent::supervisor::{LiveKernel, Supervisor};
use faultbox_agent::syscalls::Arch;
use faultbox_agent::wire::{EventQueue, ShimMessage};

fn launch(script: &str) -> (process::Spawned, Supervisor<LiveKernel>, Arc<EventQueue>) {
    let arch = Arch::native();
    let rule = parse_fault("openat=ENOENT:100%:/nonexistent/*", arch).expect("rule");
    let nrs = rule.validate(arch).expect("syscalls");
    let argv = vec!["sh".to_string(), "-c".to_string(), script.to_string()];
    let spec = ChildSpec::new("/bin/sh", &argv, &[], None, arch, &nrs).expect("spec");
    let mut child = process::spawn(&spec).expect("spawn");
    child.go().expect("go");
    let events = Arc::new(EventQueue::new());
    let listener = child.listener.take().expect("listener");
    let sup = Supervisor::new(
        LiveKernel::new(listener),
        arch,
        1,
        nrs,
        vec![rule],
        Arc::clone(&events),
    )
    .expect("supervisor");
    child.exec_result().expect("exec");
    (child, sup, events)
}

fn opened(events: &EventQueue) -> Vec<(String, String)> {
    events
        .take_batch()
        .into_iter()
        .filter_map(|m| match m {
            ShimMessage::Syscall(e) if e.syscall == "openat" => {
                Some((e.path.unwrap_or_default(), e.decision.into_owned()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn serve_answers_the_target_and_returns_when_its_tree_is_gone() {
    let (child, sup, events) = launch("cat /etc/hostname /nonexistent/x >/dev/null 2>&1; exit 3");
    let started = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // A watchdog, so that a regression fails the test instead of
        // hanging it.
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if started.elapsed() > Duration::from_secs(10) {
                    sup.leave();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        sup.serve();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "serve took {:?}",
        started.elapsed()
    );
    assert_eq!(
        process::wait_for(child.pid).map(|s| s.shell_code()),
        Some(3)
    );
    sup.quiesce();
    let seen = opened(&events);
    assert!(
        seen.iter()
            .any(|(p, d)| p == "/nonexistent/x" && d.starts_with("deny")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(p, d)| p == "/etc/hostname" && d == "allow"),
        "{seen:?}"
    );
}

#[test]
fn leave_ends_serve_while_a_descendant_still_holds_the_filter() {
    // The target exits at once; its background child keeps the filter
    // alive for 5 s (reparented to us, the subreaper, to be killed after).
    process::become_subreaper().expect("subreaper");
    let (child, sup, _events) = launch("sleep 5 & exit 0");
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !process::has_exited(child.pid) {
                std::thread::sleep(Duration::from_millis(5));
            }
            sup.leave();
        });
        sup.serve();
    });
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "serve outlived the target by {:?}",
        started.elapsed()
    );
    let _ = process::wait_for(child.pid);
    for pid in process::children_of(std::process::id()) {
        process::kill(pid, libc::SIGKILL);
    }
    process::reap_orphans(0);
}
