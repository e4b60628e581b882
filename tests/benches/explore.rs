//! `--explore` against a plain run (docs/benchmarks.md): a two-service
//! test whose `parallel()` holds four fsyncs at once (one round, 24
//! interleavings), played with `--explore all`; the wall time per
//! interleaving against one plain run of the same test. Each measurement
//! is a whole `faultbox test` process, services started and stopped.
//!
//! Needs `scripts/build` (or `scripts/bench`'s release build): `faultbox`
//! and its static shim.
//! `cargo bench -p faultbox-e2e --bench explore -- [--quick]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/faultbox");
    assert!(
        bin.exists(),
        "no {}: run scripts/build first",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("faultbox-bench-explore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let helper = env!("CARGO_BIN_EXE_fbhelper");
    let svc = |name: &str| {
        let port = free_port();
        format!(
            "{name} = service(\"{name}\", \"{helper}\", interface(\"main\", \"tcp\", {port}), args = [\"serve\", \"{port}\", \"{}\"], healthcheck = tcp(\"localhost:{port}\", timeout = \"5s\"))\n",
            dir.join(format!("{name}.wal")).display()
        )
    };
    let spec: PathBuf = dir.join("spec.star");
    std::fs::write(
        &spec,
        format!(
            "{}{}
def test_four():
    trace(a, syscalls = [\"fsync\"], run = lambda: parallel(
        lambda: a.main.send(data = \"PERSIST 1\"),
        lambda: a.main.send(data = \"PERSIST 2\"),
        lambda: b.main.send(data = \"PERSIST 3\"),
        lambda: b.main.send(data = \"PERSIST 4\"),
    ))
",
            svc("a"),
            svc("b")
        ),
    )
    .expect("spec");
    let run = |extra: &[&str]| -> (f64, String) {
        let started = Instant::now();
        let out = Command::new(&bin)
            .arg("test")
            .arg(&spec)
            .args(["--seed", "1", "--format", "json"])
            .args(extra)
            .output()
            .expect("faultbox");
        let wall = started.elapsed().as_secs_f64() * 1000.0;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (wall, String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (mut plain, mut explored) = (Vec::new(), Vec::new());
    let mut played = 0;
    for _ in 0..reps {
        plain.push(run(&[]).0);
        let (wall, json) = run(&["--explore", "all"]);
        let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
        let runs = doc["tests"].as_array().map_or(0, Vec::len);
        let of = doc["tests"][0]["interleaving"]["of"].as_u64().unwrap_or(0);
        assert_eq!((runs, of), (24, 24), "expected 24 interleavings: {json}");
        played = runs;
        explored.push(wall / runs as f64);
    }
    let (p, e) = (median(plain), median(explored));
    println!(
        "explore: {played} interleavings of 4 held fsyncs, two services, {reps} repetitions, medians"
    );
    println!("  one plain run (process, services, test):        {p:8.1} ms");
    println!(
        "  --explore all, wall time per interleaving:       {e:8.1} ms ({:.2}x a plain run)",
        e / p
    );
    let _ = std::fs::remove_dir_all(&dir);
}
