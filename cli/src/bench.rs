//! `faultbox bench` (hidden from the help): measurements that have to run
//! where the thing measured runs, such as the runner's proxy inside a pod
//! (docs/benchmarks.md, `cargo bench -p faultbox-e2e --bench cluster`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Subcommand;
use faultbox_proxy::load::{bulk, echo_server, median, ping_pong, sink_server};
use faultbox_proxy::server::Proxy;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Echo and sink servers for `faultbox bench proxy` elsewhere; runs
    /// until killed.
    Serve {
        #[arg(long, default_value = "0.0.0.0:7000")]
        echo: SocketAddr,
        #[arg(long, default_value = "0.0.0.0:7001")]
        sink: SocketAddr,
    },
    /// The TCP proxy in pass-through against a direct connection to the
    /// same servers: p50 ping-pong and bulk throughput, medians of
    /// `--reps`; one JSON line on stdout.
    Proxy {
        /// The echo server (an IP address and port: a static binary has
        /// no name resolution).
        #[arg(long)]
        echo: SocketAddr,
        /// The sink server.
        #[arg(long)]
        sink: SocketAddr,
        #[arg(long, default_value_t = 7)]
        reps: usize,
        #[arg(long, default_value_t = 10_000)]
        rounds: usize,
        /// MiB per bulk transfer.
        #[arg(long, default_value_t = 256)]
        mib: u64,
    },
}

pub fn run(command: BenchCommand) -> Result<i32> {
    match command {
        BenchCommand::Serve { echo, sink } => {
            let e = echo_server(echo).with_context(|| format!("listen on {echo}"))?;
            let s = sink_server(sink).with_context(|| format!("listen on {sink}"))?;
            eprintln!("bench: echo on {e}, sink on {s}");
            loop {
                std::thread::park();
            }
        }
        BenchCommand::Proxy {
            echo,
            sink,
            reps,
            rounds,
            mib,
        } => {
            let events: Arc<dyn faultbox_proxy::EventSink> = Arc::new(faultbox_proxy::NoEvents);
            let via_echo = Proxy::start("bench", "echo", "tcp", echo, Arc::clone(&events))
                .context("start the proxy")?;
            let via_sink =
                Proxy::start("bench", "sink", "tcp", sink, events).context("start the proxy")?;
            let (mut rtt, mut rtt_proxy, mut tput, mut tput_proxy) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..reps.max(1) {
                rtt.push(ping_pong(echo, rounds).context("ping-pong, direct")?);
                rtt_proxy.push(ping_pong(via_echo.listen, rounds).context("ping-pong, proxy")?);
                tput.push(bulk(sink, mib << 20).context("bulk, direct")?);
                tput_proxy.push(bulk(via_sink.listen, mib << 20).context("bulk, proxy")?);
            }
            let (d, p) = (median(rtt), median(rtt_proxy));
            let (bd, bp) = (median(tput), median(tput_proxy));
            eprintln!(
                "ping-pong p50: direct {d:.1} µs, proxy {p:.1} µs (adds {:.1} µs); bulk: direct {bd:.0} MiB/s, proxy {bp:.0} MiB/s ({:.1}%)",
                p - d,
                bp / bd * 100.0
            );
            let doc = serde_json::json!({
                "reps": reps, "rounds": rounds, "mib": mib,
                "ping_pong_us": {"direct": d, "proxy": p, "added": p - d},
                "bulk_mib_s": {"direct": bd, "proxy": bp, "share": bp / bd},
            });
            crate::print_stdout(&format!("{doc}\n"))?;
            via_echo.stop();
            via_sink.stop();
            Ok(0)
        }
    }
}
