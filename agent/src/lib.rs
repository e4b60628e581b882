//! Faultbox's agent: everything the shim links. Syscall tables and
//! families, fault rules and the pure decision engine, the controller⇄shim
//! protocol, and the seccomp user-notification loop.
//!
//! Only [`seccomp`] and [`process`] talk to the kernel directly; they are
//! the crate's only `unsafe` code.

pub mod engine;
pub mod errno;
pub mod glob;
pub mod process;
pub mod rule;
pub mod seccomp;
pub mod supervisor;
pub mod syscalls;
pub mod wire;
