"""Local node agent: a stand-in for kubelet + container runtime, FOR DEVELOPMENT AND TESTS ONLY.

It lets the local cluster (hack/cluster.py) run pods without Docker, images or a kubelet. It is
not a kubelet and offers no isolation: pods run as root host processes. Never ship it.

What it does:

* registers the Node ``kubetune-local`` (cpu, memory, ``nvidia.com/gpu`` capacity; labels
  ``kubernetes.io/hostname``, ``kubernetes.io/os=linux``, ``nvidia.com/gpu.present=true``) and
  keeps it Ready with status and Lease heartbeats;
* watches the pods bound to that node and runs each container as a host process under
  ``unshare --mount --propagation private``: a small shell prologue bind-mounts the pod's volumes
  (configMap, secret, emptyDir, downwardAPI, projected service-account tokens from the
  TokenRequest API, persistentVolumeClaim → ``.kubetune/pvs/<namespace>/<claim>``, hostPath) and
  a per-container termination-message file, then execs the command;
* maps every container image to this repository's Python environment: ``PATH`` starts with
  ``<repo>/.venv/bin`` (both KubeTune images carry this project, so ``python -m kubetune_trainer``
  and ``kubetune operator`` work); a container without ``command`` gets the entrypoint listed in
  IMAGE_ENTRYPOINTS for its image, or fails with a clear message;
* reports pod phase, conditions and container statuses like a kubelet (restartPolicy Never,
  OnFailure, Always), honours graceful deletion (SIGTERM to the process group, grace period,
  SIGKILL, final delete) and writes container logs to ``<pod-log-dir>/<ns>_<pod>_<container>.log``,
  served to ``kubectl logs`` (with ``-f``) through the apiserver;
* provisions PersistentVolumes for claims of its StorageClass ``kubetune-local`` (the default).

Not supported: images and their filesystems, user/PID/network namespaces (pods share the host's
loopback network; the pod IP is 127.0.0.1), resource limits, probes, lifecycle hooks, sidecar
init containers, ephemeral containers, ``kubectl exec/attach/port-forward``, ``logs --previous``
(restarts append to one file), Services/DNS, volume updates
after start, securityContext (processes run as root), GPU device isolation.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kube_http import JSON_PATCH, ApiError, Kube

JSON = dict[str, Any]
REPO = Path(__file__).resolve().parents[1]
MARKER_ENV = "KUBETUNE_LOCAL_CLUSTER"
POD_IP = "127.0.0.1"
STORAGE_CLASS = "kubetune-local"
PROVISIONER = "kubetune.io/local-path"
HEARTBEAT_S = 10.0
POLL_S = 0.2
CONFIG_RETRY_S = 2.0
MAX_BACKOFF_S = 30.0
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096
# Entrypoints of images (matched by repository suffix, tag ignored) for containers without `command`.
IMAGE_ENTRYPOINTS: dict[str, list[str]] = {
    "kubetune-operator": ["kubetune", "operator"],
    "kubetune/operator": ["kubetune", "operator"],
    "kubetune-trainer": ["python", "-m", "kubetune_trainer"],
    "kubetune/trainer": ["python", "-m", "kubetune_trainer"],
}

log = logging.getLogger("node-agent")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def process_start_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class ConfigError(Exception):
    """A referenced object is missing; kubelet keeps the pod Pending and retries."""


class PodError(Exception):
    """The pod cannot run here; it is marked Failed with this message."""


# --------------------------------------------------------------------------------------------
# Pure helpers: env, downward API, quantities


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known variables are replaced, `$$` escapes, others stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


def field_value(pod: JSON, path: str) -> str:
    """Value of a downward-API fieldRef."""
    meta = pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(items.items()))
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
    }
    if path not in simple:
        raise PodError(f"unsupported fieldRef {path!r}")
    return str(simple[path])


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (binary and decimal suffixes, milli)."""
    text = str(value)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)


def resource_value(container: JSON, ref: JSON, node_allocatable: dict[str, str]) -> str:
    """Value of a resourceFieldRef: the limit (node allocatable if none) or request, over the divisor."""
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources", {})
    amount = resources.get(kind, {}).get(resource)
    if amount is None and kind == "limits":
        amount = node_allocatable.get(resource, "0")
    if amount is None:
        amount = "0"
    divisor = parse_quantity(ref.get("divisor", "1"))
    return str(math.ceil(parse_quantity(amount) / divisor))


def env_name_ok(name: str) -> bool:
    return re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", name) is not None


# --------------------------------------------------------------------------------------------
# Per-container run state and status


@dataclass
class ContainerRun:
    """One container of a pod: its spec, current process and what a kubelet would report."""

    spec: JSON
    log_path: Path
    termination_file: Path
    init: bool = False
    proc: subprocess.Popen[bytes] | None = None
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JSON = field(default_factory=dict)
    restart_count: int = 0
    restart_at: float | None = None
    backoff_s: float = 1.0

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def exit_code(self) -> int | None:
        terminated = self.state.get("terminated")
        return None if terminated is None else int(terminated["exitCode"])

    def status(self, pod_uid: str) -> JSON:
        image = self.spec.get("image", "")
        return {
            "name": self.name,
            "image": image,
            "imageID": f"kubetune-local://{image}",
            "containerID": f"kubetune-local://{pod_uid}/{self.name}/{self.restart_count}",
            "ready": self.running and not self.init,
            "started": self.running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }


def termination_message(run: ContainerRun, exit_code: int) -> str | None:
    """The termination message: the file's content, or the log tail on failure if the policy asks."""
    try:
        message = run.termination_file.read_text(errors="replace")[:MAX_TERMINATION_MESSAGE]
    except OSError:
        message = ""
    if not message and exit_code != 0 and run.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        try:
            lines = run.log_path.read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-2048:]
        except OSError:
            message = ""
    return message or None


# --------------------------------------------------------------------------------------------
# The pod worker


class PodWorker(threading.Thread):
    """Owns one pod from first sight to final delete; one thread per pod."""

    def __init__(self, agent: Agent, pod: JSON) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.kube = agent.kube
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.dir = agent.state_dir / "pods" / self.uid
        self.changed = threading.Event()
        self.deleted = False  # the pod object is gone from the API
        self.runs: list[ContainerRun] = []
        self.init_runs: list[ContainerRun] = []
        self.volumes: dict[str, Path] = {}
        self.tmpfs_mounts: list[Path] = []
        self.tokens: list[tuple[Path, JSON, float, float]] = []  # (file, request, issued, ttl)
        self.env_cache: dict[str, dict[str, str]] = {}
        self.start_time: str | None = None
        self.initialized = False
        self.last_posted: JSON | None = None

    # ---- events from the watch
    def update(self, pod: JSON) -> None:
        if resource_version(pod) >= resource_version(self.pod):  # events may trail our own writes
            self.pod = pod
        self.changed.set()

    def mark_deleted(self) -> None:
        self.deleted = True
        self.changed.set()

    @property
    def api_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"

    @property
    def deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    def wait(self, timeout: float = POLL_S) -> None:
        self.changed.wait(timeout)
        self.changed.clear()

    # ---- thread body
    def run(self) -> None:
        try:
            self.lifecycle()
        except Exception as error:  # one bad pod must never take the agent down
            log.error("pod %s/%s: %s", self.namespace, self.pod_name, traceback.format_exc())
            self.kill_all(grace_s=0)
            with contextlib.suppress(Exception):
                self.post_status("Failed", reason="NodeAgentError", message=f"node agent: {error}")
        finally:
            self.cleanup_volumes()
            self.agent.worker_done(self)

    def lifecycle(self) -> None:
        phase = self.pod.get("status", {}).get("phase")
        if self.deleting:
            self.final_delete()
            return
        if phase in ("Succeeded", "Failed"):
            return
        self.runs = [self.new_run(c) for c in self.pod["spec"]["containers"]]
        self.init_runs = [self.new_run(c, init=True) for c in self.pod["spec"].get("initContainers", [])]
        if self.started_before():
            self.fail_lost_containers()
            return
        self.start_time = now_iso()
        if not self.prepare():
            return
        if not self.run_init_containers():
            return
        self.initialized = True
        for run in self.runs:
            self.start_container(run)
        self.monitor()

    def fail_lost_containers(self) -> None:
        """Report containers an earlier agent ran as lost, the way kubelet reports vanished ones."""
        previous = {s["name"]: s for s in self.pod.get("status", {}).get("containerStatuses", [])}
        for run in self.runs:
            old = previous.get(run.name, {})
            run.restart_count = old.get("restartCount", 0)
            finished = old.get("state", {}).get("terminated")
            run.state = {"terminated": finished} if finished else {"terminated": {
                "exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now_iso(),
                "message": "The container could not be located when the pod was terminated"}}
        self.post_status("Failed", reason="NodeAgentRestarted",
                         message="the node agent restarted while this pod was running")

    def started_before(self) -> bool:
        """Whether an earlier agent already started containers of this pod."""
        status = self.pod.get("status", {})
        statuses = status.get("containerStatuses", []) + status.get("initContainerStatuses", [])
        return status.get("phase") == "Running" or any(
            "running" in s.get("state", {}) or "terminated" in s.get("state", {}) for s in statuses
        )

    def new_run(self, spec: JSON, init: bool = False) -> ContainerRun:
        log_path = self.agent.pod_log_dir / f"{self.namespace}_{self.pod_name}_{spec['name']}.log"
        return ContainerRun(spec=spec, log_path=log_path, init=init,
                            termination_file=self.dir / "termination" / spec["name"])

    # ---- preparation
    def prepare(self) -> bool:
        """Volumes and env, retried while referenced objects are missing. False: pod is done."""
        self.post_status("Pending")
        while True:
            if self.deleted or self.agent.stopping.is_set():
                return False
            if self.deleting:
                self.final_delete()
                return False
            try:
                self.volumes = self.prepare_volumes()
                for run in self.init_runs + self.runs:
                    self.env_cache[run.name] = self.container_env(run.spec)
                return True
            except ConfigError as error:
                if not any("CreateContainerConfigError" in str(r.state) for r in self.runs):
                    self.record_event("Failed", f"Error: {error}", warning=True)
                for run in self.init_runs + self.runs:
                    run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
                self.post_status("Pending")
                self.wait(CONFIG_RETRY_S)
            except PodError as error:
                self.record_event("Failed", str(error), warning=True)
                self.post_status("Failed", reason="UnsupportedPodSpec", message=str(error))
                return False

    def get_object(self, kind: str, name: str, optional: bool) -> JSON | None:
        obj: JSON | None = self.kube.get_or_none(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
        if obj is None and not optional:
            raise ConfigError(f"{kind[:-1]} {name!r} not found")
        return obj

    def object_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes]:
        obj = self.get_object(kind, name, optional)
        if obj is None:
            return {}
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def prepare_volumes(self) -> dict[str, Path]:
        for mount in self.tmpfs_mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        self.tmpfs_mounts.clear()
        self.tokens.clear()
        volumes: dict[str, Path] = {}
        root = self.dir / "volumes"
        for volume in self.pod["spec"].get("volumes", []):
            name = volume["name"]
            target = root / name
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                volumes[name] = self.agent.pv_dir / self.namespace / claim
                volumes[name].mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                volumes[name] = self.host_path(volume["hostPath"])
            else:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                self.fill_volume(volume, target)
                volumes[name] = target
        return volumes

    def host_path(self, source: JSON) -> Path:
        path = Path(source["path"])
        kind = source.get("type", "")
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate" and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        elif kind in ("Directory", "File") and not path.exists():
            raise ConfigError(f"hostPath {path} does not exist")
        return path

    def fill_volume(self, volume: JSON, target: Path) -> None:
        if "emptyDir" in volume:
            if volume["emptyDir"].get("medium") == "Memory":
                size = volume["emptyDir"].get("sizeLimit")
                options = ["-o", f"size={int(parse_quantity(size))}"] if size else []
                subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", str(target)], check=True)
                self.tmpfs_mounts.append(target)
            return
        mode = 0o644
        if "configMap" in volume:
            source = volume["configMap"]
            mode = source.get("defaultMode", mode)
            self.write_keys(target, self.object_data("configmaps", source["name"], source.get("optional", False)),
                            source.get("items"), mode)
        elif "secret" in volume:
            source = volume["secret"]
            mode = source.get("defaultMode", mode)
            self.write_keys(target, self.object_data("secrets", source["secretName"], source.get("optional", False)),
                            source.get("items"), mode)
        elif "downwardAPI" in volume:
            self.write_downward(target, volume["downwardAPI"].get("items", []), volume["downwardAPI"].get(
                "defaultMode", mode))
        elif "projected" in volume:
            mode = volume["projected"].get("defaultMode", mode)
            for source in volume["projected"].get("sources", []):
                self.fill_projection(target, source, mode)
        else:
            kinds = sorted(set(volume) - {"name"})
            raise PodError(f"volume {volume['name']!r}: unsupported volume type {kinds}")

    def fill_projection(self, target: Path, source: JSON, mode: int) -> None:
        if "serviceAccountToken" in source:
            spec = source["serviceAccountToken"]
            request = {"audiences": [spec["audience"]] if spec.get("audience") else [],
                       "expirationSeconds": spec.get("expirationSeconds", 3600),
                       "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                          "name": self.pod_name, "uid": self.uid}}
            path = target / spec["path"]
            self.write_token(path, request, mode)
        elif "configMap" in source:
            ref = source["configMap"]
            self.write_keys(target, self.object_data("configmaps", ref["name"], ref.get("optional", False)),
                            ref.get("items"), mode)
        elif "secret" in source:
            ref = source["secret"]
            self.write_keys(target, self.object_data("secrets", ref["name"], ref.get("optional", False)),
                            ref.get("items"), mode)
        elif "downwardAPI" in source:
            self.write_downward(target, source["downwardAPI"].get("items", []), mode)
        else:
            raise PodError(f"unsupported projected volume source {sorted(source)}")

    def write_token(self, path: Path, request: JSON, mode: int) -> None:
        account = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": request}
        try:
            answer = self.kube.create(
                f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", body)
        except ApiError as error:
            if error.status == 404:
                raise ConfigError(f"service account {account!r} not found") from None
            raise
        write_file(path, answer["status"]["token"].encode(), mode)
        ttl = float(answer["spec"].get("expirationSeconds") or request["expirationSeconds"])
        self.tokens.append((path, request, time.monotonic(), ttl))

    def refresh_tokens(self) -> None:
        """Rotate tokens at 80% of their lifetime, as kubelet does."""
        due = [t for t in self.tokens if time.monotonic() - t[2] > 0.8 * t[3]]
        for token in due:
            self.tokens.remove(token)
            path, request, _, _ = token
            self.write_token(path, request, path.stat().st_mode & 0o777)

    def write_keys(self, target: Path, data: dict[str, bytes], items: list[JSON] | None, mode: int) -> None:
        if items is None:
            for key, value in data.items():
                write_file(target / key, value, mode)
            return
        for item in items:
            if item["key"] not in data:
                raise ConfigError(f"key {item['key']!r} not found")
            write_file(target / item["path"], data[item["key"]], item.get("mode", mode))

    def write_downward(self, target: Path, items: list[JSON], mode: int) -> None:
        for item in items:
            if "fieldRef" in item:
                value = field_value(self.pod, item["fieldRef"]["fieldPath"])
            else:
                ref = item["resourceFieldRef"]
                container = next(c for c in self.pod["spec"]["containers"] if c["name"] == ref["containerName"])
                value = resource_value(container, ref, self.agent.allocatable)
            write_file(target / item["path"], value.encode(), item.get("mode", mode))

    def container_env(self, container: JSON) -> dict[str, str]:
        """The environment a container sees (base, envFrom, env), with `$(VAR)` expansion."""
        env = self.agent.base_env(self.pod)
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            kind = "configmaps" if "configMapRef" in source else "secrets"
            for key, raw in self.object_data(kind, ref["name"], ref.get("optional", False)).items():
                name = source.get("prefix", "") + key
                if env_name_ok(name):
                    env[name] = raw.decode(errors="replace")
        for var in container.get("env", []):
            resolved = self.env_value(container, var, env)
            if resolved is not None:
                env[var["name"]] = resolved
        return env

    def env_value(self, container: JSON, var: JSON, env: dict[str, str]) -> str | None:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), env)
        source = var["valueFrom"]
        if "fieldRef" in source:
            return field_value(self.pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return resource_value(container, source["resourceFieldRef"], self.agent.allocatable)
        kind, ref = ("configmaps", source.get("configMapKeyRef")) if "configMapKeyRef" in source else (
            "secrets", source.get("secretKeyRef"))
        if ref is None:
            raise PodError(f"env {var['name']!r}: unsupported valueFrom {sorted(source)}")
        data = self.object_data(kind, ref["name"], ref.get("optional", False))
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"key {ref['key']!r} not found in {kind[:-1]} {ref['name']!r}")
        return data[ref["key"]].decode(errors="replace")

    # ---- processes
    def command(self, run: ContainerRun, env: dict[str, str]) -> list[str]:
        command = list(run.spec.get("command") or [])
        if not command:
            image = run.spec.get("image", "").split("@")[0].rsplit(":", 1)[0]
            entrypoint = next((v for k, v in IMAGE_ENTRYPOINTS.items() if image.endswith(k)), None)
            if entrypoint is None:
                raise PodError(f"container {run.name!r} has no command and the node agent cannot read "
                               f"the entrypoint of image {run.spec.get('image')!r} (it runs no images)")
            command = entrypoint
        return [expand(part, env) for part in command + list(run.spec.get("args") or [])]

    def mount_script(self, run: ContainerRun) -> str:
        """Shell prologue run inside the private mount namespace: bind mounts, then exec."""
        mounts: list[tuple[str, Path, bool]] = []
        for mount in run.spec.get("volumeMounts", []):
            if mount["name"] not in self.volumes:
                raise PodError(f"volumeMount {mount['name']!r} names no volume of the pod")
            source = self.volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append((mount["mountPath"], source, bool(mount.get("readOnly"))))
        path = run.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_LOG
        mounts.append((path, run.termination_file, False))
        lines = ["set -e"]
        for target, source, read_only in sorted(mounts, key=lambda m: m[0].count("/")):
            t, s = shlex.quote(target), shlex.quote(str(source))
            if source.is_dir():
                lines.append(f"mkdir -p {t}")
            else:
                lines.append(f"mkdir -p $(dirname {t}); [ -e {t} ] || touch {t}")
            lines.append(f"mount --bind {s} {t}")
            if read_only:
                lines.append(f"mount -o remount,bind,ro {t}")
        workdir = run.spec.get("workingDir")
        if workdir:
            lines.append(f"mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)}")
        lines.append('exec "$@"')
        return "\n".join(lines)

    def start_container(self, run: ContainerRun) -> None:
        env = self.env_cache[run.name]
        try:
            argv = self.command(run, env)
            script = self.mount_script(run)
        except PodError as error:
            run.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(error),
                                        "startedAt": now_iso(), "finishedAt": now_iso()}}
            self.record_event("Failed", str(error), warning=True)
            return
        run.termination_file.parent.mkdir(parents=True, exist_ok=True)
        run.termination_file.write_bytes(b"")
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A new pod with the same name starts a new log; restarts of a container append to it.
        with run.log_path.open("ab" if run.restart_count else "wb") as logfile:
            run.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", *argv],
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                env=env, cwd="/", start_new_session=True,
            )
        run.state = {"running": {"startedAt": now_iso()}}
        run.restart_at = None
        self.record_event("Started", f"Started container {run.name} (image {run.spec.get('image')!r} mapped to "
                                     f"the local environment)")
        self.agent.record_pid(self.uid, run.name, run.proc.pid)
        log.info("pod %s/%s: started container %s (pid %d)", self.namespace, self.pod_name, run.name, run.proc.pid)

    def reap(self, run: ContainerRun) -> bool:
        """Record the exit of a finished process. True when it just exited."""
        if run.proc is None or run.proc.poll() is None:
            return False
        code = run.proc.returncode
        if code < 0:  # killed by a signal: report as a shell would
            code = 128 - code
        started = run.state.get("running", {}).get("startedAt", now_iso())
        terminated: JSON = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                            "startedAt": started, "finishedAt": now_iso(), "containerID":
                                f"kubetune-local://{self.uid}/{run.name}/{run.restart_count}"}
        message = termination_message(run, code)
        if message:
            terminated["message"] = message
        run.state = {"terminated": terminated}
        run.proc = None
        log.info("pod %s/%s: container %s exited %d", self.namespace, self.pod_name, run.name, code)
        return True

    def should_restart(self, run: ContainerRun) -> bool:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        return policy == "Always" or (policy == "OnFailure" and run.exit_code != 0)

    def schedule_restart(self, run: ContainerRun) -> None:
        run.last_state = run.state
        run.restart_count += 1
        run.restart_at = time.monotonic() + run.backoff_s
        run.state = {"waiting": {"reason": "CrashLoopBackOff",
                                 "message": f"back-off {run.backoff_s:.0f}s restarting failed container"}}
        self.record_event("BackOff", f"Back-off {run.backoff_s:.0f}s restarting failed container {run.name}",
                          warning=True)
        run.backoff_s = min(run.backoff_s * 2, MAX_BACKOFF_S)

    def run_init_containers(self) -> bool:
        for run in self.init_runs:
            self.start_container(run)
            self.post_status("Pending")
            while run.exit_code != 0:
                self.wait()
                if self.interrupted():
                    return False
                start_failed = run.proc is None and run.restart_at is None and run.exit_code is not None
                if (self.reap(run) or start_failed) and run.exit_code != 0:
                    if self.pod["spec"].get("restartPolicy", "Always") == "Never":
                        self.post_status("Failed", reason="InitContainerFailed",
                                         message=f"init container {run.name} exited {run.exit_code}")
                        return False
                    self.schedule_restart(run)
                    self.post_status("Pending")
                if run.restart_at is not None and time.monotonic() >= run.restart_at:
                    self.start_container(run)
                    self.post_status("Pending")
        return True

    def interrupted(self) -> bool:
        """Handle deletion, disappearance and agent shutdown. True when the worker must stop."""
        if self.deleted or self.agent.stopping.is_set():
            self.kill_all(grace_s=0 if self.deleted else 2)
            return True
        if self.deleting:
            for run in self.init_runs + self.runs:
                if run.running:
                    self.record_event("Killing", f"Stopping container {run.name}")
            self.kill_all(grace_s=self.grace_period())
            for run in self.init_runs + self.runs:
                self.reap(run)
            self.post_status(self.phase(final=True))
            self.final_delete()
            return True
        return False

    def monitor(self) -> None:
        self.post_status(self.phase())
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        started = time.monotonic()
        while True:
            self.wait()
            if self.interrupted():
                return
            if deadline is not None and time.monotonic() - started > deadline:
                self.kill_all(grace_s=self.grace_period())
                self.post_status("Failed", reason="DeadlineExceeded",
                                 message="Pod was active on the node longer than the specified deadline")
                return
            for run in self.runs:
                if self.reap(run) and self.should_restart(run):
                    self.schedule_restart(run)
                if run.restart_at is not None and time.monotonic() >= run.restart_at:
                    self.start_container(run)
            self.refresh_tokens()
            phase = self.phase()
            self.post_status(phase)
            if phase in ("Succeeded", "Failed"):
                return

    def phase(self, final: bool = False) -> str:
        """Pod phase from container states, as kubelet computes it."""
        if any(r.running or r.restart_at is not None for r in self.runs) and not final:
            return "Running"
        codes = [r.exit_code for r in self.runs]
        if any(code is None for code in codes):
            return "Failed" if final else "Pending"
        return "Succeeded" if all(code == 0 for code in codes) else "Failed"

    def grace_period(self) -> float:
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(grace)

    def kill_all(self, grace_s: float) -> None:
        """SIGTERM every container's process group, wait up to the grace period, then SIGKILL."""
        runs = [r for r in self.init_runs + self.runs if r.proc is not None and r.proc.poll() is None]
        for run in runs:
            assert run.proc is not None
            signal_group(run.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(r.proc is not None and r.proc.poll() is None for r in runs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for run in runs:
            if run.proc is not None:
                signal_group(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
        for run in runs:
            self.reap(run)

    # ---- API writes
    def record_event(self, reason: str, message: str, warning: bool = False) -> None:
        """A kubelet-style Event on the pod (best effort: events never fail a pod)."""
        stamp = now_iso()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{self.pod_name}.{secrets.token_hex(8)}", "namespace": self.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name,
                               "namespace": self.namespace, "uid": self.uid},
            "reason": reason, "message": message, "type": "Warning" if warning else "Normal",
            "source": {"component": "kubelet", "host": self.agent.node_name},
            "reportingComponent": "kubetune-node-agent", "reportingInstance": self.agent.node_name,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            self.kube.create(f"/api/v1/namespaces/{self.namespace}/events", event)
        except Exception as error:
            log.debug("event %s for %s/%s not recorded: %s", reason, self.namespace, self.pod_name, error)

    def post_status(self, phase: str, reason: str | None = None, message: str | None = None) -> None:
        current = self.pod.get("status", {})
        running = phase == "Running"
        all_ready = running and all(r.running for r in self.runs)

        def condition(kind: str, ok: bool) -> JSON:
            previous = next((c for c in current.get("conditions", []) if c["type"] == kind), None)
            status = "True" if ok else "False"
            since = previous["lastTransitionTime"] if previous and previous["status"] == status else now_iso()
            return {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": since}

        ready_reason = None if all_ready else ("PodCompleted" if phase in ("Succeeded", "Failed")
                                                else "ContainersNotReady")
        conditions = [c for c in current.get("conditions", []) if c["type"] not in
                      ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")]
        conditions += [
            condition("PodReadyToStartContainers", phase in ("Pending", "Running")),
            condition("Initialized", self.initialized or phase == "Succeeded"),
            condition("ContainersReady", all_ready),
            condition("Ready", all_ready),
        ]
        for c in conditions[-2:]:
            if ready_reason:
                c["reason"] = ready_reason
        status: JSON = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP, "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time or current.get("startTime") or now_iso(),
            "containerStatuses": [r.status(self.uid) for r in self.runs] or current.get("containerStatuses", []),
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status(self.uid) for r in self.init_runs]
        if current.get("qosClass"):
            status["qosClass"] = current["qosClass"]
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        if status == self.last_posted:
            return
        try:
            self.pod = self.kube.patch(f"{self.api_path}/status",
                                       [{"op": "replace", "path": "/status", "value": status}], JSON_PATCH)
            self.last_posted = status
        except ApiError as error:
            if error.status != 404:
                raise

    def final_delete(self) -> None:
        """The kubelet's last word on a pod: delete it with grace period 0."""
        self.cleanup_volumes()
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": self.uid}}
        try:
            self.kube.delete(self.api_path, body)
        except ApiError as error:
            if error.status not in (404, 409):
                raise

    def cleanup_volumes(self) -> None:
        for mount in self.tmpfs_mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        self.tmpfs_mounts.clear()
        if all(r.proc is None for r in self.init_runs + self.runs):
            shutil.rmtree(self.dir, ignore_errors=True)
            self.agent.forget_pids(self.uid)


def resource_version(obj: JSON) -> int:
    """etcd revision of an object; comparable on this single-etcd cluster."""
    return int(obj["metadata"].get("resourceVersion") or 0)


def write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


# --------------------------------------------------------------------------------------------
# The agent: node registration, heartbeats, pod watch, PV provisioning


class Agent:
    """Registers the node, keeps it Ready and hands the pods bound to it to PodWorkers."""

    def __init__(self, kube: Kube, args: argparse.Namespace) -> None:
        self.kube = kube
        self.node_name: str = args.node_name
        self.state_dir: Path = args.state_dir
        self.pod_log_dir: Path = args.pod_log_dir
        self.pv_dir: Path = args.pv_dir
        self.venv_bin: Path = args.venv_bin
        self.capacity = {"cpu": str(args.cpu), "memory": args.memory, "nvidia.com/gpu": str(args.gpus),
                         "pods": "110", "ephemeral-storage": "100Gi"}
        self.allocatable = dict(self.capacity)
        self.stopping = threading.Event()
        self.log_server = LogServer(self, args.serving_cert, args.serving_key) if args.serving_cert else None
        self.logs_port = self.log_server.server_address[1] if self.log_server else 0
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self.lock = threading.Lock()
        host = kube.server.split("://", 1)[1].split("/", 1)[0]
        self.api_host, _, port = host.rpartition(":")
        self.api_port = port or "443"

    # ---- node
    def node_status(self) -> JSON:
        beat = now_iso()

        def condition(kind: str, status: str, reason: str, message: str) -> JSON:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": beat, "lastTransitionTime": self.started_at}

        return {"status": {
            "capacity": self.capacity, "allocatable": self.allocatable,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubetune node agent"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubetune node agent"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubetune node agent"),
                condition("Ready", "True", "KubeletReady", "kubetune node agent is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.logs_port}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                "osImage": "kubetune local node agent (development only)",
                "containerRuntimeVersion": "kubetune-local://0.1", "kubeletVersion": "v1.35.4",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
        }}

    def register_node(self) -> None:
        self.started_at = now_iso()
        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true",
                  "node-role.kubernetes.io/kubetune-local": ""}
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            self.kube.create("/api/v1/nodes", node)
        except ApiError as error:
            if error.status != 409:
                raise
            self.kube.patch(f"/api/v1/nodes/{self.node_name}", {"metadata": {"labels": labels}})
        self.kube.patch(f"/api/v1/nodes/{self.node_name}/status", self.node_status())
        self.renew_lease()
        log.info("node %s registered (gpus=%s)", self.node_name, self.capacity["nvidia.com/gpu"])

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        try:
            self.kube.patch(path, {"spec": spec})
        except ApiError as error:
            if error.status != 404:
                raise
            self.kube.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                             {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                              "metadata": {"name": self.node_name}, "spec": spec})

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            try:
                self.renew_lease()
                self.kube.patch(f"/api/v1/nodes/{self.node_name}/status", self.node_status())
            except Exception as error:
                log.warning("heartbeat failed: %s", error)

    # ---- pods
    def base_env(self, pod: JSON) -> dict[str, str]:
        env = {
            "PATH": f"{self.venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "HOSTNAME": pod["metadata"]["name"], "LANG": "C.UTF-8",
            "KUBERNETES_SERVICE_HOST": self.api_host, "KUBERNETES_SERVICE_PORT": self.api_port,
            "KUBERNETES_SERVICE_PORT_HTTPS": self.api_port,
            "KUBERNETES_PORT": f"tcp://{self.api_host}:{self.api_port}",
        }
        if os.environ.get(MARKER_ENV):
            env[MARKER_ENV] = os.environ[MARKER_ENV]
        return env

    def dispatch(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
                return
            terminal = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
            deleting = bool(pod["metadata"].get("deletionTimestamp"))
            if (uid in self.finished or terminal) and not deleting:
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.start()

    def container_running(self, namespace: str, pod: str, container: str) -> bool:
        with self.lock:
            workers = [w for w in self.workers.values() if (w.namespace, w.pod_name) == (namespace, pod)]
        return any(r.name == container and r.running for w in workers for r in w.runs + w.init_runs)

    def forget(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            self.finished.discard(uid)
            worker = self.workers.get(uid)
        if worker is not None:
            worker.mark_deleted()

    def worker_done(self, worker: PodWorker) -> None:
        with self.lock:
            self.workers.pop(worker.uid, None)
            if not worker.deleted:
                self.finished.add(worker.uid)

    def watch_pods(self) -> None:
        path = "/api/v1/pods"
        selector = f"spec.nodeName={self.node_name}"
        version: str | None = None
        while not self.stopping.is_set():
            try:
                if version is None:
                    listing = self.kube.get(path, fieldSelector=selector)
                    uids = {p["metadata"]["uid"] for p in listing["items"]}
                    with self.lock:
                        vanished = [w for uid, w in self.workers.items() if uid not in uids]
                    for worker in vanished:
                        worker.mark_deleted()
                    for pod in listing["items"]:
                        self.dispatch(pod)
                    version = listing["metadata"]["resourceVersion"]
                for event in self.kube.watch(path, fieldSelector=selector, resourceVersion=version):
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        version = None if obj.get("code") == 410 else version
                        break
                    version = obj["metadata"]["resourceVersion"]
                    if kind == "DELETED":
                        self.forget(obj)
                    elif kind in ("ADDED", "MODIFIED"):
                        self.dispatch(obj)
            except ApiError as error:
                if error.status == 410:
                    version = None
                else:
                    log.warning("pod watch: %s", error)
                    self.stopping.wait(1)
            except Exception as error:
                log.warning("pod watch: %s", error)
                self.stopping.wait(1)

    # ---- process bookkeeping (survives agent restarts)
    def pid_file(self, uid: str) -> Path:
        return self.state_dir / "pids" / f"{uid}.json"

    def record_pid(self, uid: str, container: str, pid: int) -> None:
        with self.lock:
            path = self.pid_file(uid)
            path.parent.mkdir(parents=True, exist_ok=True)
            records = json.loads(path.read_text()) if path.exists() else {}
            records[container] = [pid, process_start_ticks(pid)]
            path.write_text(json.dumps(records))

    def forget_pids(self, uid: str) -> None:
        self.pid_file(uid).unlink(missing_ok=True)

    def kill_leftovers(self) -> None:
        """Kill pod processes of an earlier agent instance and clean its pod directories."""
        for path in (self.state_dir / "pids").glob("*.json"):
            for pid, ticks in json.loads(path.read_text()).values():
                if ticks is not None and process_start_ticks(pid) == ticks:
                    log.warning("killing leftover pod process %d", pid)
                    signal_group(pid, signal.SIGKILL)
            path.unlink()
        pods_dir = self.state_dir / "pods"
        for line in Path("/proc/self/mounts").read_text().splitlines():
            mountpoint = line.split()[1]
            if mountpoint.startswith(f"{pods_dir}/"):
                subprocess.run(["umount", "-l", mountpoint], check=False)
        shutil.rmtree(pods_dir, ignore_errors=True)

    # ---- storage
    def ensure_storage_class(self) -> None:
        body = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": STORAGE_CLASS,
                             "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}
        try:
            self.kube.create("/apis/storage.k8s.io/v1/storageclasses", body)
        except ApiError as error:
            if error.status != 409:
                raise

    def provision_loop(self) -> None:
        """Bind pending claims of our class to hostPath PVs; delete released ones (polling, 2s)."""
        while not self.stopping.wait(CONFIG_RETRY_S):
            try:
                self.provision_once()
            except Exception as error:
                log.warning("provisioner: %s", error)

    def provision_once(self) -> None:
        for claim in self.kube.get("/api/v1/persistentvolumeclaims")["items"]:
            meta, spec = claim["metadata"], claim["spec"]
            if spec.get("storageClassName") != STORAGE_CLASS or spec.get("volumeName"):
                continue
            if claim.get("status", {}).get("phase") != "Pending" or meta.get("deletionTimestamp"):
                continue
            directory = self.pv_dir / meta["namespace"] / meta["name"]
            directory.mkdir(parents=True, exist_ok=True)
            volume = {
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"pvc-{meta['uid']}",
                             "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {
                    "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
                    "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                    "persistentVolumeReclaimPolicy": "Delete", "storageClassName": STORAGE_CLASS,
                    "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                    "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                                 "name": meta["name"], "uid": meta["uid"]},
                },
            }
            with contextlib.suppress(ApiError):
                self.kube.create("/api/v1/persistentvolumes", volume)
        for volume in self.kube.get("/api/v1/persistentvolumes")["items"]:
            annotations = volume["metadata"].get("annotations", {})
            if annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            if volume.get("status", {}).get("phase") in ("Released", "Failed"):
                shutil.rmtree(volume["spec"]["hostPath"]["path"], ignore_errors=True)
                with contextlib.suppress(ApiError):
                    self.kube.delete(f"/api/v1/persistentvolumes/{volume['metadata']['name']}")

    # ---- main
    def run(self) -> None:
        self.kill_leftovers()
        self.register_node()
        self.ensure_storage_class()
        loops = [self.heartbeat_loop, self.watch_pods, self.provision_loop]
        if self.log_server is not None:
            loops.append(self.log_server.serve_forever)
        for target in loops:
            threading.Thread(target=target, name=target.__name__, daemon=True).start()
        self.stopping.wait()
        log.info("stopping: terminating pods")
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.changed.set()
        for worker in workers:
            worker.join(timeout=5)


# --------------------------------------------------------------------------------------------
# `kubectl logs`: the kubelet's /containerLogs endpoint, which the apiserver proxies to


class LogServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, agent: Agent, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), LogHandler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.agent = agent


class LogHandler(BaseHTTPRequestHandler):
    """Serves container log files; no authentication (loopback only, development only)."""

    server: LogServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts == ["healthz"]:
            self.reply(200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.reply(404, b"not found")
            return
        namespace, pod, container = parts[1:]
        path = self.server.agent.pod_log_dir / f"{namespace}_{pod}_{container}.log"
        if not path.exists():
            self.reply(404, f"no logs for container {container} of pod {namespace}/{pod}".encode())
            return
        query = urllib.parse.parse_qs(url.query)
        data = path.read_bytes()
        if "tailLines" in query:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(query["tailLines"][0]):]) if int(query["tailLines"][0]) else b""
        if "limitBytes" in query:
            data = data[: int(query["limitBytes"][0])]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(data)
        if query.get("follow", ["false"])[0] == "true":
            self.follow(path, path.stat().st_size, namespace, pod, container)

    def follow(self, path: Path, offset: int, namespace: str, pod: str, container: str) -> None:
        with contextlib.suppress(OSError), path.open("rb") as handle:
            handle.seek(offset)
            while True:
                chunk = handle.read(65536)
                if chunk:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                elif not self.server.agent.container_running(namespace, pod, container):
                    self.wfile.write(handle.read())
                    return
                else:
                    time.sleep(POLL_S)

    def reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="kubetune local node agent (development and tests only)")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--node-name", default="kubetune-local")
    parser.add_argument("--gpus", type=int, default=2, help="nvidia.com/gpu capacity")
    parser.add_argument("--cpu", default=str(os.cpu_count() or 2))
    parser.add_argument("--memory", default=f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**20}Mi")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--pod-log-dir", type=Path, required=True)
    parser.add_argument("--pv-dir", type=Path, required=True)
    parser.add_argument("--serving-cert", type=Path, help="TLS certificate of the logs endpoint")
    parser.add_argument("--serving-key", type=Path)
    parser.add_argument("--venv-bin", type=Path, default=REPO / ".venv" / "bin",
                        help="put first on PATH of every container: the image stand-in")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    args = parse_args(argv)
    for directory in (args.state_dir, args.pod_log_dir, args.pv_dir):
        directory.mkdir(parents=True, exist_ok=True)
    agent = Agent(Kube(args.kubeconfig), args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stopping.set())
    log.info("node agent on %s (development and tests only)", socket.gethostname())
    agent.run()


if __name__ == "__main__":
    main()
