//! Faultbox's spec language: Starlark with Faultbox's builtins, and the
//! plain model a spec produces (services, interfaces, syscall and
//! protocol fault rules, tests, recipes, the embedded stdlib).
//!
//! Loading a spec needs this crate alone (`faultbox test --dry-run`, the
//! operator's validation). Test bodies run against a [`host::TestHost`],
//! which the runtime implements; nothing here names the runtime.

pub use faultbox_agent::rule::parse_duration;

pub mod builtins;
pub mod check;
pub mod event;
pub mod host;
pub mod load;
pub mod model;
#[allow(unsafe_code)] // derive(ProvidesStaticType) expands to an unsafe impl; see the module doc
pub mod values;
