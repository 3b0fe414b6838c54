"""Constants and helpers shared by the parts of install-smoke."""

import os
import shlex
import subprocess
import sys

READY_WITHIN = 10.0  # seconds from a container's start to ready
INIT_WITHIN = 10.0  # seconds an init container has to complete
LIVENESS_GRACE = 2.0  # extra seconds for the liveness probe once ready
POLL = 0.25  # seconds between probe attempts
STOP_WITHIN = 5.0  # seconds between SIGTERM and SIGKILL
STDERR_LINES = 3
SUBNET = "10.213"  # 10.213.<cluster>.0/24, only inside namespaces made here
KUBE_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
# The container runtime's default capabilities (containerd, CRI-O).
DEFAULT_CAPS = set(
    "CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP "
    "NET_BIND_SERVICE SYS_CHROOT KILL AUDIT_WRITE".split()
)
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(message):
    print(f"install-smoke: {message}", file=sys.stderr, flush=True)


class HarnessError(Exception):
    """Something this test cannot emulate or set up (not the manifests' fault)."""


def run(argv, **kw):
    """Runs a setup command (bounded), raising HarnessError with its stderr."""
    kw.setdefault("timeout", 60)
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def dig(obj, *keys, default=None):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return default
        obj = obj[k]
    return obj


def expand(text, env):
    """The kubelet's $(VAR) expansion: $$ is $, an unknown $(VAR) stays as written."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i + 2 :]:
            end = text.index(")", i + 2)
            name = text[i + 2 : end]
            out.append(env[name] if name in env else text[i : end + 1])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def write_file(path, content, mode):
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    os.chmod(path, mode)


def tail(path, lines=STDERR_LINES):
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])
