//! Faultbox's agent: everything the shim links. Syscall tables and
//! families, fault rules and the one decision engine (syscall rules here,
//! protocol rules in the proxies), the controller⇄shim protocol and its
//! endpoints (a socket pair, a Unix socket, mutual TLS over TCP), the seccomp user-notification loop, process launch, and the
//! shim's whole session ([`session::run`]).
//!
//! Only [`seccomp`] and [`process`] talk to the kernel directly; they are
//! the crate's only `unsafe` code.

pub mod engine;
pub mod errno;
pub mod glob;
pub mod process;
pub mod rule;
pub mod seccomp;
pub mod session;
pub mod supervisor;
pub mod syscalls;
pub mod tunnel;
pub mod wire;
