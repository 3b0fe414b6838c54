"""What runs: the kustomizations under k8s/ rendered, and sluice-cp inject's output,
as lists of objects."""

import glob
import json
import os

from .common import HarnessError, dig, run

TEMPLATE_PATHS = {
    "Pod": [],
    "Deployment": ["spec", "template"],
    "StatefulSet": ["spec", "template"],
    "DaemonSet": ["spec", "template"],
    "ReplicaSet": ["spec", "template"],
    "Job": ["spec", "template"],
    "CronJob": ["spec", "jobTemplate", "spec", "template"],
}
# A workload whose sidecar takes its policy from the control plane: no
# `sluice.dev/policy-configmap` annotation. Injected, and run beside k8s/base.
# Its tracing annotations give the proxy the OTEL_* environment (issue 24), with
# a collector that is not there (k8s/monitoring is not in this cluster): a proxy
# must get ready, and stay so, whether or not its spans can be sent.
CONTROL_PLANE_SOURCED = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "smoke-app", "namespace": "sluice-smoke"},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "smoke-app"}},
        "template": {
            "metadata": {
                "labels": {"app.kubernetes.io/name": "smoke-app"},
                "annotations": {
                    "sluice.dev/otlp-endpoint": "http://otel-collector.sluice-system.svc:4317",
                    "sluice.dev/trace-sample-ratio": "1",
                },
            },
            "spec": {
                "containers": [
                    {
                        "name": "app",
                        "image": "ghcr.io/sluice/sluice:0.1.0",
                        "command": ["sluice-demo-upstream"],
                        "args": ["--listen", "0.0.0.0:8080", "--name", "smoke-app"],
                        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                        "readinessProbe": {"tcpSocket": {"port": "http"}},
                    }
                ],
            },
        },
    },
}


def read_objects(kubectl, path):
    """The objects of a YAML stream, read by kubectl as the API server would read them
    (sigs.k8s.io/yaml), so no YAML library is needed: removing a label that is not
    there, locally, prints each object as JSON."""
    env = dict(os.environ, KUBECONFIG=os.devnull)
    text = run(
        [kubectl, "label", "--local", "-f", path, "-o", "json", "install-smoke.sluice.dev/none-"], env=env
    )
    decoder, i, objects = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return objects
        obj, i = decoder.raw_decode(text, i)
        if obj.get("kind", "").endswith("List") and isinstance(obj.get("items"), list):
            objects.extend(obj["items"])
        else:
            objects.append(obj)


def image_defaults(dockerfile):
    """ENTRYPOINT and USER of the Dockerfile's last stage: what a container without
    `command` or `runAsUser` gets."""
    entrypoint, user = [], "0:0"
    try:
        lines = open(dockerfile).read().splitlines()
    except OSError:
        return entrypoint, (0, 0)
    for line in lines:
        line = line.strip()
        if line.upper().startswith("FROM "):
            entrypoint, user = [], "0:0"
        elif line.upper().startswith("ENTRYPOINT "):
            value = line[len("ENTRYPOINT ") :].strip()
            entrypoint = json.loads(value) if value.startswith("[") else ["/bin/sh", "-c", value]
        elif line.upper().startswith("USER "):
            user = line[len("USER ") :].strip()
    uid, _, gid = user.partition(":")
    uid = int(uid) if uid.isdigit() else 0  # a user name would need the image's passwd
    return entrypoint, (uid, int(gid) if gid.isdigit() else uid)


def sources(root, kubectl, bin_dir, out, ca_file):
    """(source, objects) of every cluster to run: each kustomization under k8s/; the
    output of `sluice-cp inject` over each render that labels a namespace for
    injection; and the injected CONTROL_PLANE_SOURCED beside k8s/base. `ca_file`:
    the CA of the control plane's TLS Secret, given to inject as an operator would
    (k8s/README.md), so injected proxies can check the control plane."""
    renders, clusters = [], []
    files = sorted(set(glob.glob(os.path.join(root, "k8s", "**", "kustomization.y*ml"), recursive=True)))
    for f in files:
        d = os.path.relpath(os.path.dirname(f), root)
        path = os.path.join(out, d.replace("/", "_") + ".yaml")
        with open(path, "w") as fh:
            fh.write(run([kubectl, "kustomize", os.path.join(root, d)]))
        renders.append((d, path, read_objects(kubectl, path)))
        clusters.append((d, renders[-1][2]))
    cp = os.path.join(bin_dir, "sluice-cp")
    for d, path, objects in renders:
        enabled = any(
            o.get("kind") == "Namespace" and dig(o, "metadata", "labels", "sluice.dev/inject") == "enabled"
            for o in objects
        )
        if enabled:
            injected = os.path.join(out, d.replace("/", "_") + "-injected.yaml")
            with open(injected, "w") as fh:
                fh.write(run([cp, "inject", "--ca-file", ca_file, "-f", path]))
            clusters.append((f"inject:{d}", read_objects(kubectl, injected)))
    base = next((objects for d, _, objects in renders if d == "k8s/base"), None)
    if base is None:
        raise HarnessError("k8s/base is not a kustomization: nothing provides the control plane")
    template = os.path.join(out, "smoke-app.yaml")
    with open(template, "w") as fh:
        json.dump(CONTROL_PLANE_SOURCED, fh, indent=2)
    injected = os.path.join(out, "smoke-app-injected.yaml")
    with open(injected, "w") as fh:
        fh.write(run([cp, "inject", "--ca-file", ca_file, "-f", template]))
    clusters.append(("inject:smoke-app", base + read_objects(kubectl, injected)))
    return clusters
