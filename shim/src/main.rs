//! `faultbox-shim`: starts one target under a seccomp user-notification
//! filter and serves it for its controller (the agent's `session`).
//!
//! ```text
//! faultbox-shim --control fd:3
//! faultbox-shim --control unix:/var/run/faultbox/control.sock
//! ```

use faultbox_agent::wire::Endpoint;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = match args.as_slice() {
        [flag, value] if flag == "--control" => value.as_str(),
        [single] if single.starts_with("--control=") => &single["--control=".len()..],
        _ => fail(Endpoint::USAGE),
    };
    let endpoint = Endpoint::parse(value).unwrap_or_else(|e| fail(e));
    match faultbox_agent::session::run(&endpoint) {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(e),
    }
}

fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("faultbox-shim: {message}");
    std::process::exit(1)
}
