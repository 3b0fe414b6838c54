"""One container: its environment, user and capabilities, mounts and command as the
kubelet and the runtime would give them; its process; and its probes, sent from the
node namespace to the pod IP."""

import os
import shlex
import stat
import subprocess
import time

from .common import (
    DEFAULT_CAPS,
    IMAGE_PATH,
    INIT_WITHIN,
    KUBE_AUDIENCE,
    LIVENESS_GRACE,
    POLL,
    READY_WITHIN,
    HarnessError,
    expand,
    tail,
    write_file,
)


class Container:
    def __init__(self, pod, spec, kind):
        self.pod = pod
        self.spec = spec
        self.name = spec["name"]
        self.kind = kind  # init | sidecar | app
        self.is_sluice = "sluice" in spec.get("image", "")
        self.proc = None
        self.started = None
        self.ready = False
        self.passed = []  # what the probes answered, for the report
        self.result = None  # (ok: bool, why: str); None: not started
        self.stderr_tail = ""
        self.argv = []
        self.stderr = os.path.join(pod.dir, f"{self.name}.stderr")
        self.stdout = os.path.join(pod.dir, f"{self.name}.stdout")

    def fail(self, why):
        """Records why, with the stderr of that moment (before the stop adds to it)."""
        self.result = (False, why)
        self.stderr_tail = tail(self.stderr)

    def environment(self):
        pod, env = self.pod, {}
        env.update(PATH=IMAGE_PATH, HOSTNAME=pod.name, HOME="/")
        for src in self.spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in src:
                    data = pod.cluster.object_data(pod, kind, src[key]["name"])
                    if data is None and not src[key].get("optional"):
                        raise HarnessError(
                            f"envFrom: {kind} {pod.namespace}/{src[key]['name']} is in no rendered manifest"
                        )
                    env.update({prefix + k: v.decode() for k, v in (data or {}).items()})
        for var in self.spec.get("env") or []:
            name = var["name"]
            if "value" in var:
                env[name] = expand(var["value"], env)
            elif "valueFrom" in var:
                vf = var["valueFrom"]
                if "fieldRef" in vf:
                    value = pod.field(vf["fieldRef"]["fieldPath"])
                    if value is None:
                        raise HarnessError(
                            f"env {name}: fieldRef {vf['fieldRef']['fieldPath']} is not emulated"
                        )
                    env[name] = value
                elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                    kind, ref = (
                        ("ConfigMap", vf["configMapKeyRef"])
                        if "configMapKeyRef" in vf
                        else ("Secret", vf["secretKeyRef"])
                    )
                    data = pod.cluster.object_data(pod, kind, ref["name"]) or {}
                    if ref["key"] in data:
                        env[name] = data[ref["key"]].decode()
                    elif not ref.get("optional"):
                        raise HarnessError(
                            f"env {name}: {kind} {pod.namespace}/{ref['name']} key {ref['key']} is in no rendered manifest"
                        )
                else:
                    raise HarnessError(f"env {name}: {sorted(vf)} is not emulated")
            else:
                env[name] = ""
        if pod.kubeconfig:
            env.setdefault("KUBECONFIG", pod.kubeconfig)
        return env

    def security(self):
        """(setpriv options, read-only root) from the pod's and the container's
        securityContext, over the image's USER."""
        psc, csc = self.pod.spec.get("securityContext") or {}, self.spec.get("securityContext") or {}
        _, (image_uid, image_gid) = self.pod.cluster.run.image
        uid = csc.get("runAsUser", psc.get("runAsUser", image_uid))
        gid = csc.get("runAsGroup", psc.get("runAsGroup", image_gid if uid == image_uid else 0))
        groups = [g for g in (psc.get("supplementalGroups") or []) + [psc.get("fsGroup")] if g is not None]
        opts = [f"--reuid={uid}", f"--regid={gid}"]
        opts += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
        if csc.get("allowPrivilegeEscalation") is False:
            opts.append("--no-new-privs")
        if not csc.get("privileged"):
            caps = csc.get("capabilities") or {}
            norm = lambda names: {n.upper().removeprefix("CAP_") for n in names or []}
            keep = set() if "ALL" in norm(caps.get("drop")) else DEFAULT_CAPS - norm(caps.get("drop"))
            keep |= norm(caps.get("add"))
            opts += [
                "--inh-caps=-all",
                "--bounding-set=" + ",".join(["-all"] + [f"+{c.lower()}" for c in sorted(keep)]),
            ]
        ro_root = bool(csc.get("readOnlyRootFilesystem"))
        return opts, ro_root

    def mounts(self, env):
        """[(source, mountPath, readOnly)] of the container's volumeMounts (and the
        ServiceAccount token the kubelet adds), parents first."""
        out = []
        mounts = list(self.spec.get("volumeMounts") or [])
        if self.pod.automounts_token() and not any(
            m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" for m in mounts
        ):
            sa = os.path.join(self.pod.dir, "volumes", "kube-api-access")
            if not os.path.isdir(sa):
                write_file(os.path.join(sa, "token"), self.pod.token_for(KUBE_AUDIENCE), 0o644)
                write_file(os.path.join(sa, "namespace"), self.pod.namespace, 0o644)
                write_file(os.path.join(sa, "ca.crt"), open(self.pod.cluster.run.ca()[0], "rb").read(), 0o644)
            out.append((sa, "/var/run/secrets/kubernetes.io/serviceaccount", True))
        for m in mounts:
            src = self.pod.volumes.get(m["name"])
            if src is None:
                raise HarnessError(f"volumeMount {m['name']}: the pod has no such volume")
            if isinstance(src, HarnessError):
                raise src
            sub = m.get("subPath") or expand(m.get("subPathExpr") or "", env)
            if sub:
                src = os.path.join(src, sub)
                if not os.path.exists(src):
                    os.makedirs(src, 0o755)
            out.append((src, m["mountPath"], bool(m.get("readOnly"))))
        return sorted(out, key=lambda m: len(os.path.normpath(m[1]).split("/")))

    def mount_script(self, env, ro_root):
        """Shell run in the container's private mount namespace before exec."""
        lines = ['run() { "$@" || { echo "install-smoke: $* failed" >&2; exit 125; }; }', "cd /"]
        q = shlex.quote
        shadowed, created, bound = set(), set(), []
        stage = os.path.join(self.pod.dir, "stage", self.name)
        binds = []
        for src, target, ro in self.mounts(env):
            target = os.path.normpath(target)
            inside = next((b for b in reversed(bound) if target.startswith(b[1] + "/")), None)
            if inside:  # a mountPath inside another volume: made in that volume
                path = os.path.join(inside[0], os.path.relpath(target, inside[1]))
                if os.path.isdir(src) and not os.path.exists(path):
                    os.makedirs(path, 0o755)
                elif not os.path.exists(path):
                    write_file(path, b"", 0o644)
            elif not (target in created or os.path.lexists(target)):
                ancestor = os.path.dirname(target)
                while ancestor != "/" and ancestor not in created and not os.path.isdir(ancestor):
                    ancestor = os.path.dirname(ancestor)
                if ancestor not in created:
                    real = os.path.realpath(ancestor)
                    if real == "/":
                        raise HarnessError(f"mountPath {target}: only / exists above it; not emulated")
                    if real not in shadowed:
                        lines += self.shadow(real, os.path.join(stage, str(len(shadowed))))
                        shadowed.add(real)
                if os.path.isdir(src):
                    lines.append(f"run mkdir -p {q(target)}")
                else:
                    lines.append(f"run mkdir -p {q(os.path.dirname(target))}; run touch {q(target)}")
                p = target
                while p != "/" and p not in created and not os.path.lexists(p):
                    created.add(p)
                    p = os.path.dirname(p)
            bound.append((src, target))
            binds.append((src, target, ro))
        if ro_root:
            lines.append(
                "awk '{print $5}' /proc/self/mountinfo | while IFS= read -r m; do case \"$m\" in "
                "/proc|/proc/*|/sys|/sys/*|/dev|/dev/*) ;; "
                '*) mount -n -o remount,bind,ro "$m" 2>/dev/null || true ;; esac; done'
            )
        for src, target, ro in binds:
            # A bind takes the flags of the mount it comes from (read-only once the root
            # is): set them as the volumeMount says.
            lines.append(f"run mount -n --bind {q(src)} {q(target)}")
            lines.append(f"run mount -n -o remount,bind,{'ro' if ro else 'rw'} {q(target)}")
        lines.append('exec "$@"')
        return "\n".join(lines)

    @staticmethod
    def shadow(directory, stage):
        """Commands putting a tmpfs over `directory` that shows its entries (bind mounts,
        submounts included), so new directories can be made in it without writing to
        the host."""
        q = shlex.quote
        os.makedirs(stage, exist_ok=True)
        lines = [f"run mount -n -t tmpfs -o mode=0755,size=4m install-smoke {q(stage)}"]
        for entry in sorted(os.listdir(directory)):
            src, dst = os.path.join(directory, entry), os.path.join(stage, entry)
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                lines.append(f"run ln -s {q(os.readlink(src))} {q(dst)}")
            elif stat.S_ISDIR(st.st_mode):
                lines.append(f"run mkdir {q(dst)}; run mount -n --rbind {q(src)} {q(dst)}")
            else:
                lines.append(f"run touch {q(dst)}; run mount -n --bind {q(src)} {q(dst)}")
        lines.append(f"run mount -n --move {q(stage)} {q(directory)}")
        return lines

    def command(self, env):
        entrypoint, _ = self.pod.cluster.run.image
        # The image has no CMD: args are the manifest's, after its command or the ENTRYPOINT.
        argv = [
            expand(a, env) for a in (self.spec.get("command") or entrypoint) + (self.spec.get("args") or [])
        ]
        if not argv:
            raise HarnessError("no command and no image ENTRYPOINT")
        binary = os.path.join(self.pod.cluster.run.bin, os.path.basename(argv[0]))
        if not os.access(binary, os.X_OK):
            raise HarnessError(f"{argv[0]}: no such program among the workspace's binaries ({binary})")
        return argv, binary

    def start(self):
        """Starts the process (one PID: ip, unshare, sh, setpriv and env each exec the next)."""
        if self.pod.cluster.stopping:
            return False
        self.started = time.monotonic()
        try:
            env = self.environment()
            self.argv, binary = self.command(env)
            opts, ro_root = self.security()
            script = self.mount_script(env, ro_root)
        except HarnessError as e:
            self.fail(f"cannot be run here: {e}")
            return False
        netns = ["ip", "netns", "exec", self.pod.netns]
        mounts = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script, "install-smoke"]
        user = ["setpriv", *opts, "--"]
        environment = ["env", "-i", "--", *(f"{k}={v}" for k, v in env.items())]
        argv = netns + mounts + user + environment + [binary, *self.argv[1:]]
        with open(os.path.join(self.pod.dir, f"{self.name}.argv"), "w") as f:
            f.write(shlex.join(argv) + "\n")
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
        return True

    def exited(self):
        code = self.proc.poll() if self.proc else None
        if code is None:
            return None
        if code < 0:
            return f"killed by signal {-code}"
        if code == 125:
            return "the test could not set up its mounts"
        if code in (2, 64):
            return f"exited with code {code} (a usage error: the program refuses its arguments)"
        return f"exited with code {code}"

    # -- probes, as the kubelet sends them

    def port(self, port):
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in self.spec.get("ports") or []:
            if p.get("name") == port:
                return p["containerPort"]
        raise HarnessError(f"port {port!r} is not one of the container's ports")

    def probe_once(self, probe):
        """(ok, what was asked and answered)."""
        run_ = self.pod.cluster.run
        timeout = max(1, probe.get("timeoutSeconds", 1))
        node = ["ip", "netns", "exec", self.pod.cluster.node]
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                scheme = (h.get("scheme") or "HTTP").lower()
                url = (
                    f"{scheme}://{h.get('host') or self.pod.ip}:{self.port(h['port'])}{h.get('path') or '/'}"
                )
                argv = node + ["curl", "-s", "-k", "--max-time", str(timeout), "-o", "-", "-w", "\n%{http_code}"]
                argv += ["-A", "kube-probe/1.33", "-H", "Accept: */*"]
                for header in h.get("httpHeaders") or []:
                    argv += ["-H", f"{header['name']}: {header['value']}"]
                r = subprocess.run(argv + [url], capture_output=True, timeout=timeout + 5)
                body, _, code = r.stdout.decode(errors="replace").rpartition("\n")
                if not code.isdigit() or code == "000":
                    return False, f"GET {url}: no answer (curl exit {r.returncode})"
                body = " ".join(body.split())[:160]
                return 200 <= int(code) < 400, f"GET {url}: {code}" + (f" {body!r}" if body else "")
            if "tcpSocket" in probe:
                t = probe["tcpSocket"]
                host, port = t.get("host") or self.pod.ip, self.port(t["port"])
                code = (
                    "import socket,sys\n"
                    "try: socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()\n"
                    "except OSError as e: sys.exit(str(e))"
                )
                r = subprocess.run(
                    node + [run_.python, "-c", code, host, str(port), str(timeout)],
                    capture_output=True,
                    text=True,
                    timeout=timeout + 5,
                )
                return r.returncode == 0, f"TCP {host}:{port}: " + (
                    "open" if r.returncode == 0 else r.stderr.strip()
                )
            if "exec" in probe:
                env = self.environment()
                cmd = [expand(a, env) for a in probe["exec"].get("command") or []]
                binary = os.path.join(run_.bin, os.path.basename(cmd[0])) if cmd else ""
                if cmd and os.access(binary, os.X_OK):
                    cmd[0] = binary
                opts, _ = self.security()
                r = subprocess.run(
                    ["nsenter", "-t", str(self.proc.pid), "-n", "-m", "--", "setpriv"]
                    + opts
                    + ["--", "env", "-i", "--"]
                    + [f"{k}={v}" for k, v in env.items()]
                    + cmd,
                    capture_output=True,
                    text=True,
                    timeout=timeout + 5,
                )
                return (
                    r.returncode == 0,
                    f"exec {shlex.join(cmd)}: exit {r.returncode} {r.stdout.strip()[-160:]}",
                )
            return (
                False,
                f"{sorted(k for k in probe if k.endswith(('Get', 'Socket', 'exec', 'grpc')))} probes are not emulated",
            )
        except HarnessError as e:
            return False, str(e)
        except subprocess.TimeoutExpired:
            return False, "the probe timed out"

    def wait_probe(self, kind, probe, deadline):
        """Polls until the probe passes successThreshold times in a row, the process
        exits, or the deadline. (ok, last answer)."""
        needed, streak, last = max(1, probe.get("successThreshold", 1)), 0, "not asked"
        while True:
            gone = self.exited()
            if gone:
                return False, gone
            ok, last = self.probe_once(probe)
            streak = streak + 1 if ok else 0
            if streak >= needed:
                return True, last
            if time.monotonic() + POLL >= deadline:
                return False, f"{kind} never passed: {last}"
            time.sleep(POLL)

    def pass_startup(self):
        """The startupProbe within READY_WITHIN of the start; without one, the process
        is still there a moment later. What gates the next container of a sidecar."""
        probe = self.spec.get("startupProbe")
        if not probe:
            return self.still_running(min(self.started + READY_WITHIN, time.monotonic() + 1.0))
        ok, why = self.wait_probe("startupProbe", probe, self.started + READY_WITHIN)
        if not ok:
            self.fail(why if self.exited() else f"not started within {READY_WITHIN:.0f} s: {why}")
            return False
        self.passed.append(f"startupProbe {why}")
        return True

    def pass_ready(self):
        """The readinessProbe within READY_WITHIN of the start (with no probe at all:
        still running a second after the start), then the livenessProbe."""
        deadline = self.started + READY_WITHIN
        probe = self.spec.get("readinessProbe")
        if probe:
            ok, why = self.wait_probe("readinessProbe", probe, deadline)
            if not ok:
                self.fail(why if self.exited() else f"not ready within {READY_WITHIN:.0f} s: {why}")
                return False
            self.passed.append(f"readinessProbe {why}")
        elif not self.spec.get("startupProbe"):
            if not self.still_running(min(deadline, self.started + 1.0)):
                return False
            self.passed.append("no probes: running")
        probe = self.spec.get("livenessProbe")
        if probe:
            ok, why = self.wait_probe(
                "livenessProbe", probe, max(deadline, time.monotonic() + LIVENESS_GRACE)
            )
            if not ok:
                self.fail(
                    why if self.exited() else f"livenessProbe failed (the kubelet would restart it): {why}"
                )
                return False
            self.passed.append(f"livenessProbe {why}")
        gone = self.exited()
        if gone and not self.completed():
            self.fail(gone)
            return False
        self.ready = True
        took = time.monotonic() - self.started
        self.result = (True, f"ready in {took:.1f} s ({'; '.join(self.passed)})")
        return True

    def completed(self):
        """A Job's container that exited 0: done, not crashed."""
        return self.pod.spec.get("restartPolicy") in ("Never", "OnFailure") and self.proc.returncode == 0

    def still_running(self, until):
        while time.monotonic() < until:
            if self.exited():
                break
            time.sleep(0.05)
        gone = self.exited()
        if gone and not self.completed():
            self.fail(gone)
            return False
        return True

    def complete(self):
        """An init container: runs to completion with exit code 0."""
        try:
            self.proc.wait(INIT_WITHIN)
        except subprocess.TimeoutExpired:
            self.fail(f"did not complete within {INIT_WITHIN:.0f} s")
            return False
        if self.proc.returncode != 0:
            self.fail(self.exited())
            return False
        self.result = (True, f"completed in {time.monotonic() - self.started:.1f} s")
        return True


def pod_lifecycle(pod):
    """Init containers in order (a native sidecar gates the next on its startup), then
    the containers together; as with the kubelet, a container that does not complete
    or start holds up the rest of the pod. Containers of other images are not run."""
    try:
        for c in pod.containers:
            if c.kind == "app" or not c.is_sluice:
                continue
            if not c.start():
                return
            if not (c.complete() if c.kind == "init" else c.pass_startup()):
                return
        apps = [c for c in pod.containers if c.kind == "app" and c.is_sluice]
        started = [c for c in apps if c.start()]
        for c in [c for c in pod.containers if c.kind == "sidecar" and c.is_sluice]:
            c.pass_ready()
        for c in started:
            if c.pass_startup():
                c.pass_ready()
    except Exception as e:  # a bug here must not hide the other pods' results
        for c in pod.containers:
            if c.result is None and c.proc is not None:
                c.fail(f"install-smoke error: {e!r}")
        raise


def recheck(cluster):
    """Once every pod has started: every ready container is still up and passes its
    readiness (or startup) and liveness probes again."""
    time.sleep(0.5)
    for pod in cluster.pods:
        for c in pod.containers:
            if not c.ready or c.exited() and c.completed():
                continue
            if c.exited():
                c.ready = False
                c.fail(f"{c.exited()} after it was ready")
                continue
            gate = "readinessProbe" if c.spec.get("readinessProbe") else "startupProbe"
            for kind in (gate, "livenessProbe"):
                probe = c.spec.get(kind)
                if probe:
                    ok, why = c.wait_probe(kind, probe, time.monotonic() + LIVENESS_GRACE)
                    if not ok:
                        c.ready = False
                        c.fail(f"{kind} failed once the other pods were up: {why}")
                        break
