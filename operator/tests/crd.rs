//! The checked-in CRD is what the Rust types generate.

#[test]
fn the_checked_in_crd_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/faulttest.yaml");
    let checked_in = std::fs::read_to_string(path).expect("operator/crds/faulttest.yaml");
    let generated = faultbox_operator::crd::manifest().expect("manifest");
    assert!(
        checked_in == generated,
        "operator/crds/faulttest.yaml is stale: run `cargo run -p faultbox-operator --bin crdgen > operator/crds/faulttest.yaml`"
    );
    let chart = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/faultbox/crds/faulttest.yaml"
    );
    assert!(
        std::fs::read_to_string(chart).is_ok_and(|c| c == generated),
        "charts/faultbox/crds/faulttest.yaml differs from the generated CRD: copy operator/crds/faulttest.yaml there"
    );
    assert!(
        !generated.contains("serde_json::private"),
        "numbers must stay numbers"
    );
    for want in [
        "shortNames:\n    - ft",
        "subresources:\n      status: {}",
        "name: Verdict",
    ] {
        assert!(generated.contains(want), "{want:?} in\n{generated}");
    }
}
