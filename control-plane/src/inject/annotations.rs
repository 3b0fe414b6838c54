//! The pod annotations that steer injection, read and checked once.
//!
//! A bad annotation value is an error naming the annotation and the value, never a
//! silently ignored setting: a pod that asked for `skip-outbound-ports: 5432,abc`
//! must not come up with its database traffic going through the proxy.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::trace::{OtlpEndpoint, SampleRatio, ENDPOINT_EXPECTED, RATIO_EXPECTED};
use super::InjectError;

/// `enabled` or `disabled`: opt a pod in or out (the namespace label opts in too).
pub const INJECT: &str = "sluice.dev/inject";
/// The proxy image; defaults to [`super::InjectOptions::image`].
pub const PROXY_IMAGE: &str = "sluice.dev/proxy-image";
/// A ConfigMap holding the pod's policies; without it the proxy subscribes to the
/// control plane.
pub const POLICY_CONFIGMAP: &str = "sluice.dev/policy-configmap";
/// Comma-separated TCP ports whose outbound traffic bypasses the proxy.
pub const SKIP_OUTBOUND_PORTS: &str = "sluice.dev/skip-outbound-ports";
/// Comma-separated TCP ports whose inbound traffic bypasses the proxy.
pub const SKIP_INBOUND_PORTS: &str = "sluice.dev/skip-inbound-ports";
/// Comma-separated IPv4 CIDRs whose outbound traffic bypasses the proxy.
pub const SKIP_OUTBOUND_CIDRS: &str = "sluice.dev/skip-outbound-cidrs";
/// Comma-separated destination ports whose connections are opaque TCP without
/// protocol detection (the proxy's `--opaque-ports`; replaces its default list):
/// server-speaks-first protocols on ports the default does not list.
pub const OPAQUE_PORTS: &str = "sluice.dev/opaque-ports";
/// `host:port` of the Redis holding the buckets of `globalRateLimit` routes, shared
/// by every replica (the proxy's `--redis`).
pub const REDIS: &str = "sluice.dev/redis";
/// Comma-separated hosts whose policies the proxy holds from the start and never
/// releases (its `--dependency`): what it calls by address rather than by a Host a
/// policy names, or what must not wait for discovery on the first request.
pub const DEPENDENCIES: &str = "sluice.dev/dependencies";
/// The OTLP/gRPC collector the proxy sends its spans to (its
/// `OTEL_EXPORTER_OTLP_ENDPOINT`); defaults to [`super::InjectOptions::otlp_endpoint`],
/// and without either the proxy does not trace.
pub const OTLP_ENDPOINT: &str = "sluice.dev/otlp-endpoint";
/// The share of new traces the proxy samples, 0 to 1 (its `OTEL_TRACES_SAMPLER_ARG`);
/// defaults to [`super::InjectOptions::trace_sample_ratio`], else the proxy's own.
pub const TRACE_SAMPLE_RATIO: &str = "sluice.dev/trace-sample-ratio";
pub const PROXY_CPU_REQUEST: &str = "sluice.dev/proxy-cpu-request";
pub const PROXY_MEMORY_REQUEST: &str = "sluice.dev/proxy-memory-request";
pub const PROXY_CPU_LIMIT: &str = "sluice.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_LIMIT: &str = "sluice.dev/proxy-memory-limit";

/// Whether `sluice.dev/inject: disabled` is set, as an annotation or a label (the
/// webhook's object selector can only see labels).
pub fn opted_out(
    annotations: Option<&BTreeMap<String, String>>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let disabled = |m: Option<&BTreeMap<String, String>>| {
        m.and_then(|m| m.get(INJECT))
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("disabled"))
    };
    disabled(annotations) || disabled(labels)
}

/// A comma-separated port list, normalised (`"5432, 6379"` -> `"5432,6379"`);
/// `None` when the annotation is absent or empty.
pub fn ports(
    annotations: &BTreeMap<String, String>,
    key: &str,
) -> Result<Option<String>, InjectError> {
    list(
        annotations,
        key,
        |item| item.parse::<u16>().ok().filter(|p| *p != 0).is_some(),
        "a TCP port (1-65535)",
    )
}

/// A comma-separated IPv4 CIDR list (`10.0.0.0/8,192.168.1.5/32`), normalised.
pub fn cidrs(
    annotations: &BTreeMap<String, String>,
    key: &str,
) -> Result<Option<String>, InjectError> {
    list(
        annotations,
        key,
        is_ipv4_cidr,
        "an IPv4 CIDR such as 10.0.0.0/8",
    )
}

fn is_ipv4_cidr(item: &str) -> bool {
    match item.split_once('/') {
        Some((addr, len)) => {
            addr.parse::<Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
        }
        None => item.parse::<Ipv4Addr>().is_ok(),
    }
}

fn list(
    annotations: &BTreeMap<String, String>,
    key: &str,
    valid: impl Fn(&str) -> bool,
    expected: &'static str,
) -> Result<Option<String>, InjectError> {
    let Some(raw) = annotations.get(key) else {
        return Ok(None);
    };
    let items: Vec<&str> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = items.iter().find(|item| !valid(item)) {
        return Err(InjectError::Annotation {
            key: key.to_owned(),
            value: raw.clone(),
            expected: format!("a comma-separated list of {expected}; `{bad}` is not"),
        });
    }
    Ok((!items.is_empty()).then(|| items.join(",")))
}

/// The `sluice.dev/dependencies` hosts (DNS names, lower case), normalised.
pub fn dependencies(annotations: &BTreeMap<String, String>) -> Result<Option<String>, InjectError> {
    list(
        annotations,
        DEPENDENCIES,
        |item| {
            item.len() <= 253
                && item.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                })
        },
        "lower-case DNS names",
    )
}

/// The `sluice.dev/redis` address (`host:port`), if set.
pub fn redis(annotations: &BTreeMap<String, String>) -> Result<Option<String>, InjectError> {
    let Some(raw) = annotations.get(REDIS) else {
        return Ok(None);
    };
    match sluice_policy::validate::parse_address(raw.trim()) {
        Some(address) => Ok(Some(address.to_string())),
        None => Err(InjectError::Annotation {
            key: REDIS.to_owned(),
            value: raw.clone(),
            expected: "host:port, such as redis.sluice-system.svc:6379".to_owned(),
        }),
    }
}

/// The `sluice.dev/otlp-endpoint` URL, if set.
pub fn otlp_endpoint(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<OtlpEndpoint>, InjectError> {
    let Some(raw) = annotations.get(OTLP_ENDPOINT) else {
        return Ok(None);
    };
    OtlpEndpoint::parse(raw)
        .map(Some)
        .map_err(|_| InjectError::Annotation {
            key: OTLP_ENDPOINT.to_owned(),
            value: raw.clone(),
            expected: ENDPOINT_EXPECTED.to_owned(),
        })
}

/// The `sluice.dev/trace-sample-ratio`, if set.
pub fn trace_sample_ratio(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<SampleRatio>, InjectError> {
    let Some(raw) = annotations.get(TRACE_SAMPLE_RATIO) else {
        return Ok(None);
    };
    SampleRatio::parse(raw)
        .map(Some)
        .map_err(|_| InjectError::Annotation {
            key: TRACE_SAMPLE_RATIO.to_owned(),
            value: raw.clone(),
            expected: RATIO_EXPECTED.to_owned(),
        })
}

/// A Kubernetes resource quantity (`50m`, `1`, `0.5`, `64Mi`, `1G`), or the default.
pub fn quantity(
    annotations: &BTreeMap<String, String>,
    key: &str,
    default: &str,
) -> Result<String, InjectError> {
    let Some(raw) = annotations.get(key) else {
        return Ok(default.to_owned());
    };
    let value = raw.trim();
    if is_quantity(value) {
        Ok(value.to_owned())
    } else {
        Err(InjectError::Annotation {
            key: key.to_owned(),
            value: raw.clone(),
            expected: "a resource quantity such as 100m, 0.5, 128Mi or 1G".to_owned(),
        })
    }
}

/// The Kubernetes quantity grammar without exponents: a decimal number and an optional
/// SI or binary suffix.
fn is_quantity(s: &str) -> bool {
    const SUFFIXES: [&str; 14] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P",
    ];
    let number = SUFFIXES
        .iter()
        .find_map(|suffix| s.strip_suffix(suffix))
        .unwrap_or(s);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    !number.is_empty()
        && number != "."
        && digits(int)
        && digits(frac)
        && (int.len() + frac.len()) > 0
}

/// The proxy image: the annotation when set, else the default.
pub fn image(annotations: &BTreeMap<String, String>, default: &str) -> String {
    annotations
        .get(PROXY_IMAGE)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .unwrap_or(default)
        .to_owned()
}

/// The policy ConfigMap's name, checked as a DNS-1123 subdomain.
pub fn policy_configmap(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<String>, InjectError> {
    let Some(raw) = annotations.get(POLICY_CONFIGMAP) else {
        return Ok(None);
    };
    let name = raw.trim();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(Some(name.to_owned()))
    } else {
        Err(InjectError::Annotation {
            key: POLICY_CONFIGMAP.to_owned(),
            value: raw.clone(),
            expected: "a ConfigMap name (lower-case letters, digits, '-' and '.')".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(key: &str, value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(key.to_owned(), value.to_owned())])
    }

    #[test]
    fn normalises_port_lists_and_rejects_non_ports() {
        let a = map(SKIP_OUTBOUND_PORTS, " 5432, 6379 ,");
        assert_eq!(ports(&a, SKIP_OUTBOUND_PORTS), Ok(Some("5432,6379".into())));
        let a = map(SKIP_OUTBOUND_PORTS, "5432,abc");
        let err = ports(&a, SKIP_OUTBOUND_PORTS).unwrap_err().to_string();
        assert!(err.contains("`abc` is not"), "{err}");
        assert!(ports(&map(SKIP_INBOUND_PORTS, "0"), SKIP_INBOUND_PORTS).is_err());
        assert!(ports(&map(SKIP_INBOUND_PORTS, "65536"), SKIP_INBOUND_PORTS).is_err());
        assert_eq!(
            ports(&map(SKIP_INBOUND_PORTS, ""), SKIP_INBOUND_PORTS),
            Ok(None)
        );
    }

    #[test]
    fn dependencies_are_dns_names() {
        let a = map(DEPENDENCIES, "reviews.shop.svc.cluster.local, ratings ,");
        assert_eq!(
            dependencies(&a),
            Ok(Some("reviews.shop.svc.cluster.local,ratings".into()))
        );
        for bad in ["Reviews", "a..b", "http://x", "x:80"] {
            assert!(dependencies(&map(DEPENDENCIES, bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn accepts_ipv4_cidrs_only() {
        let a = map(SKIP_OUTBOUND_CIDRS, "10.0.0.0/8, 192.168.1.5");
        assert_eq!(
            cidrs(&a, SKIP_OUTBOUND_CIDRS),
            Ok(Some("10.0.0.0/8,192.168.1.5".into()))
        );
        for bad in ["10.0.0.0/33", "fd00::/8", "example.com"] {
            assert!(cidrs(&map(SKIP_OUTBOUND_CIDRS, bad), SKIP_OUTBOUND_CIDRS).is_err());
        }
    }

    #[test]
    fn redis_is_a_host_and_port() {
        assert_eq!(redis(&BTreeMap::new()), Ok(None));
        assert_eq!(
            redis(&map(REDIS, " redis.sluice-system.svc:6379 ")),
            Ok(Some("redis.sluice-system.svc:6379".into()))
        );
        for bad in ["redis", "redis:", ":6379", "redis:99999", "redis://x:6379"] {
            let err = redis(&map(REDIS, bad)).unwrap_err().to_string();
            assert!(
                err.contains("sluice.dev/redis") && err.contains("host:port"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn tracing_annotations_are_checked_and_name_themselves_when_bad() {
        assert_eq!(otlp_endpoint(&BTreeMap::new()), Ok(None));
        assert_eq!(trace_sample_ratio(&BTreeMap::new()), Ok(None));
        assert_eq!(
            otlp_endpoint(&map(
                OTLP_ENDPOINT,
                "http://otel-collector.monitoring.svc:4317"
            ))
            .map(|e| e.map(|e| e.to_string())),
            Ok(Some("http://otel-collector.monitoring.svc:4317".into()))
        );
        assert_eq!(
            trace_sample_ratio(&map(TRACE_SAMPLE_RATIO, "0.5")).map(|r| r.map(|r| r.get())),
            Ok(Some(0.5))
        );
        assert_eq!(
            otlp_endpoint(&map(OTLP_ENDPOINT, "otel-collector:4317"))
                .unwrap_err()
                .to_string(),
            "annotation sluice.dev/otlp-endpoint: expected an OTLP/gRPC endpoint URL such as \
             http://otel-collector.monitoring.svc:4317 (http://, a host, an optional port, no \
             path; https:// needs the collector's CA, which injection does not carry), got \
             `otel-collector:4317`"
        );
        assert_eq!(
            trace_sample_ratio(&map(TRACE_SAMPLE_RATIO, "5%"))
                .unwrap_err()
                .to_string(),
            "annotation sluice.dev/trace-sample-ratio: expected a sampling ratio from 0 to 1, \
             such as 0.01, got `5%`"
        );
    }

    #[test]
    fn checks_resource_quantities() {
        for good in ["50m", "1", "0.5", "64Mi", "1G", "250k"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", "m", "1.2.3", "64MB", "-1", "lots", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn opts_out_by_annotation_or_label() {
        let off = map(INJECT, "disabled");
        assert!(opted_out(Some(&off), None));
        assert!(opted_out(None, Some(&off)));
        assert!(!opted_out(Some(&map(INJECT, "enabled")), None));
        assert!(!opted_out(None, None));
    }
}
