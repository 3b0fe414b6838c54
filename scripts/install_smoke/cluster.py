"""A cluster: its pods' network namespaces on a bridge in a node namespace, their
/etc/netns hosts files, the fake API server, and the volumes the kubelet would
mount (ConfigMaps, Secrets, projected tokens, downward API, emptyDirs)."""

import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time

from .common import (
    INIT_WITHIN,
    KUBE_AUDIENCE,
    LIVENESS_GRACE,
    READY_WITHIN,
    STOP_WITHIN,
    SUBNET,
    HarnessError,
    dig,
    run,
    tail,
    write_file,
)
from .container import Container, pod_lifecycle, recheck
from .manifests import TEMPLATE_PATHS, image_defaults


class Run:
    def __init__(self, args):
        self.root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
        self.kubectl = args.kubectl
        self.bin = os.path.abspath(args.bin)
        self.out = os.path.abspath(args.out)
        self.fake_apiserver = os.path.join(self.bin, "examples", "fake-apiserver")
        self.python = sys.executable
        self.image = image_defaults(os.path.join(self.root, "Dockerfile"))
        self._ca = None
        self._lock = threading.Lock()
        self.notes = []
        self.etc_netns_existed = os.path.isdir("/etc/netns")

    def ca(self):
        with self._lock:
            if self._ca is None:
                d = os.path.join(self.out, "ca")
                os.makedirs(d, exist_ok=True)
                crt, key = os.path.join(d, "ca.crt"), os.path.join(d, "ca.key")
                ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
                run(["openssl", "req", "-x509", *ec, "-days", "2", "-subj", "/CN=install-smoke CA"]
                    + ["-keyout", key, "-out", crt, "-addext", "basicConstraints=critical,CA:TRUE"]
                    + ["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                self._ca = (crt, key)
            return self._ca

    def tls_secret(self, cluster, pod, name):
        """A Secret no manifest creates (as k8s/README.md has the operator make it):
        a serving certificate for the Services selecting the pod, from this run's CA;
        for `sluice-ca` (the mesh's CA, k8s/README.md) this run's CA itself."""
        ca_crt, ca_key = self.ca()
        if name == "sluice-ca":
            return {"tls.crt": open(ca_crt, "rb").read(), "tls.key": open(ca_key, "rb").read()}
        dns = cluster.services_of(pod) or [pod.name]
        d = os.path.join(pod.dir, "secrets", name)
        os.makedirs(d, exist_ok=True)
        key, csr, crt, ext = (os.path.join(d, f) for f in ("tls.key", "tls.csr", "tls.crt", "ext.cnf"))
        with open(ext, "w") as f:
            f.write(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName="
                + ",".join([f"DNS:{n}" for n in dns] + [f"IP:{pod.ip}", "DNS:localhost", "IP:127.0.0.1"])
                + "\n"
            )
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run(["openssl", "req", "-new", *ec, "-subj", f"/CN={dns[0]}", "-keyout", key, "-out", csr])
        run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial"]
            + ["-days", "2", "-extfile", ext, "-out", crt])
        note = (
            f"{pod.title()}: Secret {pod.namespace}/{name} is in no manifest; "
            f"made tls.crt/tls.key/ca.crt for {', '.join(dns[:2])}"
        )
        with self._lock:
            self.notes.append(note)
        return {
            "tls.crt": open(crt, "rb").read(),
            "tls.key": open(key, "rb").read(),
            "ca.crt": open(ca_crt, "rb").read(),
        }


class Pod:
    def __init__(self, cluster, index, source, workload, template):
        self.cluster = cluster
        self.source = source
        self.kind = workload["kind"]
        self.workload = workload["metadata"]["name"]
        meta = template.get("metadata") or {}
        self.namespace = workload["metadata"].get("namespace") or meta.get("namespace") or "default"
        self.name = self.workload if self.kind == "Pod" else f"{self.workload}-0"
        self.labels = meta.get("labels") or {}
        self.annotations = meta.get("annotations") or {}
        self.spec = template.get("spec") or {}
        self.ip = f"{SUBNET}.{cluster.index}.{10 + index}"
        self.netns = f"{cluster.tag}-{index}-{self.name}"[:60]
        self.veth = f"v{index}"
        self.uid = f"00000000-0000-4000-8000-{secrets.token_hex(6)}"
        self.service_account = self.spec.get("serviceAccountName") or "default"
        self.dir = os.path.join(cluster.dir, self.namespace, self.name)
        self.containers = []  # Container, in start order
        self.tokens = {}  # audience -> token
        self.volumes = {}  # volume name -> host directory (or HarnessError)

    def title(self):
        return f"{self.source} {self.kind}/{self.workload}"

    def token_for(self, audience):
        if audience not in self.tokens:
            now = int(time.time())
            claims = {
                "aud": [audience],
                "exp": now + 3600,
                "iat": now,
                "nbf": now,
                "iss": KUBE_AUDIENCE,
                "sub": f"system:serviceaccount:{self.namespace}:{self.service_account}",
                "kubernetes.io": {
                    "namespace": self.namespace,
                    "pod": {"name": self.name, "uid": self.uid},
                    "serviceaccount": {"name": self.service_account, "uid": self.uid},
                },
            }
            part = lambda o: base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()
            sig = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
            self.tokens[audience] = f"{part({'alg': 'RS256', 'kid': 'install-smoke'})}.{part(claims)}.{sig}"
        return self.tokens[audience]

    def automounts_token(self):
        if "automountServiceAccountToken" in self.spec:
            return bool(self.spec["automountServiceAccountToken"])
        sa = self.cluster.find("ServiceAccount", self.namespace, self.service_account)
        return dig(sa, "automountServiceAccountToken", default=True) is not False

    def field(self, path):
        """A downward-API field, or None."""
        fields = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.serviceAccountName": self.service_account,
            "spec.nodeName": "install-smoke-node",
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": self.cluster.node_ip,
        }
        if path in fields:
            return fields[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if m:
            return (self.labels if m.group(1) == "labels" else self.annotations).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            d = self.labels if path == "metadata.labels" else self.annotations
            return "".join(f'{k}="{v}"\n' for k, v in sorted(d.items()))
        return None


class Cluster:
    def __init__(self, index, source, objects, run):
        self.index = index
        self.source = source
        self.objects = objects
        self.run = run
        self.tag = f"smk{os.getpid()}-{index}"
        self.node = f"{self.tag}-node"
        self.node_ip = f"{SUBNET}.{index}.1"
        self.dir = os.path.join(run.out, source.replace("/", "_").replace(":", "-"))
        self.pods = []
        self.skipped = []  # (title, why)
        self.procs = []  # every Popen started, for stop()
        self.netns_made = []
        self.etc_netns_made = []
        self.api = None  # "http://ip:port"
        self.stopping = False  # no container starts once set
        for obj in objects:
            path = TEMPLATE_PATHS.get(obj.get("kind"))
            if path is None:
                continue
            template = dig(obj, *path) if path else obj
            if not isinstance(template, dict):
                continue
            pod = Pod(self, len(self.pods), source, obj, template)
            images = [
                c.get("image", "")
                for c in (pod.spec.get("initContainers") or []) + (pod.spec.get("containers") or [])
            ]
            if not any("sluice" in i for i in images):
                self.skipped.append((pod.title(), "no container runs a Sluice image"))
                continue
            self.pods.append(pod)
            for c in pod.spec.get("initContainers") or []:
                kind = "sidecar" if c.get("restartPolicy") == "Always" else "init"
                pod.containers.append(Container(pod, c, kind))
            for c in pod.spec.get("containers") or []:
                pod.containers.append(Container(pod, c, "app"))

    def find(self, kind, namespace, name):
        for obj in self.objects:
            meta = obj.get("metadata") or {}
            if (
                obj.get("kind") == kind
                and meta.get("name") == name
                and (meta.get("namespace") or "default") == namespace
            ):
                return obj
        return None

    def services(self):
        """(Service, the first pod it selects or None) of every Service."""
        for svc in self.objects:
            if svc.get("kind") != "Service":
                continue
            ns = svc["metadata"].get("namespace") or "default"
            selector = dig(svc, "spec", "selector") or {}
            backend = next(
                (
                    p
                    for p in self.pods
                    if p.namespace == ns
                    and selector
                    and all(p.labels.get(k) == v for k, v in selector.items())
                ),
                None,
            )
            yield svc, backend

    def services_of(self, pod):
        """DNS names of every Service whose traffic goes to `pod`."""
        names = []
        for svc, backend in self.services():
            if backend is pod:
                n, ns = svc["metadata"]["name"], pod.namespace
                names += [f"{n}.{ns}.svc", f"{n}.{ns}.svc.cluster.local", f"{n}.{ns}", n]
        return names

    # -- network

    def hosts_file(self, pod):
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{pod.ip}\t{pod.name}"]
        for svc, backend in self.services():
            if backend is None:
                continue  # nothing would answer at its ClusterIP either
            n, ns = svc["metadata"]["name"], backend.namespace
            names = [f"{n}.{ns}.svc.cluster.local", f"{n}.{ns}.svc", f"{n}.{ns}"]
            if ns == pod.namespace:
                names.append(n)
            lines.append(f"{backend.ip}\t{' '.join(names)}")
        return "\n".join(lines) + "\n"

    def make_network(self):
        def netns_add(name):
            run(["ip", "netns", "add", name])
            self.netns_made.append(name)

        netns_add(self.node)
        n = ["ip", "-n", self.node]
        run(n + ["link", "set", "lo", "up"])
        run(n + ["link", "add", "br0", "type", "bridge"])
        run(n + ["addr", "add", f"{self.node_ip}/24", "dev", "br0"])
        run(n + ["link", "set", "br0", "up"])
        for pod in self.pods:
            netns_add(pod.netns)
            run(n + ["link", "add", pod.veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns])
            run(n + ["link", "set", pod.veth, "master", "br0", "up"])
            p = ["ip", "-n", pod.netns]
            run(p + ["addr", "add", f"{pod.ip}/24", "dev", "eth0"])
            run(p + ["link", "set", "lo", "up"])
            run(p + ["link", "set", "eth0", "up"])
            run(p + ["route", "add", "default", "via", self.node_ip])
        for pod in self.pods:
            etc = os.path.join("/etc/netns", pod.netns)
            os.makedirs(etc, exist_ok=True)
            self.etc_netns_made.append(etc)
            with open(os.path.join(etc, "hosts"), "w") as f:
                f.write(self.hosts_file(pod))
            os.chmod(os.path.join(etc, "hosts"), 0o644)

    def start_api(self):
        """The fake API server, in the node namespace, knowing every pod's tokens."""
        argv = ["ip", "netns", "exec", self.node, self.run.fake_apiserver, "--listen", f"{self.node_ip}:0"]
        for pod in self.pods:
            pod.token_for(KUBE_AUDIENCE)
            for audience, token in pod.tokens.items():
                argv += ["--token", f"{token}={audience},{pod.namespace},{pod.service_account},{pod.name}"]
        stderr = open(os.path.join(self.dir, "fake-apiserver.stderr"), "w")
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        line = [None]
        reader = threading.Thread(target=lambda: line.__setitem__(0, proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(10)
        if not line[0] or not line[0].strip():
            raise HarnessError(f"the fake API server did not start: {tail(stderr.name)}")
        self.api = f"http://{line[0].strip()}"

    # -- the run

    def prepare(self):
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        # Tokens first: the fake API server learns them when it starts.
        for pod in self.pods:
            os.makedirs(pod.dir, exist_ok=True)
            os.chmod(pod.dir, 0o755)
            for vol in pod.spec.get("volumes") or []:
                for src in dig(vol, "projected", "sources", default=[]) or []:
                    if "serviceAccountToken" in src:
                        pod.token_for(src["serviceAccountToken"].get("audience") or KUBE_AUDIENCE)
        self.make_network()
        self.start_api()
        for pod in self.pods:
            if pod.automounts_token():
                pod.kubeconfig = os.path.join(pod.dir, "kubeconfig")
                write_file(
                    pod.kubeconfig,
                    json.dumps(
                        {
                            "apiVersion": "v1",
                            "kind": "Config",
                            "current-context": "install-smoke",
                            "clusters": [{"name": "install-smoke", "cluster": {"server": self.api}}],
                            "users": [
                                {"name": pod.service_account, "user": {"token": pod.token_for(KUBE_AUDIENCE)}}
                            ],
                            "contexts": [
                                {
                                    "name": "install-smoke",
                                    "context": {
                                        "cluster": "install-smoke",
                                        "user": pod.service_account,
                                        "namespace": pod.namespace,
                                    },
                                }
                            ],
                        },
                        indent=2,
                    ),
                    0o644,
                )
            else:
                pod.kubeconfig = None
            for vol in pod.spec.get("volumes") or []:
                try:
                    pod.volumes[vol["name"]] = self.make_volume(pod, vol)
                except HarnessError as e:
                    pod.volumes[vol["name"]] = e

    def make_volume(self, pod, vol):
        path = os.path.join(pod.dir, "volumes", vol["name"])
        os.makedirs(path)
        os.chmod(path, 0o755)
        if "emptyDir" in vol:
            os.chmod(path, 0o777)
        elif "configMap" in vol:
            self.project_object(
                pod, path, "ConfigMap", vol["configMap"], vol["configMap"].get("defaultMode", 0o644)
            )
        elif "secret" in vol:
            ref = dict(vol["secret"], name=vol["secret"].get("secretName"))
            self.project_object(pod, path, "Secret", ref, vol["secret"].get("defaultMode", 0o644))
        elif "projected" in vol:
            mode = vol["projected"].get("defaultMode", 0o644)
            for src in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in src:
                    t = src["serviceAccountToken"]
                    write_file(
                        os.path.join(path, t["path"]), pod.token_for(t.get("audience") or KUBE_AUDIENCE), mode
                    )
                elif "configMap" in src:
                    self.project_object(pod, path, "ConfigMap", src["configMap"], mode)
                elif "secret" in src:
                    self.project_object(pod, path, "Secret", src["secret"], mode)
                elif "downwardAPI" in src:
                    self.downward(pod, path, src["downwardAPI"], mode)
                else:
                    raise HarnessError(
                        f"volume {vol['name']}: projected source {sorted(src)} is not emulated"
                    )
        elif "downwardAPI" in vol:
            self.downward(pod, path, vol["downwardAPI"], vol["downwardAPI"].get("defaultMode", 0o644))
        else:
            kinds = sorted(k for k in vol if k != "name")
            raise HarnessError(f"volume {vol['name']}: {kinds} volumes are not emulated")
        return path

    def downward(self, pod, path, spec, mode):
        for item in spec.get("items") or []:
            fp = dig(item, "fieldRef", "fieldPath")
            value = pod.field(fp) if fp else None
            if value is None:
                raise HarnessError(f"downwardAPI item {item.get('path')}: only fieldRef is emulated")
            write_file(os.path.join(path, item["path"]), value, item.get("mode", mode))

    def object_data(self, pod, kind, name):
        """A ConfigMap's or Secret's data as {key: bytes}, or None if it is absent."""
        obj = self.find(kind, pod.namespace, name)
        if obj is None:
            return None
        data = {}
        if kind == "ConfigMap":
            data.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
            data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        return data

    def project_object(self, pod, path, kind, ref, mode):
        name = ref.get("name")
        data = self.object_data(pod, kind, name)
        if data is None and kind == "Secret":
            data = self.run.tls_secret(self, pod, name)
        if data is None:
            if ref.get("optional"):
                return
            raise HarnessError(
                f"{kind} {pod.namespace}/{name} is in no rendered manifest "
                "(the kubelet would not start the pod)"
            )
        items = ref.get("items")
        if items is None:
            items = [{"key": k, "path": k} for k in sorted(data)]
        for item in items:
            if item["key"] not in data:
                if ref.get("optional"):
                    continue
                raise HarnessError(f"{kind} {pod.namespace}/{name} has no key {item['key']}")
            write_file(os.path.join(path, item["path"]), data[item["key"]], item.get("mode", mode))

    def start(self):
        self.prepare()
        threads = [threading.Thread(target=pod_lifecycle, args=(pod,), daemon=True) for pod in self.pods]
        for t in threads:
            t.start()
        # Every step of a pod has its own deadline; this bounds the join in case of a bug.
        longest = max(len(p.containers) for p in self.pods) if self.pods else 0
        limit = time.monotonic() + longest * (INIT_WITHIN + READY_WITHIN + LIVENESS_GRACE + 10) + 30
        for t in threads:
            t.join(max(0.0, limit - time.monotonic()))
            if t.is_alive():
                raise HarnessError("a pod's start did not end in time (a bug in install-smoke)")
        recheck(self)

    def stop(self):
        """SIGTERM by PID (the containers, last started first, then the fake API
        server), SIGKILL after STOP_WITHIN; then the namespaces and hosts files go."""
        self.stopping = True
        containers = [c.proc for pod in self.pods for c in reversed(pod.containers) if c.proc]
        api = [p for p in self.procs if p not in containers]
        for group in (containers, api):
            group = [p for p in group if p.poll() is None]
            for p in group:
                os.kill(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_WITHIN
            for p in group:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(5)
        for name in reversed(self.netns_made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        for etc in self.etc_netns_made:
            shutil.rmtree(etc, ignore_errors=True)
