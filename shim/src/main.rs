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
    let endpoint = match args.as_slice() {
        [flag, value] if flag == "--control" => Endpoint::parse(value),
        [single] if single.starts_with("--control=") => {
            Endpoint::parse(&single["--control=".len()..])
        }
        _ => Err(Endpoint::USAGE.to_string()),
    };
    let code = match endpoint.and_then(|e| faultbox_agent::session::run(&e)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("faultbox-shim: {message}");
            1
        }
    };
    std::process::exit(code);
}
