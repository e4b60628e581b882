//! `faultbox-shim`: starts one target under a seccomp user-notification
//! filter and serves it for its controller (the agent's `session`).
//!
//! ```text
//! faultbox-shim --control fd:3
//! faultbox-shim --control unix:/var/run/faultbox/control.sock
//! faultbox-shim --control tls:10.244.0.7:7443@/faultbox/tls
//! faultbox-shim --install /faultbox/bin/faultbox-shim
//! ```
//!
//! `--install` copies this binary to a path: an init container of a
//! service pod runs it from the (FROM scratch) faultbox image to put the
//! shim into a volume the service's own container shares, no `cp` needed.

use faultbox_agent::wire::Endpoint;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, dest] = args.as_slice()
        && flag == "--install"
    {
        match install(std::path::Path::new(dest)) {
            Ok(()) => std::process::exit(0),
            Err(e) => fail(format!("--install {dest}: {e}")),
        }
    }
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

fn install(dest: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe()?;
    let partial = dest.with_extension("partial");
    std::fs::copy(&me, &partial)?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
    // Whole or not at all: the service container never sees half a shim.
    std::fs::rename(&partial, dest)
}

fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("faultbox-shim: {message}");
    std::process::exit(1)
}
