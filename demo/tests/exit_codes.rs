//! The demo binaries' exit codes, as the README documents them for every Sluice
//! program: 64 for a usage error, with a message naming the flag to change.

use std::process::Command;

/// Runs `bin ARGS`; returns the exit code, stdout and stderr.
fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_demo_binaries_exit_64_on_a_bad_flag() {
    for bin in [
        env!("CARGO_BIN_EXE_sluice-demo-upstream"),
        env!("CARGO_BIN_EXE_sluice-demo-load"),
        env!("CARGO_BIN_EXE_sluice-bench-load"),
    ] {
        let (code, _, stderr) = run(bin, &["--bogus"]);
        assert_eq!(code, 64, "{bin}: {stderr}");
        assert!(stderr.contains("'--bogus'"), "{bin}: {stderr}");
    }
    let (code, _, stderr) = run(
        env!("CARGO_BIN_EXE_sluice-bench-load"),
        &["--phases", "warm:5,hot"],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("--phases <PHASES>") && stderr.contains("\"hot\""),
        "{stderr}"
    );
}
