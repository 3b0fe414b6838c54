//! The committed CRD is the one the policy types generate (`sluice-cp crd`).

#[test]
fn committed_crd_is_fresh() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/base/crd.yaml");
    let fresh = sluice_control_plane::kubernetes::crd_yaml();
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write crd");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "k8s/base/crd.yaml is stale: run `BLESS=1 cargo test -p sluice-control-plane --test crd`"
    );
}
