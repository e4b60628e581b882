//! Traffic for measuring a relay against a direct connection: an echo
//! server and a sink (it answers with the byte count once the client
//! shuts its side down), a 64-byte ping-pong and a one-way bulk stream.
//! The proxy benchmark runs them in one process; `faultbox bench` runs
//! the servers in one pod and the clients in another, so the in-cluster
//! proxy is measured between the same two pods as the direct path.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

/// The median of `v` (the upper one of an even count); 0 when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn serve(l: TcpListener, each: fn(TcpStream)) {
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || each(c));
        }
    });
}

/// An echo server on `bind` (port 0: any), in threads of this process.
pub fn echo_server(bind: SocketAddr) -> io::Result<SocketAddr> {
    let l = TcpListener::bind(bind)?;
    let addr = l.local_addr()?;
    serve(l, |mut c| {
        let _ = c.set_nodelay(true);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(addr)
}

/// A sink on `bind`: reads to the end, then writes the count (u64 LE).
pub fn sink_server(bind: SocketAddr) -> io::Result<SocketAddr> {
    let l = TcpListener::bind(bind)?;
    let addr = l.local_addr()?;
    serve(l, |mut c| {
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        let _ = c.write_all(&total.to_le_bytes());
    });
    Ok(addr)
}

/// The median round trip of `rounds` 64-byte messages to an echo
/// server, in microseconds.
pub fn ping_pong(addr: SocketAddr, rounds: usize) -> io::Result<f64> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(rtts))
}

/// MiB/s of `bytes` sent one way to a sink, counted as the sink confirms.
pub fn bulk(addr: SocketAddr, bytes: u64) -> io::Result<f64> {
    let mut s = TcpStream::connect(addr)?;
    let chunk = vec![1u8; 256 << 10];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut total = [0u8; 8];
    s.read_exact(&mut total)?;
    if u64::from_le_bytes(total) != sent {
        return Err(io::Error::other(format!(
            "the sink counted {} bytes of {sent}",
            u64::from_le_bytes(total)
        )));
    }
    Ok(sent as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_answer_and_the_clients_measure() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let echo = echo_server(any).expect("echo");
        let sink = sink_server(any).expect("sink");
        assert!(ping_pong(echo, 10).expect("ping") > 0.0);
        assert!(bulk(sink, 4 << 20).expect("bulk") > 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![]), 0.0);
    }
}
