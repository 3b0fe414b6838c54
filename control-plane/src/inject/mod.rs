//! Sidecar injection: `sluice-cp inject` for manifests, and the patch the admission
//! webhook returns for a pod. Both go through [`patch_for_pod`], so a pod injected
//! by the CLI and one injected by the webhook are the same pod.
//!
//! What a pod gets (see `patch.rs` for the details and why):
//! - `sluice-init`, an init container running `sluice-proxy init-iptables` as root with
//!   only `NET_ADMIN` and `NET_RAW`: it redirects the pod's TCP to the proxy;
//! - `sluice-proxy`, a native sidecar (an init container with `restartPolicy: Always`)
//!   gated by a startup probe on `/ready`, so the application starts only once the
//!   proxy serves a policy, and Jobs still complete;
//! - the policy source: a ConfigMap (`sluice.dev/policy-configmap`) or the control plane;
//! - resources from `sluice.dev/proxy-*` annotations, Prometheus scrape annotations,
//!   and a drain timeout 5 s shorter than the termination grace period;
//! - with an OTLP endpoint (`sluice.dev/otlp-endpoint`, else the mesh's default), the
//!   OpenTelemetry variables that turn the proxy's tracing on (`trace.rs`).
//!
//! Manifests are read as untyped documents and only the pod template is read with
//! `k8s-openapi`'s types, so fields this version of the API does not know survive.
//! The output's keys come out sorted, as `kubectl get -o yaml` prints them.

mod annotations;
mod patch;
mod trace;

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use json_patch::jsonptr::PointerBuf;
use json_patch::PatchOperation;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use serde_json::Value;

pub use annotations::{
    INJECT, OTLP_ENDPOINT, POLICY_CONFIGMAP, PROXY_CPU_LIMIT, PROXY_CPU_REQUEST, PROXY_IMAGE,
    PROXY_MEMORY_LIMIT, PROXY_MEMORY_REQUEST, SKIP_INBOUND_PORTS, SKIP_OUTBOUND_CIDRS,
    SKIP_OUTBOUND_PORTS, TRACE_SAMPLE_RATIO,
};
pub use patch::{
    drain_timeout_seconds, patch_for_pod, ADMIN_PORT, INBOUND_PORT, INIT_CONTAINER, INJECTED_LABEL,
    OUTBOUND_PORT, POLICY_MOUNT, POLICY_VOLUME, PROXY_CONTAINER, PROXY_UID, TELEMETRY_PORT,
    TOKEN_AUDIENCE, TOKEN_MOUNT,
};
pub use trace::{
    OtlpEndpoint, SampleRatio, DEFAULT_SERVICE_NAME, ENDPOINT_ENV, RESOURCE_ATTRIBUTES_ENV,
    SAMPLE_RATIO_ENV, SERVICE_NAME_ENV,
};

/// Cluster-wide injection settings; pod annotations override the image and the
/// tracing settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectOptions {
    /// The proxy image when the pod does not name one (`sluice.dev/proxy-image`).
    pub image: String,
    /// The control plane's policy stream, for pods without a policy ConfigMap.
    pub control_plane: String,
    /// The CA (PEM) of the control plane's certificate, given to those pods'
    /// proxies (`$SLUICE_CA_PEM`); required for them.
    pub ca_pem: Option<String>,
    /// Where proxies send their spans when the pod does not say
    /// (`sluice.dev/otlp-endpoint`); `None` leaves tracing off for those pods.
    pub otlp_endpoint: Option<OtlpEndpoint>,
    /// The share of traces they sample when the pod does not say
    /// (`sluice.dev/trace-sample-ratio`); `None` leaves the proxy's default (0.01).
    pub trace_sample_ratio: Option<SampleRatio>,
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/sluice/sluice:{}", env!("CARGO_PKG_VERSION")),
            control_plane: "https://sluice-control-plane.sluice-system.svc:15010".to_owned(),
            ca_pem: None,
            // Tracing is opt-in: a collector must exist before proxies send to it.
            otlp_endpoint: None,
            trace_sample_ratio: None,
        }
    }
}

/// Why a manifest or a pod could not be injected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InjectError {
    #[error("cannot read the manifests as YAML: {0}")]
    Yaml(String),
    #[error("annotation {key}: expected {expected}, got `{value}`")]
    Annotation {
        key: String,
        value: String,
        expected: String,
    },
    #[error("the pod template is not a valid pod: {0}")]
    PodTemplate(String),
    #[error(
        "the pod follows the control plane, whose certificate its proxy must check: give the \
         control plane's CA (--ca-file, the ca.crt of its TLS Secret), or give the pod a policy \
         ConfigMap (annotation sluice.dev/policy-configmap)"
    )]
    NoControlPlaneCa,
    #[error("document {index} ({kind} {name}): {source}")]
    Document {
        /// 1-based, in input order.
        index: usize,
        kind: String,
        name: String,
        source: Box<InjectError>,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where a kind keeps its pod template; `None` for kinds that pass through.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&["spec", "template"])
        }
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects the sidecar into every workload of a (multi-document) YAML stream,
/// `List`s included, and prints the stream back; other kinds are unchanged.
pub fn inject_documents(yaml: &str, opts: &InjectOptions) -> Result<String, InjectError> {
    // Read as Kubernetes does (YAML 1.1 via go-yaml): `0644` is octal, `yes` a boolean.
    let options = serde_saphyr::options! { legacy_octal_numbers: true };
    let docs: Vec<Value> = serde_saphyr::from_str_multiple_with_options(yaml, options)
        .map_err(|e| InjectError::Yaml(e.to_string()))?;
    let mut out = Vec::with_capacity(docs.len());
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue; // an empty document, such as a trailing `---`
        }
        inject_value(&mut doc, opts, true).map_err(|source| InjectError::Document {
            index: i + 1,
            kind: str_at(&doc, "/kind"),
            name: str_at(&doc, "/metadata/name"),
            source: Box::new(source),
        })?;
        out.push(doc);
    }
    serde_saphyr::to_string_multiple(&out).map_err(|e| InjectError::Internal(e.to_string()))
}

fn str_at(doc: &Value, pointer: &str) -> String {
    doc.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned()
}

/// Injects one object in place. `List` items are injected too (one level: a list of
/// lists is not a manifest anyone writes).
fn inject_value(doc: &mut Value, opts: &InjectOptions, top: bool) -> Result<(), InjectError> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    if top && kind.ends_with("List") {
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_value(item, opts, false)?;
            }
        }
        return Ok(());
    }
    let Some(tokens) = template_path(kind) else {
        return Ok(());
    };
    let prefix = PointerBuf::from_tokens(tokens.iter().copied());
    let Some(template) = doc.pointer(prefix.as_str()) else {
        return Ok(()); // no template: nothing to inject into (the API would refuse it)
    };
    let pod = if tokens.is_empty() {
        serde_json::from_value::<Pod>(template.clone())
    } else {
        serde_json::from_value::<PodTemplateSpec>(template.clone()).map(|t| Pod {
            metadata: t.metadata.unwrap_or_default(),
            spec: t.spec,
            status: None,
        })
    }
    .map_err(|e| InjectError::PodTemplate(e.to_string()))?;
    let ops = patch_for_pod(&pod, opts)?;
    let ops: Vec<PatchOperation> = ops.into_iter().map(|op| prefixed(&prefix, op)).collect();
    json_patch::patch(doc, &ops).map_err(|e| InjectError::Internal(e.to_string()))
}

fn prefixed(prefix: &PointerBuf, op: PatchOperation) -> PatchOperation {
    match op {
        PatchOperation::Add(mut add) => {
            add.path = prefix.concat(&add.path);
            PatchOperation::Add(add)
        }
        other => other, // patch_for_pod only adds
    }
}

/// Largest manifest stream `sluice-cp inject` reads.
const MAX_INPUT_BYTES: u64 = 64 << 20;

/// `sluice-cp inject -f FILE|-`: prints the injected manifests on stdout; exit 1 with
/// the reason on stderr when the input cannot be injected.
pub fn run(file: &Path, opts: &InjectOptions) -> ExitCode {
    let input = if file == Path::new("-") {
        read_bounded(std::io::stdin().lock())
    } else {
        std::fs::File::open(file).and_then(read_bounded)
    };
    let result = match input {
        Ok(text) => inject_documents(&text, opts).map_err(|e| e.to_string()),
        Err(e) => Err(format!("cannot read {}: {e}", file.display())),
    };
    match result {
        Ok(out) => {
            let _ = std::io::stdout().lock().write_all(out.as_bytes());
            ExitCode::SUCCESS
        }
        Err(message) => {
            let _ = writeln!(std::io::stderr().lock(), "sluice-cp inject: {message}");
            ExitCode::from(1)
        }
    }
}

fn read_bounded(reader: impl Read) -> std::io::Result<String> {
    let mut text = String::new();
    reader.take(MAX_INPUT_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_INPUT_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_INPUT_BYTES >> 20
        )));
    }
    Ok(text)
}
