"""Local node agent: a stand-in for kubelet + container runtime, FOR DEVELOPMENT AND TESTS ONLY.

It lets the local cluster (devcluster/cluster.py) run pods without Docker, images or a kubelet. It is
not a kubelet and offers no isolation: pods run as root host processes. Never ship it.

What it does:

* registers the Node ``kubetune-local`` (cpu, memory, ``nvidia.com/gpu`` capacity; labels
  ``kubernetes.io/hostname``, ``kubernetes.io/os=linux``, ``nvidia.com/gpu.present=true``) and
  keeps it Ready with status and Lease heartbeats;
* watches the pods bound to that node and runs each container as a host process under
  ``unshare --mount --uts --propagation private`` (own hostname and /etc/hosts): a small shell
  prologue bind-mounts the pod's volumes
  (configMap, secret, emptyDir, downwardAPI, projected service-account tokens from the
  TokenRequest API, persistentVolumeClaim → ``.kubetune/pvs/<namespace>/<claim>``, hostPath) and
  a per-container termination-message file, then execs the command;
* maps every container image to this repository's Python environment: ``PATH`` starts with
  ``<repo>/.venv/bin`` and ``PYTHONPATH`` names this checkout's packages (both KubeTune images
  carry this project, so ``python -m kubetune_trainer`` and ``kubetune operator`` work); a
  container without ``command`` gets the entrypoint listed in IMAGE_ENTRYPOINTS for its image, or
  fails with a clear message;
* reports pod phase, conditions and container statuses like a kubelet (restartPolicy Never,
  OnFailure, Always), honours graceful deletion (SIGTERM to the process group, grace period,
  SIGKILL, final delete) and writes container logs to ``<pod-log-dir>/<ns>_<pod>_<container>.log``,
  served to ``kubectl logs`` (with ``-f``) through the apiserver;
* provisions PersistentVolumes for claims of its StorageClass ``kubetune-local`` (the default;
  devcluster/provisioner.py, in a thread).

Modules: node_agent (node, heartbeats, pod watch, storage), pod_worker (one pod's lifecycle and
status), pod_inputs (volumes and env), pod_spec (pure helpers), node_logs (``kubectl logs``),
kube_http (REST client).

Not supported: images and their filesystems, user/PID/network namespaces (pods share the host's
loopback network; the pod IP is 127.0.0.1), resource limits, probes, lifecycle hooks, sidecar
init containers, ephemeral containers, ``kubectl exec/attach/port-forward``, ``logs --previous``
(restarts append to one file), Services and cluster DNS (one exception: the /etc/hosts of a pod
with ``spec.subdomain`` lists the other live pods of that headless Service, which is what a run
over several nodes needs), volume updates after start, securityContext (processes run as root),
GPU device isolation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

from devcluster.kube_http import ApiError, Kube
from devcluster.node_logs import LogServer
from devcluster.pod_spec import JSON, POD_IP, now_iso, now_micro, process_start_ticks, signal_group
from devcluster.pod_worker import PodWorker
from devcluster.provisioner import Provisioner

REPO = Path(__file__).resolve().parents[1]
MARKER_ENV = "KUBETUNE_LOCAL_CLUSTER"
HEARTBEAT_S = 10.0
CONFIG_RETRY_S = 2.0

log = logging.getLogger("node-agent")


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
        self.provisioner = Provisioner(kube, args.pv_dir)
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
            # the images carry this checkout's code, also where .venv is shared with another one
            "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer_image'}",
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
        self.refresh_hosts(worker)
        worker.start()

    def service_peers(self, worker: PodWorker) -> list[PodWorker]:
        """The live pods named by the same headless Service as ``worker`` (itself included)."""
        if not worker.subdomain:
            return []
        with self.lock:
            return [w for w in self.workers.values() if not w.deleted
                    and (w.namespace, w.subdomain) == (worker.namespace, worker.subdomain)]

    def refresh_hosts(self, worker: PodWorker) -> None:
        """Stand-in for cluster DNS: a pod of a headless Service came or went; every started pod of
        that Service gets the current names in its /etc/hosts."""
        peers = self.service_peers(worker)
        for peer in peers:
            if (peer.dir / "etc-hosts").exists():
                peer.write_hosts(peers)

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
        self.refresh_hosts(worker)

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

    def provision_loop(self) -> None:
        self.provisioner.loop(self.stopping)

    # ---- main
    def run(self) -> None:
        self.kill_leftovers()
        self.register_node()
        self.provisioner.ensure_storage_class()
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
