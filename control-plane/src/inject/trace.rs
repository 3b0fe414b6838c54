//! Distributed tracing for injected proxies: where they send spans and how many, as
//! the OpenTelemetry environment variables the proxy reads.
//!
//! The endpoint and the ratio come from the pod (`sluice.dev/otlp-endpoint`,
//! `sluice.dev/trace-sample-ratio`) or else from the mesh-wide defaults in
//! [`InjectOptions`]; the pod wins. Both are parsed here once, into
//! [`OtlpEndpoint`] and [`SampleRatio`], so a flag and an annotation are held to the
//! same rules and the proxy is only ever handed values it can use.
//!
//! Invariants: without an endpoint no `OTEL_*` variable is injected (tracing off, the
//! pod spec as before tracing existed); without a ratio the proxy keeps its own
//! default rather than a second copy of it here. `OTEL_RESOURCE_ATTRIBUTES` refers
//! to `$(POD_NAME)` and `$(POD_NAMESPACE)`, which the kubelet expands only from
//! variables defined earlier in the same container: [`env`] must be appended after
//! the downward-API variables.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv6Addr;

use k8s_openapi::api::core::v1::{EnvVar, Pod};

use super::annotations as ann;
use super::{InjectError, InjectOptions};

/// The variables the proxy reads (the OpenTelemetry SDK names).
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const SAMPLE_RATIO_ENV: &str = "OTEL_TRACES_SAMPLER_ARG";
pub const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";
pub const RESOURCE_ATTRIBUTES_ENV: &str = "OTEL_RESOURCE_ATTRIBUTES";

/// The service name of a pod whose labels name no workload.
pub const DEFAULT_SERVICE_NAME: &str = "sluice-proxy";
/// Pod labels naming the workload, in order of preference: the recommended label
/// first, then the older convention most charts still set.
const WORKLOAD_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];
/// The resource attributes, filled in by the kubelet from the downward-API
/// variables `POD_NAME` and `POD_NAMESPACE` (pod names are often generated, so only
/// the kubelet knows them).
const RESOURCE_ATTRIBUTES: &str = "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)";

/// What an endpoint must look like, for flag and annotation errors alike.
pub const ENDPOINT_EXPECTED: &str =
    "an OTLP/gRPC endpoint URL such as http://otel-collector.monitoring.svc:4317 \
     (http://, a host, an optional port, no path; https:// needs the collector's CA, \
     which injection does not carry)";
/// What a ratio must look like.
pub const RATIO_EXPECTED: &str = "a sampling ratio from 0 to 1, such as 0.01";

/// An OTLP/gRPC collector address: `http://`, a host (DNS name, IPv4, or `[IPv6]`)
/// and an optional port, nothing else.
///
/// Not `https://`: the proxy checks an https collector against a CA it is given
/// (`--otlp-ca-file`, no system roots) and refuses to start without one, and
/// injection has no CA to give it, so an https endpoint here would crash-loop the
/// sidecar. A collector in the cluster takes plaintext OTLP on 4317.
///
/// No path: gRPC sends every call to its own method path, so a path here is a
/// mistake (most often the OTLP/HTTP `/v1/traces` endpoint on 4318). No `$`: the
/// kubelet would try to expand `$(...)` in the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint(String);

impl OtlpEndpoint {
    /// Parses `text` (surrounding whitespace and one trailing `/` dropped); the error
    /// says what was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = text.trim();
        let valid = url
            .strip_prefix("http://")
            .map(|rest| rest.strip_suffix('/').unwrap_or(rest))
            .is_some_and(is_authority);
        if valid {
            Ok(Self(url.strip_suffix('/').unwrap_or(url).to_owned()))
        } else {
            Err(format!("expected {ENDPOINT_EXPECTED}, got `{text}`"))
        }
    }
}

impl fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `host` or `host:port`, the host a DNS name, an IPv4 address or `[IPv6]`.
fn is_authority(authority: &str) -> bool {
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let Some((v6, after)) = rest.split_once(']') else {
                return false;
            };
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => return false,
                },
            };
            (v6.parse::<Ipv6Addr>().is_ok(), port)
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (is_host_name(host), Some(port)),
            None => (is_host_name(authority), None),
        },
    };
    host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
}

/// A DNS name or a dotted IPv4 address (both are dot-separated labels of letters,
/// digits and inner hyphens).
fn is_host_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The share of new traces the proxy samples, from 0 (none) to 1 (all).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRatio(f64);

// `parse` admits no NaN, so equality is total.
impl Eq for SampleRatio {}

impl SampleRatio {
    /// Parses a decimal number in [0, 1] (`0.01`, `1`, `1e-3`); the error says what
    /// was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim().parse::<f64>() {
            // Adding 0 turns `-0` into 0, so the proxy is handed "0", not "-0".
            Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(Self(ratio + 0.0)),
            _ => Err(format!("expected {RATIO_EXPECTED}, got `{text}`")),
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

/// Plain decimal (`0.001`, never `1e-3`), which any float parser reads.
impl fmt::Display for SampleRatio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The `OTEL_*` variables for the pod's proxy: none when neither the pod nor the
/// mesh names an endpoint. Errors name an annotation whose value cannot be used,
/// checked even when no endpoint is set, so a typo is found before it matters.
pub fn env(
    pod: &Pod,
    annotations: &BTreeMap<String, String>,
    opts: &InjectOptions,
) -> Result<Vec<EnvVar>, InjectError> {
    let endpoint = ann::otlp_endpoint(annotations)?.or_else(|| opts.otlp_endpoint.clone());
    let ratio = ann::trace_sample_ratio(annotations)?.or(opts.trace_sample_ratio);
    let Some(endpoint) = endpoint else {
        return Ok(Vec::new());
    };
    let mut env = vec![value_env(ENDPOINT_ENV, endpoint.to_string())];
    if let Some(ratio) = ratio {
        env.push(value_env(SAMPLE_RATIO_ENV, ratio.to_string()));
    }
    env.push(value_env(SERVICE_NAME_ENV, service_name(pod)));
    env.push(value_env(
        RESOURCE_ATTRIBUTES_ENV,
        RESOURCE_ATTRIBUTES.to_owned(),
    ));
    Ok(env)
}

/// The workload's name from the pod's labels, else [`DEFAULT_SERVICE_NAME`]. Label
/// values cannot hold `$`, so the kubelet leaves the name as it is.
fn service_name(pod: &Pod) -> String {
    let labels = pod.metadata.labels.as_ref();
    WORKLOAD_LABELS
        .iter()
        .find_map(|key| {
            labels
                .and_then(|l| l.get(*key))
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        })
        .unwrap_or(DEFAULT_SERVICE_NAME)
        .to_owned()
}

fn value_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use json_patch::PatchOperation;
    use serde_json::{json, Value};

    use super::*;
    use crate::inject::patch::{patch_for_pod, PROXY_CONTAINER};

    #[test]
    fn accepts_http_endpoints_with_a_host() {
        for (text, parsed) in [
            (
                "http://otel-collector.monitoring.svc:4317",
                "http://otel-collector.monitoring.svc:4317",
            ),
            (" http://10.0.0.7:4317/ ", "http://10.0.0.7:4317"),
            ("http://[fd00::7]:4317", "http://[fd00::7]:4317"),
            ("http://[::1]", "http://[::1]"),
        ] {
            assert_eq!(
                OtlpEndpoint::parse(text).map(|e| e.to_string()),
                Ok(parsed.to_owned()),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_endpoints_that_are_not_absolute_http_urls() {
        for bad in [
            "",
            "otel-collector:4317",
            "grpc://otel-collector:4317",
            // The proxy needs a CA for it, which injection does not give it.
            "https://tempo.example.com",
            "HTTP://otel-collector:4317",
            "http://",
            "http://:4317",
            "http://otel-collector:0",
            "http://otel-collector:99999",
            "http://otel-collector:4318/v1/traces",
            "http://otel-collector:4317?x=1",
            "http://user:secret@otel-collector:4317",
            "http://$(HOST_IP):4317",
            "http://otel collector:4317",
            "http://-bad-.svc:4317",
            "http://[fd00::7:4317",
            "http://[not-v6]:4317",
        ] {
            let err = OtlpEndpoint::parse(bad).unwrap_err();
            assert_eq!(err, format!("expected {ENDPOINT_EXPECTED}, got `{bad}`"));
        }
    }

    #[test]
    fn ratios_are_numbers_from_zero_to_one_printed_plainly() {
        for (text, printed) in [
            ("0", "0"),
            ("-0", "0"),
            ("0.01", "0.01"),
            (" 0.250 ", "0.25"),
            ("1e-3", "0.001"),
            ("1", "1"),
        ] {
            assert_eq!(
                SampleRatio::parse(text).map(|r| r.to_string()),
                Ok(printed.to_owned()),
                "{text}"
            );
        }
        for bad in ["", "1.5", "-0.1", "NaN", "inf", "10%", "0,5", "half"] {
            assert_eq!(
                SampleRatio::parse(bad),
                Err(format!("expected {RATIO_EXPECTED}, got `{bad}`")),
            );
        }
    }

    fn pod(labels: &[(&str, &str)]) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        pod
    }

    #[test]
    fn the_service_name_is_the_workloads_label_else_sluice_proxy() {
        assert_eq!(
            service_name(&pod(&[
                ("app.kubernetes.io/name", "checkout"),
                ("app", "old")
            ])),
            "checkout"
        );
        assert_eq!(service_name(&pod(&[("app", "reviews")])), "reviews");
        assert_eq!(service_name(&pod(&[("tier", "web")])), "sluice-proxy");
        assert_eq!(service_name(&Pod::default()), "sluice-proxy");
    }

    // The patch: what the proxy container gets.

    fn opts() -> InjectOptions {
        InjectOptions {
            ca_pem: Some("TEST-CA".into()),
            ..InjectOptions::default()
        }
    }

    fn annotated(annotations: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "checkout-7d9f",
                "labels": {"app.kubernetes.io/name": "checkout"},
                "annotations": annotations,
            },
            "spec": {"containers": [{"name": "app", "image": "app"}]},
        }))
        .expect("a pod")
    }

    /// The injected proxy's env, as (name, value or fieldRef path) in order.
    fn proxy_env(ops: &[PatchOperation]) -> Vec<(String, String)> {
        let proxy = ops
            .iter()
            .filter_map(|op| match op {
                PatchOperation::Add(add) => Some(&add.value),
                _ => None,
            })
            .flat_map(|v| v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]))
            .find(|c| c["name"] == PROXY_CONTAINER)
            .expect("the patch adds the proxy");
        let env: Vec<EnvVar> = serde_json::from_value(proxy["env"].clone()).expect("env");
        env.into_iter()
            .map(|e| {
                let value = e.value.or_else(|| {
                    e.value_from
                        .and_then(|f| f.field_ref)
                        .map(|f| format!("fieldRef:{}", f.field_path))
                });
                (e.name, value.unwrap_or_default())
            })
            .collect()
    }

    fn otel(env: &[(String, String)]) -> Vec<(&str, &str)> {
        env.iter()
            .filter(|(name, _)| name.starts_with("OTEL_"))
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn injects_no_tracing_env_without_an_endpoint() {
        let ops = patch_for_pod(&annotated(json!({})), &opts()).expect("patch");
        assert!(otel(&proxy_env(&ops)).is_empty());
        // A ratio alone turns nothing on, but is still checked.
        let ratio_only = annotated(json!({"sluice.dev/trace-sample-ratio": "0.5"}));
        let ops = patch_for_pod(&ratio_only, &opts()).expect("patch");
        assert!(otel(&proxy_env(&ops)).is_empty());
    }

    #[test]
    fn annotations_turn_tracing_on_after_the_downward_api_variables() {
        let traced = annotated(json!({
            "sluice.dev/otlp-endpoint": "http://otel-collector.monitoring.svc:4317",
            "sluice.dev/trace-sample-ratio": "0.25",
        }));
        let env = proxy_env(&patch_for_pod(&traced, &opts()).expect("patch"));
        assert_eq!(
            otel(&env),
            [
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "http://otel-collector.monitoring.svc:4317"
                ),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
                ("OTEL_SERVICE_NAME", "checkout"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"
                ),
            ]
        );
        // The kubelet expands $(VAR) only from variables defined earlier.
        let position = |name: &str| env.iter().position(|(n, _)| n == name);
        assert_eq!(position("POD_NAME"), Some(0));
        assert_eq!(position("POD_NAMESPACE"), Some(1));
        assert_eq!(env[0].1, "fieldRef:metadata.name");
        assert_eq!(env[1].1, "fieldRef:metadata.namespace");
        assert!(position("POD_NAMESPACE") < position("OTEL_RESOURCE_ATTRIBUTES"));
    }

    #[test]
    fn the_mesh_default_applies_and_the_annotation_beats_it() {
        let mesh = InjectOptions {
            otlp_endpoint: Some(OtlpEndpoint::parse("http://tempo.tracing.svc:4317").expect("url")),
            trace_sample_ratio: Some(SampleRatio::parse("0.05").expect("ratio")),
            ..opts()
        };
        let env = proxy_env(&patch_for_pod(&annotated(json!({})), &mesh).expect("patch"));
        assert_eq!(
            otel(&env)[..2],
            [
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "http://tempo.tracing.svc:4317"
                ),
                ("OTEL_TRACES_SAMPLER_ARG", "0.05"),
            ]
        );
        let own = annotated(json!({
            "sluice.dev/otlp-endpoint": "http://collector.shop.svc:4317",
            "sluice.dev/trace-sample-ratio": "1",
        }));
        let env = proxy_env(&patch_for_pod(&own, &mesh).expect("patch"));
        assert_eq!(
            otel(&env)[..2],
            [
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "http://collector.shop.svc:4317"
                ),
                ("OTEL_TRACES_SAMPLER_ARG", "1"),
            ]
        );
        // Each setting falls back on its own: the pod's ratio, the mesh's endpoint.
        let ratio_only = annotated(json!({"sluice.dev/trace-sample-ratio": "0"}));
        let env = proxy_env(&patch_for_pod(&ratio_only, &mesh).expect("patch"));
        assert_eq!(
            otel(&env)[..2],
            [
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "http://tempo.tracing.svc:4317"
                ),
                ("OTEL_TRACES_SAMPLER_ARG", "0"),
            ]
        );
    }

    #[test]
    fn without_a_ratio_the_proxy_keeps_its_default_and_names_itself() {
        let mut unlabelled = annotated(json!({"sluice.dev/otlp-endpoint": "http://c.svc:4317"}));
        unlabelled.metadata.labels = None;
        let env = proxy_env(&patch_for_pod(&unlabelled, &opts()).expect("patch"));
        let names: Vec<&str> = otel(&env).iter().map(|(n, _)| *n).collect();
        assert!(!names.contains(&"OTEL_TRACES_SAMPLER_ARG"), "{names:?}");
        assert!(otel(&env).contains(&("OTEL_SERVICE_NAME", "sluice-proxy")));
    }

    #[test]
    fn refuses_invalid_tracing_annotations_even_with_a_mesh_default() {
        let mesh = InjectOptions {
            otlp_endpoint: Some(OtlpEndpoint::parse("http://tempo.tracing.svc:4317").expect("url")),
            ..opts()
        };
        for (key, value) in [
            ("sluice.dev/otlp-endpoint", "otel-collector:4317"),
            (
                "sluice.dev/otlp-endpoint",
                "http://otel-collector:4318/v1/traces",
            ),
            ("sluice.dev/trace-sample-ratio", "1.5"),
            ("sluice.dev/trace-sample-ratio", "one percent"),
        ] {
            for opts in [opts(), mesh.clone()] {
                let err = patch_for_pod(&annotated(json!({key: value})), &opts).unwrap_err();
                assert!(
                    matches!(&err, InjectError::Annotation { key: k, value: v, .. }
                        if k == key && v == value),
                    "{key}: {value}: {err}"
                );
            }
        }
    }
}
