"""Runs one pod as host processes, as a kubelet would (development and tests only)."""

from __future__ import annotations

import contextlib
import logging
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from devcluster.kube_http import JSON_PATCH, ApiError
from devcluster.pod_inputs import PodInputs
from devcluster.pod_spec import JSON, POD_IP, ConfigError, PodError, expand, now_iso, resource_version, signal_group

if TYPE_CHECKING:
    from node_agent import Agent

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
        self.inputs = PodInputs(agent.kube, pod, self.dir / "volumes", agent.pv_dir, agent.allocatable,
                                agent.base_env(pod))
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
                self.inputs.pod = self.pod
                self.inputs.volumes = self.inputs.prepare_volumes()
                for run in self.init_runs + self.runs:
                    self.env_cache[run.name] = self.inputs.container_env(run.spec)
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
            if mount["name"] not in self.inputs.volumes:
                raise PodError(f"volumeMount {mount['name']!r} names no volume of the pod")
            source = self.inputs.volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append((mount["mountPath"], source, bool(mount.get("readOnly"))))
        path = run.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_LOG
        mounts.append((path, run.termination_file, False))
        lines = ["set -e"]
        if not self.pod["spec"].get("hostNetwork"):
            hostname, hosts = self.host_identity()
            mounts.append(("/etc/hosts", hosts, False))
            lines.append(f"echo {shlex.quote(hostname)} > /proc/sys/kernel/hostname")
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

    @property
    def hostname(self) -> str:
        return str(self.pod["spec"].get("hostname") or self.pod_name)[:63]

    @property
    def subdomain(self) -> str | None:
        """The headless Service that names this pod (``spec.subdomain``), if any."""
        subdomain = self.pod["spec"].get("subdomain")
        return str(subdomain) if subdomain else None

    def dns_names(self) -> list[str]:
        """The names cluster DNS would give this pod: <hostname>.<subdomain>[.<ns>.svc.cluster.local]."""
        if not self.subdomain:
            return []
        short = f"{self.hostname}.{self.subdomain}"
        return [f"{short}.{self.namespace}.svc.cluster.local", short]

    def host_identity(self) -> tuple[str, Path]:
        """The pod's hostname and its /etc/hosts file, as kubelet manages them."""
        hosts = self.dir / "etc-hosts"
        if not hosts.exists():
            hosts.parent.mkdir(parents=True, exist_ok=True)
            self.write_hosts(self.agent.service_peers(self))
        return self.hostname, hosts

    def write_hosts(self, peers: list[PodWorker]) -> None:
        """kubelet's hosts file, plus, standing in for cluster DNS (the node runs none), the names of
        the other pods of the same headless Service: every pod's IP is the host's loopback.
        Rewritten in place when those pods come and go (the file is bind-mounted by inode)."""
        lines = ["# Kubernetes-managed hosts file (kubetune local node agent).",
                 "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{POD_IP}\t{' '.join([*self.dns_names(), self.hostname])}"]
        lines += [f"{POD_IP}\t{' '.join(peer.dns_names())}  # stand-in for cluster DNS"
                  for peer in peers if peer is not self]
        hosts = self.dir / "etc-hosts"
        with open(hosts, "a+") as file:  # never replaced: a running pod has it bind-mounted
            file.seek(0)
            file.truncate()
            file.write("\n".join(lines) + "\n")

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
                ["unshare", "--mount", "--uts", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", *argv],
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
            self.inputs.refresh_tokens()
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
        self.inputs.release()
        if all(r.proc is None for r in self.init_runs + self.runs):
            shutil.rmtree(self.dir, ignore_errors=True)
            self.agent.forget_pids(self.uid)
