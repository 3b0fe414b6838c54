//! The sidecar as a JSON Patch against one pod: what both the CLI and the webhook
//! apply, so the two can never disagree.
//!
//! Invariants: the patch is empty for a pod that already has the proxy (injecting
//! twice equals injecting once), that opted out, or that runs on the host network
//! (its iptables rules would be the node's). Every path is relative to the pod
//! (`/metadata/...`, `/spec/...`); the CLI prefixes it with the template's location.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use super::annotations as ann;
use super::{InjectError, InjectOptions};

/// Name of the injected proxy container; its presence marks a pod as injected.
pub const PROXY_CONTAINER: &str = "sluice-proxy";
/// Name of the injected iptables init container.
pub const INIT_CONTAINER: &str = "sluice-init";
/// Name of the policy ConfigMap volume.
pub const POLICY_VOLUME: &str = "sluice-policy";
/// Where the proxy keeps its last good control-plane snapshot (an emptyDir: the
/// proxy's root filesystem is read-only, and a container restart keeps it).
pub const STATE_VOLUME: &str = "sluice-state";
pub const STATE_MOUNT: &str = "/var/run/sluice";
/// Annotation naming the policy that governs traffic into the pod.
pub const INBOUND_POLICY_ANNOTATION: &str = "sluice.dev/inbound-policy";
/// Where the policy ConfigMap is mounted in the proxy.
pub const POLICY_MOUNT: &str = "/etc/sluice/policy";

/// The proxy's admin listener, on loopback only: `/config_dump` shows every policy.
pub const ADMIN_PORT: u16 = 15000;
/// Probes and Prometheus on the pod IP: `/live`, `/ready`, `/metrics` only. The one
/// port inbound interception leaves alone.
pub const TELEMETRY_PORT: u16 = 15020;
/// The projected ServiceAccount token the proxy presents to the control plane.
pub const TOKEN_VOLUME: &str = "sluice-token";
pub const TOKEN_MOUNT: &str = "/var/run/secrets/sluice";
/// The audience of that token: the control plane asks TokenReview for it.
pub const TOKEN_AUDIENCE: &str = "sluice";
/// How long a token lives; the kubelet renews it at 80% of this, and the proxy
/// reads the file again at each connection.
pub const TOKEN_SECONDS: i64 = 3600;
/// Marks an injected pod (what the shipped PodMonitor selects).
pub const INJECTED_LABEL: &str = "sluice.dev/proxy";
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const PROXY_UID: i64 = 1337;

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;
/// How much of the grace period is left to the kubelet after the proxy drained.
const DRAIN_MARGIN_SECONDS: i64 = 5;

/// The JSON Patch that adds the sidecar to `pod`; empty when nothing is to be done.
///
/// Errors name a pod annotation whose value cannot be used.
pub fn patch_for_pod(pod: &Pod, opts: &InjectOptions) -> Result<Vec<PatchOperation>, InjectError> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(Vec::new());
    };
    let has_proxy = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .any(|c| c.name == PROXY_CONTAINER);
    if has_proxy
        || spec.host_network == Some(true)
        || ann::opted_out(
            pod.metadata.annotations.as_ref(),
            pod.metadata.labels.as_ref(),
        )
    {
        return Ok(Vec::new());
    }

    let image = ann::image(annotations, &opts.image);
    let policy_configmap = ann::policy_configmap(annotations)?;
    let proxy = proxy_container(pod, annotations, &image, policy_configmap.is_some(), opts)?;
    let init = init_container(annotations, &image)?;

    let mut ops = Vec::new();
    if pod.metadata == Default::default() {
        ops.push(add(&["metadata"], json!({})));
    }
    match &pod.metadata.labels {
        None => ops.push(add(
            &["metadata", "labels"],
            json!({INJECTED_LABEL: "injected"}),
        )),
        Some(_) => ops.push(add(
            &["metadata", "labels", INJECTED_LABEL],
            json!("injected"),
        )),
    }
    match &pod.metadata.annotations {
        None => ops.push(add(
            &["metadata", "annotations"],
            Value::Object(scrape_annotations(&empty)),
        )),
        Some(existing) => {
            for (key, value) in scrape_annotations(existing) {
                ops.push(add(&["metadata", "annotations", &key], value));
            }
        }
    }
    let init = to_value(&init)?;
    let proxy = to_value(&proxy)?;
    // The iptables step runs first, then the proxy, then the pod's own init
    // containers, so that their traffic (which the rules already redirect) has a proxy.
    match &spec.init_containers {
        None => ops.push(add(&["spec", "initContainers"], json!([init, proxy]))),
        Some(_) => {
            ops.push(add(&["spec", "initContainers", "0"], init));
            ops.push(add(&["spec", "initContainers", "1"], proxy));
        }
    }
    let volumes = match policy_configmap {
        Some(name) => vec![Volume {
            name: POLICY_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        None => vec![
            Volume {
                name: STATE_VOLUME.to_owned(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            },
            Volume {
                name: TOKEN_VOLUME.to_owned(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(TOKEN_AUDIENCE.to_owned()),
                            expiration_seconds: Some(TOKEN_SECONDS),
                            path: "token".to_owned(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
    };
    for (i, volume) in volumes.iter().enumerate() {
        let volume = to_value(volume)?;
        match &spec.volumes {
            None if i == 0 => ops.push(add(&["spec", "volumes"], json!([volume]))),
            _ => ops.push(add(&["spec", "volumes", "-"], volume)),
        }
    }
    Ok(ops)
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, InjectError> {
    serde_json::to_value(v).map_err(|e| InjectError::Internal(e.to_string()))
}

/// Prometheus scrape annotations for the proxy's telemetry port; an application's own
/// `prometheus.io/*` annotations are left as they are (they win).
fn scrape_annotations(existing: &BTreeMap<String, String>) -> serde_json::Map<String, Value> {
    [
        ("prometheus.io/scrape", "true".to_owned()),
        ("prometheus.io/port", TELEMETRY_PORT.to_string()),
        ("prometheus.io/path", "/metrics".to_owned()),
    ]
    .into_iter()
    .filter(|(k, _)| !existing.contains_key(*k))
    .map(|(k, v)| (k.to_owned(), Value::String(v)))
    .collect()
}

/// The drain period: 5 s shorter than the pod's grace period, at least 1 s, so the
/// proxy finishes in-flight requests before the kubelet kills it.
pub fn drain_timeout_seconds(termination_grace_period: Option<i64>) -> i64 {
    (termination_grace_period.unwrap_or(DEFAULT_GRACE_SECONDS) - DRAIN_MARGIN_SECONDS).max(1)
}

/// The first TCP port an application container declares: where inbound traffic goes.
fn app_port(pod: &Pod) -> Option<i32> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .map(|p| p.container_port)
}

fn proxy_container(
    pod: &Pod,
    annotations: &BTreeMap<String, String>,
    image: &str,
    from_configmap: bool,
    opts: &InjectOptions,
) -> Result<Container, InjectError> {
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds);
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{OUTBOUND_PORT}"),
        "--inbound".into(),
        format!("0.0.0.0:{INBOUND_PORT}"),
    ];
    if let Some(port) = app_port(pod) {
        args.extend(["--app".into(), format!("127.0.0.1:{port}")]);
    }
    // Without an inbound policy, inbound traffic reaches the app ungoverned (and
    // counted), so injecting never cuts a pod off.
    if let Some(policy) = annotations.get(INBOUND_POLICY_ANNOTATION) {
        args.extend(["--inbound-policy".into(), policy.clone()]);
    }
    if let Some(redis) = ann::redis(annotations)? {
        args.extend(["--redis".into(), redis]);
    }
    if let Some(ports) = ann::ports(annotations, ann::OPAQUE_PORTS)? {
        args.extend(["--opaque-ports".into(), ports]);
    }
    args.extend([
        "--transparent".into(),
        // The admin listener stays in the pod; probes and Prometheus reach the
        // telemetry listener, which serves nothing else.
        "--admin".into(),
        format!("127.0.0.1:{ADMIN_PORT}"),
        "--telemetry".into(),
        format!("0.0.0.0:{TELEMETRY_PORT}"),
        "--drain-timeout".into(),
        format!("{}s", drain_timeout_seconds(grace)),
    ]);
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    let volume_mounts = if from_configmap {
        args.extend(["--policy".into(), POLICY_MOUNT.into()]);
        Some(vec![VolumeMount {
            name: POLICY_VOLUME.to_owned(),
            mount_path: POLICY_MOUNT.to_owned(),
            read_only: Some(true),
            ..Default::default()
        }])
    } else {
        // The control plane serves TLS and recognises the proxy by its projected
        // ServiceAccount token; the node id is the pod's name, as the token's.
        let ca = opts.ca_pem.clone().ok_or(InjectError::NoControlPlaneCa)?;
        // Policies are discovered on demand by Host; declared dependencies are
        // held from the start.
        if let Some(hosts) = ann::dependencies(annotations)? {
            for host in hosts.split(',') {
                args.extend(["--dependency".into(), host.to_owned()]);
            }
        }
        args.extend([
            "--control-plane".into(),
            opts.control_plane.clone(),
            "--node-id".into(),
            "$(POD_NAME)".into(),
            "--state-dir".into(),
            STATE_MOUNT.into(),
            "--token-file".into(),
            format!("{TOKEN_MOUNT}/token"),
            // Its workload certificate (mTLS) from the control plane's CA, for the
            // identity that token proves.
            "--identity-from-control-plane".into(),
        ]);
        env.push(EnvVar {
            name: "SLUICE_CA_PEM".to_owned(),
            value: Some(ca),
            ..Default::default()
        });
        Some(vec![
            VolumeMount {
                name: STATE_VOLUME.to_owned(),
                mount_path: STATE_MOUNT.to_owned(),
                ..Default::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.to_owned(),
                mount_path: TOKEN_MOUNT.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
        ])
    };
    // Last: OTEL_RESOURCE_ATTRIBUTES refers to POD_NAME and POD_NAMESPACE, which the
    // kubelet expands only when they are defined before it.
    env.extend(super::trace::env(pod, annotations, opts)?);
    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([
            (
                "cpu".to_owned(),
                Quantity(ann::quantity(annotations, ann::PROXY_CPU_REQUEST, "50m")?),
            ),
            (
                "memory".to_owned(),
                Quantity(ann::quantity(
                    annotations,
                    ann::PROXY_MEMORY_REQUEST,
                    "64Mi",
                )?),
            ),
        ])),
        limits: Some(BTreeMap::from([
            (
                "cpu".to_owned(),
                Quantity(ann::quantity(annotations, ann::PROXY_CPU_LIMIT, "1")?),
            ),
            (
                "memory".to_owned(),
                Quantity(ann::quantity(
                    annotations,
                    ann::PROXY_MEMORY_LIMIT,
                    "256Mi",
                )?),
            ),
        ])),
        ..Default::default()
    };
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(TELEMETRY_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    };
    Ok(Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(image.to_owned()),
        command: Some(vec!["sluice-proxy".to_owned()]),
        args: Some(args),
        // A native sidecar: started before the app, kept running, stopped after it.
        restart_policy: Some("Always".to_owned()),
        ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            name: Some("sluice-metrics".to_owned()),
            container_port: i32::from(TELEMETRY_PORT),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        env: Some(env),
        // Up to two minutes to load a policy before the app may start; then out of
        // the Service while not ready (a policy lost and not yet back), restarted
        // when not alive.
        startup_probe: Some(probe("/ready", 1, 120)),
        readiness_probe: Some(probe("/ready", 5, 3)),
        liveness_probe: Some(probe("/live", 10, 3)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts,
        ..Default::default()
    })
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The iptables step. It needs root and `NET_ADMIN`/`NET_RAW` to change the pod's
/// network namespace (its own, not the node's), and nothing else; it exits before
/// any application container starts. Its root filesystem stays writable because
/// iptables takes its lock under `/run`.
fn init_container(
    annotations: &BTreeMap<String, String>,
    image: &str,
) -> Result<Container, InjectError> {
    let mut args: Vec<String> = vec![
        "init-iptables".into(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        // The port inbound interception leaves alone: the kubelet's probes and
        // Prometheus reach the telemetry listener there.
        "--admin-port".into(),
        TELEMETRY_PORT.to_string(),
    ];
    for (flag, value) in [
        (
            "--skip-outbound-ports",
            ann::ports(annotations, ann::SKIP_OUTBOUND_PORTS)?,
        ),
        (
            "--skip-inbound-ports",
            ann::ports(annotations, ann::SKIP_INBOUND_PORTS)?,
        ),
        (
            "--skip-outbound-cidrs",
            ann::cidrs(annotations, ann::SKIP_OUTBOUND_CIDRS)?,
        ),
    ] {
        if let Some(value) = value {
            args.extend([flag.to_owned(), value]);
        }
    }
    Ok(Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(image.to_owned()),
        command: Some(vec!["sluice-proxy".to_owned()]),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("10m".to_owned())),
                ("memory".to_owned(), Quantity("16Mi".to_owned())),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("100m".to_owned())),
                ("memory".to_owned(), Quantity("64Mi".to_owned())),
            ])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_five_seconds_before_the_grace_period_ends() {
        assert_eq!(drain_timeout_seconds(None), 25);
        assert_eq!(drain_timeout_seconds(Some(60)), 55);
        assert_eq!(drain_timeout_seconds(Some(3)), 1);
        assert_eq!(drain_timeout_seconds(Some(0)), 1);
    }
}
