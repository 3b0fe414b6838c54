//! Backend lists, the policy's (`spec.backends`) and a route's own
//! (`spec.routes[i].backends`), under the same rules: each backend is an `address`
//! or a Kubernetes `service` with its `port`, weights are 0..=10000 and not all 0,
//! and no backend is listed twice.
//!
//! A Service is named `name` (in the policy's namespace) or `name.namespace`, as a
//! Kubernetes DNS name starts; its model address is the one cluster DNS gives it
//! (see [`ServiceRef::address`]).

use std::collections::HashMap;

use super::{is_dns_label, Checker};
use crate::error::Problem;
use crate::model::*;
use crate::spec::*;

/// The backends listed at `at`; `namespace` is the policy's (for Services named
/// without one).
pub(super) fn backends(
    c: &mut Checker,
    at: &str,
    specs: &[BackendSpec],
    namespace: Option<&str>,
) -> Vec<Backend> {
    let mut list = Vec::with_capacity(specs.len());
    // Only backends whose target (address or Service) passed are compared, so
    // that a mistake is not also reported as a duplicate of another mistake.
    let mut valid = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let (backend, target_ok) = backend(c, &format!("{at}[{i}]"), spec, namespace);
        list.push(backend);
        valid.push(target_ok);
    }
    let mut seen: HashMap<(&Address, Option<&ServicePort>), usize> = HashMap::new();
    for (i, b) in list.iter().enumerate() {
        if !valid[i] {
            continue;
        }
        // A named port has no number in the address (port 0): the name tells apart.
        let port = b.service.as_ref().map(|s| &s.port);
        let key = (
            &b.address,
            port.filter(|p| matches!(p, ServicePort::Name(_))),
        );
        if let Some(first) = seen.insert(key, i) {
            let (field, name) = match &b.service {
                Some(s) => ("service", format!("{s}:{}", s.port)),
                None => ("address", b.address.to_string()),
            };
            c.fail(
                format!("{at}[{i}].{field}"),
                Problem::Duplicate {
                    what: "backend",
                    name,
                    first: format!("at {at}[{first}]"),
                },
            );
        }
    }
    // Judged on what was written, so an out-of-range weight is not also reported as 0.
    if !specs.is_empty() && specs.iter().all(|b| b.weight == Some(0)) {
        c.fail(at, Problem::AllWeightsZero);
    }
    list
}

/// The backend, and whether its target (address or Service) is valid.
fn backend(c: &mut Checker, at: &str, b: &BackendSpec, namespace: Option<&str>) -> (Backend, bool) {
    let before = c.violations.len();
    let nowhere = || Address {
        host: String::new(),
        port: 0,
    };
    let (address, service) = match (&b.address, &b.service) {
        (Some(address), None) => {
            if b.port.is_some() {
                c.fail(format!("{at}.port"), Problem::PortWithoutService);
            }
            (c.address(&format!("{at}.address"), address), None)
        }
        (None, Some(service)) => {
            let service = service_ref(c, at, service, b.port.as_ref());
            (service.address(namespace), Some(service))
        }
        (Some(_), Some(_)) => {
            c.fail(at, Problem::AddressAndService);
            (nowhere(), None)
        }
        (None, None) => {
            c.fail(at, Problem::NoBackendTarget);
            (nowhere(), None)
        }
    };
    let target_ok = c.violations.len() == before;
    let backend = Backend {
        address,
        weight: c.int_range(&format!("{at}.weight"), b.weight.unwrap_or(1), 0, 10_000),
        protocol: match b.protocol {
            None | Some(ProtocolSpec::Http1) => Protocol::Http1,
            Some(ProtocolSpec::H2c) => Protocol::H2c,
        },
        service,
        tls: b
            .tls
            .as_ref()
            .map(|t| super::access::backend_tls(c, &format!("{at}.tls"), t)),
    };
    (backend, target_ok)
}

fn service_ref(c: &mut Checker, at: &str, text: &str, port: Option<&PortSpec>) -> ServiceRef {
    let (name, namespace) = match text.split_once('.') {
        Some((name, namespace)) => (name, Some(namespace)),
        None => (text, None),
    };
    if !is_dns_1035_label(name) || namespace.is_some_and(|ns| !is_dns_label(ns)) {
        c.fail(
            format!("{at}.service"),
            Problem::BadValue {
                expected: "a Service `name` or `name.namespace` (name: lower-case letters, \
                           digits and '-', starting with a letter; namespace: a DNS-1123 \
                           label; each at most 63)"
                    .into(),
                got: text.into(),
            },
        );
    }
    let port = match port {
        None => {
            c.fail(at, Problem::ServiceWithoutPort);
            ServicePort::Number(1)
        }
        Some(PortSpec::Number(n)) => {
            ServicePort::Number(c.int_range(&format!("{at}.port"), *n, 1, 65_535) as u16)
        }
        Some(PortSpec::Name(name)) if is_port_name(name) => ServicePort::Name(name.clone()),
        Some(PortSpec::Name(name)) => {
            c.fail(
                format!("{at}.port"),
                Problem::BadValue {
                    expected: "a port number (1..=65535) or a port name (at most 15 \
                               lower-case letters, digits and '-', with a letter)"
                        .into(),
                    got: name.clone(),
                },
            );
            ServicePort::Number(1)
        }
    };
    ServiceRef {
        name: name.to_owned(),
        namespace: namespace.map(str::to_owned),
        port,
    }
}

/// DNS-1035 label, as Kubernetes requires of Service names: a DNS-1123 label that
/// starts with a letter.
fn is_dns_1035_label(name: &str) -> bool {
    is_dns_label(name) && name.starts_with(|ch: char| ch.is_ascii_lowercase())
}

/// IANA_SVC_NAME (RFC 6335), as Kubernetes requires of port names: at most 15
/// lower-case letters, digits and '-', at least one letter, no '-' at either end
/// nor two in a row.
fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

#[cfg(test)]
mod tests {
    use super::{is_dns_1035_label, is_port_name};
    use crate::model::*;

    fn policy(metadata: &str, spec: &str) -> TrafficPolicy {
        let yaml = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {metadata}\nspec:\n{spec}"
        );
        match crate::parse_str(std::path::Path::new("p.yaml"), &yaml) {
            Ok(mut set) => set.policies.remove(0),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn accepts_services_and_addresses_side_by_side() {
        let p = policy(
            "{name: reviews, namespace: shop}",
            "  backends:\n    - {service: reviews-v1, port: 9080, weight: 90}\n    - {service: reviews-v2.canary, port: http, weight: 10}\n    - {address: legacy.example.com:8080}\n",
        );
        let [v1, v2, legacy] = &p.backends[..] else {
            panic!("{:?}", p.backends)
        };
        assert_eq!(
            v1.service,
            Some(ServiceRef {
                name: "reviews-v1".into(),
                namespace: None,
                port: ServicePort::Number(9080),
            })
        );
        assert_eq!(
            v1.dialable_address().map(ToString::to_string),
            Some("reviews-v1.shop.svc.cluster.local:9080".into())
        );
        assert_eq!(v1.weight, 90);
        // A named port: the Service's own namespace, and nothing to dial by name.
        assert_eq!(v2.address.host, "reviews-v2.canary.svc.cluster.local");
        assert_eq!(v2.dialable_address(), None);
        assert_eq!(
            v2.service.as_ref().map(|s| &s.port),
            Some(&ServicePort::Name("http".into()))
        );
        assert_eq!(legacy.service, None);
        assert_eq!(
            legacy.dialable_address().map(ToString::to_string),
            Some("legacy.example.com:8080".into())
        );
    }

    #[test]
    fn a_service_of_a_policy_without_namespace_is_in_default() {
        let p = policy(
            "{name: reviews}",
            "  backends: [{service: reviews, port: 80}]\n",
        );
        assert_eq!(
            p.backends[0].address.to_string(),
            "reviews.default.svc.cluster.local:80"
        );
    }

    #[test]
    fn a_route_may_name_its_own_backends_and_the_policy_none() {
        let p = policy(
            "{name: reviews}",
            "  routes:\n    - name: canary\n      match: {headers: {x-canary: \"true\"}}\n      backends: [{service: reviews-v2, port: 9080}]\n    - name: rest\n      backends: [{address: 127.0.0.1:9001}]\n",
        );
        assert!(p.backends.is_empty());
        let canary = &p.routes[0];
        assert_eq!(canary.effective_backends(&p.backends).len(), 1);
        assert_eq!(
            canary.backends.as_ref().map(|b| b[0].address.to_string()),
            Some("reviews-v2.default.svc.cluster.local:9080".into())
        );
    }

    #[test]
    fn service_names_start_with_a_letter() {
        assert!(is_dns_1035_label("reviews-v1"));
        assert!(!is_dns_1035_label("1reviews"));
        assert!(!is_dns_1035_label("Reviews"));
        assert!(!is_dns_1035_label("reviews-"));
    }

    #[test]
    fn port_names_are_iana_service_names() {
        for good in ["http", "grpc-web", "h2c", "a1"] {
            assert!(is_port_name(good), "{good}");
        }
        for bad in [
            "",
            "9080",
            "HTTP",
            "-http",
            "http-",
            "grpc--web",
            "a-very-long-port-name",
        ] {
            assert!(!is_port_name(bad), "{bad}");
        }
    }
}
