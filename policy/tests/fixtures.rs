//! Every invalid fixture under `tests/invalid/` gives exactly the errors in its
//! `.err` file (file:line:column, YAML path, message), and every example policy in
//! `policies/` loads.

use std::path::{Path, PathBuf};

fn fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("tests/invalid")
        .expect("tests/invalid exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_invalid_fixture_gives_its_exact_errors() {
    let files = fixtures();
    assert!(files.len() >= 20, "expected one fixture per error kind");
    let mut mismatches = Vec::new();
    for file in files {
        let got = match sluice_policy::load_path(&file) {
            Ok(set) => panic!("{} was accepted: {set:?}", file.display()),
            Err(errors) => format!("{errors}\n"),
        };
        let expected_file = file.with_extension("err");
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&expected_file, &got).expect("write .err");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_file)
            .unwrap_or_else(|_| panic!("missing {}", expected_file.display()));
        if got != expected {
            mismatches.push(format!(
                "{}:\n  expected: {expected:?}\n  got:      {got:?}",
                file.display()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn every_example_policy_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let set = sluice_policy::load_path(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(set.get("demo").is_some());
    assert!(set.policies.len() >= 8, "one example per mechanism");
}

#[test]
fn unreadable_and_missing_paths_are_errors_not_panics() {
    let err = sluice_policy::load_path(Path::new("tests/no-such-file.yaml")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("tests/no-such-file.yaml:0:0: cannot read policy path"),
        "{text}"
    );

    let dir = std::env::temp_dir().join(format!("sluice-policy-binary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("binary.yaml");
    std::fs::write(&file, [0xff, 0xfe, 0x00, 0x41]).expect("write");
    let text = sluice_policy::load_path(&file).unwrap_err().to_string();
    assert!(text.contains("not UTF-8 text"), "{text}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn committed_json_schema_is_fresh() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/schema.json");
    let fresh = sluice_policy::schema::json_schema();
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write schema");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "policies/schema.json is stale: run `BLESS=1 cargo test -p sluice-policy --test fixtures`"
    );
}
