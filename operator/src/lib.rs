//! The Faultbox operator: FaultTest resources validated with
//! `faultbox-spec`, each generation run by a runner pod (the `faultbox`
//! image), the result turned into the status. See docs/design.md
//! ("Kubernetes").

pub mod crd;
pub mod lease;
pub mod metrics;
pub mod reconcile;
pub mod schedule;
