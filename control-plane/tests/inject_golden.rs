//! `sluice-cp inject` against golden files: every `tests/inject/NAME.yaml` injects to
//! exactly `tests/inject/NAME.out` (`BLESS=1 cargo test -p sluice-control-plane --test
//! inject_golden` rewrites them; review the diff), injecting the output again changes
//! nothing, and the CLI reads files and stdin.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sluice_control_plane::inject::{inject_documents, InjectError, InjectOptions};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

fn fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("tests/inject exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn opts() -> InjectOptions {
    InjectOptions {
        image: "ghcr.io/sluice/sluice:test".into(),
        control_plane: "https://sluice-control-plane.sluice-system.svc:15010".into(),
        ca_pem: Some("-----BEGIN CERTIFICATE-----\nTEST-CA\n-----END CERTIFICATE-----\n".into()),
        otlp_endpoint: None,
        trace_sample_ratio: None,
    }
}

fn inject(text: &str) -> String {
    inject_documents(text, &opts()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_fixture_injects_to_its_golden_output() {
    let files = fixtures();
    assert!(files.len() >= 10, "one fixture per kind, and more");
    let mut mismatches = Vec::new();
    for file in files {
        let got = inject(&std::fs::read_to_string(&file).expect("fixture"));
        let golden = file.with_extension("out");
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&golden, &got).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("missing {}", golden.display()));
        if got != expected {
            mismatches.push(format!("{}:\n{got}", golden.display()));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn every_supported_kind_gets_the_sidecar() {
    for kind in [
        "pod",
        "deployment",
        "statefulset",
        "daemonset",
        "replicaset",
        "job",
        "cronjob",
        "list",
    ] {
        let text = std::fs::read_to_string(dir().join(format!("{kind}.yaml"))).expect("fixture");
        let out = inject(&text);
        assert!(out.contains("name: sluice-proxy"), "{kind}: {out}");
        assert!(out.contains("name: sluice-init"), "{kind}: {out}");
        assert!(out.contains("restartPolicy: Always"), "{kind}: {out}");
    }
}

#[test]
fn injecting_twice_equals_injecting_once() {
    for file in fixtures() {
        let once = inject(&std::fs::read_to_string(&file).expect("fixture"));
        let twice = inject(&once);
        assert_eq!(once, twice, "{}", file.display());
    }
}

#[test]
fn opted_out_host_network_and_other_kinds_are_unchanged() {
    for name in ["opt-out", "passthrough"] {
        let text = std::fs::read_to_string(dir().join(format!("{name}.yaml"))).expect("fixture");
        let out = inject(&text);
        assert!(!out.contains("sluice-proxy"), "{name}: {out}");
        // Unchanged up to formatting: the same documents, read back.
        let read = |s: &str| -> Vec<serde_json::Value> {
            serde_saphyr::from_str_multiple_with_options(
                s,
                serde_saphyr::options! { legacy_octal_numbers: true },
            )
            .expect("yaml")
        };
        assert_eq!(read(&out), read(&text), "{name}");
    }
}

#[test]
fn annotations_reach_the_init_step_and_the_proxy() {
    let text = std::fs::read_to_string(dir().join("deployment.yaml")).expect("fixture");
    let out = inject(&text);
    for expected in [
        "- --skip-outbound-ports\n        - 5432,6379\n",
        "- --skip-inbound-ports\n        - \"9100\"\n",
        "- --skip-outbound-cidrs\n        - 169.254.169.254/32,10.96.0.0/12\n",
        "cpu: 100m",
        "memory: 128Mi",
        "cpu: \"2\"",
        "memory: 512Mi",
        "- --app\n        - 127.0.0.1:8080\n",
        "- --redis\n        - redis.sluice-system.svc:6379\n",
        // Tracing: the workload's name, and the pod's identity from the downward API.
        "- name: OTEL_EXPORTER_OTLP_ENDPOINT\n          value: http://otel-collector.monitoring.svc:4317\n",
        "- name: OTEL_TRACES_SAMPLER_ARG\n          value: \"0.1\"\n",
        "- name: OTEL_SERVICE_NAME\n          value: checkout\n",
        "- name: OTEL_RESOURCE_ATTRIBUTES\n          value: k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)\n",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
}

#[test]
fn drain_timeout_follows_the_grace_period() {
    let out = inject(&std::fs::read_to_string(dir().join("statefulset.yaml")).expect("fixture"));
    assert!(out.contains("- --drain-timeout\n        - 55s\n"), "{out}");
    let out = inject(&std::fs::read_to_string(dir().join("job.yaml")).expect("fixture"));
    assert!(out.contains("- 1s\n"), "{out}");
    let out = inject(&std::fs::read_to_string(dir().join("pod.yaml")).expect("fixture"));
    assert!(out.contains("- 25s\n"), "{out}");
}

#[test]
fn a_bad_annotation_names_the_document_and_the_annotation() {
    let text = "\
apiVersion: v1
kind: Service
metadata: {name: fine}
---
apiVersion: v1
kind: Pod
metadata:
  name: bad
  annotations: {sluice.dev/skip-outbound-ports: \"5432,postgres\"}
spec:
  containers: [{name: app, image: app}]
";
    let err = inject_documents(text, &opts()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "document 2 (Pod bad): annotation sluice.dev/skip-outbound-ports: expected a \
         comma-separated list of a TCP port (1-65535); `postgres` is not, got `5432,postgres`"
    );
    assert!(matches!(err, InjectError::Document { index: 2, .. }));
}

#[test]
fn invalid_yaml_and_invalid_pods_are_errors() {
    assert!(matches!(
        inject_documents("kind: [unclosed", &opts()),
        Err(InjectError::Yaml(_))
    ));
    let err = inject_documents(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n",
        &opts(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("document 1 (Pod p): the pod template is not a valid pod"),
        "{err}"
    );
}

fn sluice_cp(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-cp"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice-cp runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("sluice-cp exits");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_reads_a_file_or_stdin_and_fails_with_the_reason() {
    let file = dir().join("pod.yaml");
    let text = std::fs::read_to_string(&file).expect("fixture");
    let path = file.to_str().expect("utf-8 path");
    let ca = std::env::temp_dir().join(format!("sluice-inject-ca-{}.crt", std::process::id()));
    std::fs::write(&ca, opts().ca_pem.expect("test CA")).expect("CA file");
    let ca = ca.to_str().expect("utf-8 path").to_owned();
    let args = [
        "inject",
        "--image",
        "ghcr.io/sluice/sluice:test",
        "--ca-file",
        &ca,
        "-f",
    ];
    let (code, from_file, stderr) = sluice_cp(&[&args[..], &[path]].concat(), "");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(from_file, inject(&text));
    let (code, from_stdin, _) = sluice_cp(&[&args[..], &["-"]].concat(), &text);
    assert_eq!(code, 0);
    assert_eq!(from_stdin, from_file);

    let (code, stdout, stderr) = sluice_cp(&["inject", "-f", "-"], "kind: [unclosed");
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(
        stderr.starts_with("sluice-cp inject: cannot read the manifests as YAML"),
        "{stderr}"
    );
    let (code, _, stderr) = sluice_cp(&["inject", "-f", "/no/such/file.yaml"], "");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read /no/such/file.yaml"),
        "{stderr}"
    );
    // A pod that follows the control plane needs its CA, and the error says how.
    let (code, _, stderr) = sluice_cp(&["inject", "-f", path], "");
    assert_eq!(code, 1);
    assert!(stderr.contains("--ca-file"), "{stderr}");
    assert!(stderr.contains("sluice.dev/policy-configmap"), "{stderr}");
}

#[test]
fn cli_flags_set_the_mesh_wide_tracing_default_and_refuse_bad_values() {
    let path = dir().join("pod.yaml");
    let path = path.to_str().expect("utf-8 path");
    let (code, out, stderr) = sluice_cp(
        &[
            "inject",
            "--ca-file",
            "/dev/null",
            "--otlp-endpoint",
            "http://tempo.tracing.svc:4317",
            "--trace-sample-ratio",
            "0.02",
            "-f",
            path,
        ],
        "",
    );
    assert_eq!(code, 0, "{stderr}");
    // Indentation-free: a bare Pod's containers sit less deep than a template's.
    let env = |name: &str, value: &str| {
        let pair = format!("- name: {name}\n");
        let at = out
            .find(&pair)
            .unwrap_or_else(|| panic!("no {name} in\n{out}"));
        let next = out[at + pair.len()..].trim_start();
        assert!(
            next.starts_with(&format!("value: {value}\n")),
            "{name}: {next}"
        );
    };
    env(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://tempo.tracing.svc:4317",
    );
    env("OTEL_TRACES_SAMPLER_ARG", "\"0.02\"");
    // pod.yaml has no workload label.
    env("OTEL_SERVICE_NAME", "sluice-proxy");

    for (flag, value, expected) in [
        ("--otlp-endpoint", "tempo:4317", "OTLP/gRPC endpoint URL"),
        ("--trace-sample-ratio", "2", "sampling ratio from 0 to 1"),
    ] {
        let (code, out, stderr) = sluice_cp(&["inject", flag, value, "-f", path], "");
        assert_eq!(code, 64, "{flag} {value}: {stderr}");
        assert!(out.is_empty());
        assert!(
            stderr.contains(flag) && stderr.contains(expected),
            "{flag} {value}: {stderr}"
        );
    }
}
