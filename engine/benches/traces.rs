//! Benchmarks of the trace views (issue budgets in docs/benchmarks.md):
//! normalizing a test's trace of 100,000 events and diffing two such
//! normalized traces, each timed and with its peak memory, against a
//! baseline in the same run: serializing the same events to the JSON
//! document (`--output`), and GNU `diff` on the same two files.
//!
//! Each measurement runs in a child process of this binary (`child
//! normalize|json|diff A B`), so its peak resident memory (VmHWM) is its
//! own. Run with `cargo bench -p faultbox-engine --bench traces -- [--quick]`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use faultbox_engine::report::{Outcome, Scrub, TestResult, diff_normalized, normalized};
use faultbox_engine::trace::Trace;

const EVENTS: usize = 100_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A test's trace as three services and the test body would leave it:
/// mostly syscalls on files and sockets, with steps, lifecycle and fault
/// windows among them. `variant` changes one decision in 1,000.
fn results(variant: bool) -> Vec<TestResult> {
    let t = Trace::new();
    let services = ["api", "db", "cache"];
    for s in services {
        t.emit("service_started", s, BTreeMap::new());
        t.emit("service_ready", s, BTreeMap::new());
    }
    let mut i = 0usize;
    while t.last_seq() < EVENTS as u64 {
        let s = services[i % 3];
        let f = |k: &str, v: String| (k.to_string(), v);
        match i % 10 {
            0 => {
                t.emit(
                    "step_send",
                    "test",
                    BTreeMap::from([f("target", s.into()), f("method", "get".into())]),
                );
                t.merge(s, "test");
            }
            1 => {
                t.merge("test", s);
                t.emit(
                    "step_recv",
                    "test",
                    BTreeMap::from([f("target", s.into()), f("method", "get".into())]),
                );
            }
            2 => {
                t.emit("fault_applied", s, BTreeMap::new());
            }
            _ => {
                let decision = if variant && i % 1000 == 7 {
                    "deny(input/output error)"
                } else {
                    "allow"
                };
                t.emit(
                    "syscall",
                    s,
                    BTreeMap::from([
                        f(
                            "syscall",
                            ["write", "fsync", "read", "openat"][i % 4].into(),
                        ),
                        f("decision", decision.into()),
                        f(
                            "path",
                            if i.is_multiple_of(2) {
                                format!("/data/{s}/wal.{}", i % 16)
                            } else {
                                format!("socket:[{}]", 10_000 + i)
                            },
                        ),
                        f("pid", (4000 + i % 7).to_string()),
                        f("latency_ms", String::new()),
                        f("label", String::new()),
                    ]),
                );
            }
        }
        i += 1;
    }
    vec![TestResult {
        name: "test_bulk".into(),
        outcome: Outcome::Pass,
        reason: None,
        failure: None,
        seed: 1,
        duration_ms: 1,
        return_value: None,
        replay: String::new(),
        faults: vec![],
        assertions: 0,
        assertion: None,
        crashes: vec![],
        healthcheck_timeout: false,
        events: t.take_events(),
        diagnostics: vec![],
        interleaving: None,
    }]
}

fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// `child WHAT [A B]`: one measurement; prints `ms peak_kib`.
fn child(args: &[String]) {
    let what = args.get(1).map(String::as_str).unwrap_or_default();
    let (ms, out) = match what {
        "normalize" | "json" => {
            let r = results(false);
            let before = peak_kib();
            let t = Instant::now();
            let text = if what == "normalize" {
                normalized(&r, &Scrub::default())
            } else {
                let doc = faultbox_engine::report::run_json("bench.star", 1, &r);
                serde_json::to_string_pretty(&doc).unwrap_or_default()
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            std::hint::black_box(text.len());
            // The trace itself is the input: report what the view added.
            (ms, peak_kib().saturating_sub(before))
        }
        "diff" => {
            let (a, b) = (&args[2], &args[3]);
            let before = peak_kib();
            let t = Instant::now();
            let ta = std::fs::read_to_string(a).unwrap_or_default();
            let tb = std::fs::read_to_string(b).unwrap_or_default();
            let d = diff_normalized((a, &ta), (b, &tb)).ok().flatten();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            std::hint::black_box(d.map(|d| d.len()));
            (ms, peak_kib().saturating_sub(before))
        }
        _ => (0.0, 0),
    };
    println!("{ms} {out}");
}

fn measure(me: &Path, args: &[&str]) -> (f64, f64) {
    let out = Command::new(me)
        .arg("child")
        .args(args)
        .output()
        .expect("child");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let ms: f64 = it.next().and_then(|v| v.parse().ok()).expect("ms");
    let kib: f64 = it.next().and_then(|v| v.parse().ok()).expect("kib");
    (ms, kib)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        child(&args);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    let me = std::env::current_exe().expect("exe");
    let dir = std::env::temp_dir().join(format!("faultbox-bench-traces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (a, b) = (dir.join("a.norm"), dir.join("b.norm"));
    std::fs::write(&a, normalized(&results(false), &Scrub::default())).expect("a");
    std::fs::write(&b, normalized(&results(true), &Scrub::default())).expect("b");
    let lines = std::fs::read_to_string(&a)
        .map(|t| t.lines().count())
        .unwrap_or(0);
    let (mut norm, mut json, mut ours, mut gnu) = (vec![], vec![], vec![], vec![]);
    let (mut norm_kib, mut json_kib, mut diff_kib) = (vec![], vec![], vec![]);
    let (sa, sb) = (
        a.to_string_lossy().into_owned(),
        b.to_string_lossy().into_owned(),
    );
    let has_diff = Path::new("/usr/bin/diff").exists();
    for _ in 0..reps {
        let (ms, kib) = measure(&me, &["normalize"]);
        norm.push(ms);
        norm_kib.push(kib);
        let (ms, kib) = measure(&me, &["json"]);
        json.push(ms);
        json_kib.push(kib);
        let (ms, kib) = measure(&me, &["diff", &sa, &sb]);
        ours.push(ms);
        diff_kib.push(kib);
        if has_diff {
            let t = Instant::now();
            let _ = Command::new("/usr/bin/diff").args([&sa, &sb]).output();
            gnu.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "trace views, {EVENTS} events ({lines} normalized lines, 100 changed), medians of {reps}:"
    );
    println!(
        "  normalize:                      {:.1} ms, +{:.0} KiB peak",
        median(norm.clone()),
        median(norm_kib)
    );
    println!(
        "  the same events as the JSON document (--output): {:.1} ms, +{:.0} KiB peak   normalize {:.2}x",
        median(json.clone()),
        median(json_kib),
        median(norm) / median(json)
    );
    println!(
        "  faultbox diff (read both, Myers):  {:.1} ms, +{:.0} KiB peak",
        median(ours.clone()),
        median(diff_kib)
    );
    if has_diff {
        println!(
            "  GNU diff on the same files (process incl.): {:.1} ms   ours {:.2}x",
            median(gnu.clone()),
            median(ours) / median(gnu)
        );
    } else {
        println!("  (no /usr/bin/diff for the baseline)");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
