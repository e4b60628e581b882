//! Writes the FaultTest CRD (generated from the Rust types) to stdout:
//! `cargo run -p faultbox-operator --bin crdgen > operator/crds/faulttest.yaml`.
//! A test fails when the checked-in file is stale.

fn main() -> anyhow::Result<()> {
    print!("{}", faultbox_operator::crd::manifest()?);
    Ok(())
}
