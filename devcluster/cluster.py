"""Local development cluster of real components, no Docker: ``python -m devcluster up|down|status``.

``up`` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler, MinIO, an image
registry, Kueue and a real node (below) as detached processes with free ports, waits until the
cluster is usable and writes:

    <dir>/kubeconfig      admin kubeconfig (client certificate in system:masters)
    <dir>/bin/kubectl     kubectl and helm (devcluster/tools.py)
    <dir>/bin/helm
    <dir>/minio.env       MINIO_ENDPOINT, MINIO_ACCESS_KEY, MINIO_SECRET_KEY (random per cluster)
    <dir>/cluster.json    state: processes (pid, process group, start time), ports, paths
    <dir>/logs/           one log per component; pod logs under logs/pods/

``<dir>`` is ``.kubetune/`` in the repository unless ``--dir`` says otherwise; one cluster runs on
a machine at a time (its node is machine-wide). ``up`` on a running cluster does nothing; ``down``
stops every process ``up`` started (process groups, found through the state file and an
environment marker), unmounts what the node mounted and deletes the cluster's data.
Certificates stay for the next ``up``. ``stop NAME`` / ``start NAME`` stop one process of the
cluster and start it again alike (fault injection, e.g. an object-store outage: ``stop minio``).

Kueue (hack/build-kueue.sh, pinned in hack/kueue/go.mod) runs with its webhooks: no Service
routing here, so its webhook configurations and its CRDs' conversion webhooks point at
``https://127.0.0.1:<port>`` with a serving certificate from the cluster's CA. ``--no-kueue`` (or
``KUBETUNE_KUEUE=0``) starts the cluster without it.

The node is real (devcluster/real_node.py): kubelet v1.35 and containerd with a CNI bridge, the
Debian packages installed by hack/install-node-tools.sh, kube-proxy (iptables mode), CoreDNS (a
process on the node address behind the ``kube-dns`` Service) and a hostPath volume provisioner
(devcluster/provisioner.py); the apiserver also serves on the node address with a real
``kubernetes`` Service endpoint. ``down`` also undoes what they leave on the machine. One real
node runs per machine.

Binaries come from hack/build-binaries.sh (built once into ~/.cache/kubetune/bin/<versions>);
``KUBEBUILDER_ASSETS`` supplies etcd, kube-apiserver and kubectl instead. With
``USE_EXISTING_CLUSTER=true`` nothing is started: the current kubeconfig's cluster is used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from devcluster import DNS_SERVICE_IP, REPO, SERVICE_CIDR, log, node_cleanup, real_node, tools
from devcluster.binaries import Binaries, build_dir, find_binaries
from devcluster.control_plane import start_apiserver, start_controllers, start_etcd, start_minio, start_registry
from devcluster.kueue import find_kueue, install_kueue, kueue_ready, start_kueue
from devcluster.pki import APISERVER_NAMES, ensure_cert, ensure_pki, ensure_serving_cert, kubeconfig_text, subject_name
from devcluster.processes import (
    Paths,
    State,
    exited,
    free_ports,
    http_ok,
    marked_processes,
    poll_until,
    signal_group,
    start_process,
)

DEFAULT_DIR = REPO / ".kubetune"
READY_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------
# Paths, binaries, ports


# --------------------------------------------------------------------------------------------
# Certificates


# --------------------------------------------------------------------------------------------
# Processes and state


# --------------------------------------------------------------------------------------------
# Readiness probes


def _https_context(pki: Path, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def api_get(state: State, pki: Path, path: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(state.apiserver + path, timeout=5, context=_https_context(pki)) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result
    except (urllib.error.URLError, OSError, json.JSONDecodeError):
        return None


def node_ready(state: State, pki: Path) -> bool:
    node = api_get(state, pki, f"/api/v1/nodes/{state.node}")
    if node is None:
        return False
    conditions = node.get("status", {}).get("conditions", [])
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    blocking = [t for t in node.get("spec", {}).get("taints", []) if t.get("effect") == "NoSchedule"]
    return ready and not blocking


def default_service_account_exists(state: State, pki: Path) -> bool:
    return api_get(state, pki, "/api/v1/namespaces/default/serviceaccounts/default") is not None


def ensure_alive(state: State, name: str) -> Callable[[], None]:
    def check() -> None:
        for record in state.processes:
            if record.name == name and not record.alive():
                raise RuntimeError(f"{name} exited during startup; see its log under logs/{name}.log")

    return check


def wait_ready(name: str, state: State, probe: Callable[[], bool], timeout: float = READY_TIMEOUT_S) -> None:
    check = ensure_alive(state, name)

    def ready() -> bool:
        check()
        return probe()

    poll_until(ready, timeout, name)


# --------------------------------------------------------------------------------------------
# Commands


def cluster_up(paths: Paths, gpus: int, kueue: bool = True) -> State:
    """Start the cluster (or return the state of the running one); `kueue`: with Kueue."""
    existing = State.load(paths.state)
    if existing and existing.ready and all(p.alive() for p in existing.processes):
        log(f"already up: {existing.apiserver}")
        return existing
    if existing and repair(paths, existing):
        return existing
    if existing:
        log("found a stale or partial cluster; stopping it first")
        cluster_down(paths)

    started = time.monotonic()
    real_node.install_tools()
    if (pid := real_node.other_kubelet_running()) is not None:
        raise RuntimeError(f"a kubelet already runs on this machine (pid {pid}): one real node at a time")
    real_node.check_pod_cidr()
    # Logs of the previous cluster stay readable after `down`; a fresh cluster starts fresh logs.
    shutil.rmtree(paths.logs / "pods", ignore_errors=True)
    for directory in (paths.root, paths.logs, paths.logs / "pods", paths.data, paths.pvs):
        directory.mkdir(parents=True, exist_ok=True)
    binaries = find_binaries()
    kueue_built = find_kueue() if kueue else None
    linked = tools.install_tools(paths.bin, binaries.helm, binaries.kubectl_override)
    ensure_pki(paths.pki)
    # The real node's pods reach the apiserver at the node address (through the `kubernetes` Service).
    node_address = real_node.node_ip()
    ensure_cert(paths.pki, "apiserver", subject_name("kube-apiserver"), server_names=[*APISERVER_NAMES, node_address])
    ensure_cert(paths.pki, "kubelet-client", subject_name("kube-apiserver-kubelet-client"), client=True)
    if kueue:
        ensure_serving_cert(paths.pki, "kueue", ["127.0.0.1", "localhost"])

    names = ["etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "minio", "minio-console",
             "registry"]
    if kueue:
        names += ["kueue-webhook", "kueue-metrics", "kueue-health"]
    # The kubelet serves on the node address; a free loopback port is free there too.
    names += ["kubelet", "kubelet-healthz", "kube-proxy-healthz", "kube-proxy-metrics", "coredns-health",
              "coredns-ready"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    apiserver = f"https://127.0.0.1:{ports['apiserver']}"
    state = State(
        dir=str(paths.root), ports=ports, apiserver=apiserver, kubeconfig=str(paths.kubeconfig),
        kubectl=str(linked["kubectl"]), helm=str(linked["helm"]),
        minio_endpoint=f"127.0.0.1:{ports['minio']}", kubectl_cache=str(paths.data / "kubectl-cache"),
        gpus=gpus, registry=f"127.0.0.1:{ports['registry']}",
        node_ip=node_address,
    )
    state.save(paths.state)
    paths.kubeconfig.write_text(kubeconfig_text(apiserver, paths.pki, "admin"))
    paths.kubeconfig.chmod(0o600)
    for client in ("controller-manager", "scheduler"):
        (paths.pki / f"{client}.kubeconfig").write_text(kubeconfig_text(apiserver, paths.pki, client))

    minio_user, minio_password = "kubetune-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    try:
        start_etcd(binaries, paths, state)
        start_minio(binaries, paths, state, minio_user, minio_password)
        start_registry(binaries, paths, state)
        wait_ready("etcd", state, lambda: http_ok(f"http://127.0.0.1:{ports['etcd']}/health"))
        start_apiserver(binaries, paths, state)
        wait_ready("kube-apiserver", state, lambda: http_ok(apiserver + "/readyz", _https_context(paths.pki)))
        start_controllers(binaries, paths, state)
        _start_real_node(binaries, paths, state)
        if kueue_built is not None:  # while the controllers and the node start
            install_kueue(kueue_built, paths, state)
            start_kueue(kueue_built, paths, state)
        wait_ready("minio", state, lambda: http_ok(f"http://{state.minio_endpoint}/minio/health/ready"))
        wait_ready("registry", state, lambda: http_ok(f"http://{state.registry}/v2/"))
        paths.minio_env.write_text(
            f"MINIO_ENDPOINT={state.minio_endpoint}\nMINIO_ACCESS_KEY={minio_user}\n"
            f"MINIO_SECRET_KEY={minio_password}\n"
        )
        paths.minio_env.chmod(0o600)
        unverified = _https_context(paths.pki, verify=False)
        for name in ("controller-manager", "scheduler"):
            url = f"https://127.0.0.1:{ports[name]}/healthz"
            wait_ready(f"kube-{name}", state, functools.partial(http_ok, url, unverified))
        _advertise_gpus(paths, state)
        wait_ready("kubelet", state, lambda: node_ready(state, paths.pki))
        wait_ready("kube-proxy", state, lambda: http_ok(f"http://127.0.0.1:{ports['kube-proxy-healthz']}/healthz"))
        wait_ready("coredns", state, lambda: http_ok(f"http://127.0.0.1:{ports['coredns-ready']}/ready"))
        wait_ready("kube-controller-manager", state, lambda: default_service_account_exists(state, paths.pki))
        if kueue_built is not None:
            wait_ready("kueue", state, lambda: kueue_ready(state))
    except BaseException:
        log("startup failed; stopping what was started (logs kept under logs/)")
        cluster_down(paths, keep_logs=True)
        raise
    state.ready = True
    state.save(paths.state)
    log(f"up in {time.monotonic() - started:.1f}s: {apiserver} (export KUBECONFIG={paths.kubeconfig})")
    return state


# Processes that can be restarted alone; the others hold the cluster's data.
RESTARTABLE = {"kube-controller-manager", "kube-scheduler", "minio", "registry", "kueue", "containerd", "kubelet",
               "kube-proxy", "coredns", "provisioner"}


def repair(paths: Paths, state: State) -> bool:
    """Restart dead processes of a running cluster in place. False: it needs a fresh start."""
    dead = [p for p in state.processes if not p.alive()]
    if not state.ready or any(p.name not in RESTARTABLE for p in dead):
        return False
    for record in dead:
        log(f"restarting {record.name}")
        state.processes.remove(record)
        start_process(record.name, record.args, paths, state, record.env, append_log=True)
    if any(p.name == "kubelet" for p in dead):
        _advertise_gpus(paths, state)
    wait_ready("kubelet", state, lambda: node_ready(state, paths.pki))
    if any(p.name == "kueue" for p in state.processes):
        wait_ready("kueue", state, lambda: kueue_ready(state))
    log(f"up: {state.apiserver}")
    return True


def _kubectl(state: State, *args: str, input: str | None = None) -> str:
    env = {**os.environ, "KUBECONFIG": state.kubeconfig, "KUBECACHEDIR": state.kubectl_cache}
    return subprocess.run([state.kubectl, *args], input=input, text=True, env=env, check=True,
                          capture_output=True, timeout=60).stdout


def _node_objects(state: State) -> list[dict[str, Any]]:
    """What the real node needs in the API: RBAC for the apiserver's kubelet client and CoreDNS,
    and the `kube-dns` Service (fixed IP, no selector) with an EndpointSlice at CoreDNS on the
    node address."""
    rbac = "rbac.authorization.k8s.io"
    ports = [{"name": "dns", "protocol": "UDP", "port": 53}, {"name": "dns-tcp", "protocol": "TCP", "port": 53}]
    return [
        # What `kubectl logs/exec` needs: the apiserver's kubelet client may use the kubelet API.
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "local-cluster:kube-apiserver-kubelet-client"},
         "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "system:kubelet-api-admin"},
         "subjects": [{"apiGroup": rbac, "kind": "User", "name": "kube-apiserver-kubelet-client"}]},
        # CoreDNS's kubernetes plugin (its upstream ClusterRole). kube-proxy (user system:kube-proxy)
        # is bound to system:node-proxier by the apiserver's bootstrap policy already.
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"apiGroup": rbac, "kind": "User", "name": "system:coredns"}]},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
         "spec": {"clusterIP": DNS_SERVICE_IP, "ports": [{**p, "targetPort": 53} for p in ports]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "kube-dns-node", "namespace": "kube-system", "labels": {
             "kubernetes.io/service-name": "kube-dns",
             "endpointslice.kubernetes.io/managed-by": "kubetune-cluster"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [state.node_ip], "conditions": {"ready": True}, "nodeName": state.node}],
         "ports": ports},
    ]


def _start_real_node(binaries: Binaries, paths: Paths, state: State) -> None:
    """containerd (with the pause image imported), the kubelet registering `state.node`, kube-proxy
    and CoreDNS."""
    node = real_node.NodePaths(paths.data / "node")
    address = state.node_ip
    pki = paths.pki
    real_node.check_dns_port(address)
    ensure_cert(pki, "kubelet-serving", subject_name(f"system:node:{state.node}", "system:nodes"),
                server_names=[address, state.node])
    ensure_cert(pki, f"node-{state.node}", subject_name(f"system:node:{state.node}", "system:nodes"), client=True)
    ensure_cert(pki, "kube-proxy", subject_name("system:kube-proxy"), client=True)
    ensure_cert(pki, "coredns", subject_name("system:coredns"), client=True)
    real_node.write_config(node, pki, address, state.ports["kubelet"], state.ports["kubelet-healthz"], state.registry,
                           SERVICE_CIDR, DNS_SERVICE_IP)
    node.kube_proxy_config.write_text(json.dumps(real_node.kube_proxy_config(
        node, state.node, address, state.ports["kube-proxy-healthz"], state.ports["kube-proxy-metrics"]), indent=2)
        + "\n")
    node.corefile.write_text(real_node.corefile(node, address, state.ports["coredns-health"],
                                                state.ports["coredns-ready"]))
    for path, client in ((node.kubelet_kubeconfig, f"node-{state.node}"), (node.kube_proxy_kubeconfig, "kube-proxy"),
                         (node.coredns_kubeconfig, "coredns")):
        path.write_text(kubeconfig_text(state.apiserver, pki, client))
        path.chmod(0o600)
    real_node.save_machine_state(node)
    real_node.enable_bridge_netfilter()
    pause = real_node.pause_archive(tools.cache_root())
    env = real_node.process_env()
    start_process("containerd", real_node.containerd_args(node), paths, state, env=env)
    wait_ready("containerd", state, functools.partial(real_node.containerd_ready, node), timeout=60)
    real_node.import_image(node, pause)
    _kubectl(state, "apply", "--server-side", "--field-manager=kubetune-cluster", "-f", "-",
             input="\n".join(json.dumps(o) for o in _node_objects(state)))
    start_process("kubelet", real_node.kubelet_args(binaries.kubelet, node, state.node, address), paths, state,
                  env=env)
    start_process("kube-proxy", real_node.kube_proxy_args(binaries.kube_proxy, node, state.node), paths, state,
                  env=env)
    start_process("coredns", real_node.coredns_args(binaries.coredns, node), paths, state)
    # PersistentVolumes for claims of the default StorageClass (hostPath on this node's disk).
    start_process("provisioner", [sys.executable, "-m", "devcluster.provisioner", f"--kubeconfig={paths.kubeconfig}",
                                  f"--pv-dir={paths.pvs}"], paths, state,
                  env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})


def _advertise_gpus(paths: Paths, state: State) -> None:
    """The real node's `nvidia.com/gpu` capacity is a stand-in: advertised as an extended resource
    (PATCH of the node's status, as Kubernetes documents it), not counted by a device plugin."""
    wait_ready("kubelet", state, lambda: api_get(state, paths.pki, f"/api/v1/nodes/{state.node}") is not None)
    patch = [{"op": "add", "path": f"/status/{field}/nvidia.com~1gpu", "value": str(state.gpus)}
             for field in ("capacity", "allocatable")]
    _kubectl(state, "patch", "node", state.node, "--subresource=status", "--type=json", "-p", json.dumps(patch))


# --------------------------------------------------------------------------------------------
# Kueue


def _mounts_below(root: Path) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mountpoint = line.split()[1].replace("\\040", " ")
        if mountpoint == str(root) or mountpoint.startswith(f"{root}/"):
            mounts.append(mountpoint)
    return sorted(mounts, key=len, reverse=True)


def cluster_down(paths: Paths, keep_logs: bool = True, grace_s: float = 10.0) -> None:
    """Stop every process of the cluster, unmount its volumes and delete its data."""
    state = State.load(paths.state)
    records = [p for p in (state.processes if state else []) if p.alive()]
    node = real_node.NodePaths(paths.data / "node")
    if node.root.exists():
        # A real node: the kubelet first (so it restarts nothing), then its containers, which run
        # outside the process groups (containerd's shims), then the rest as below.
        for record in records:
            if record.name == "kubelet":
                signal_group(record.pid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    poll_until(functools.partial(exited, record), grace_s, "kubelet to stop")
                if record.alive():
                    signal_group(record.pid, signal.SIGKILL)
        node_cleanup.stop_pods(node)
    # The storage last.
    for record in reversed(records):
        signal_group(record.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        poll_until(lambda: not any(r.alive() for r in records), grace_s, "cluster processes to stop")
    for record in records:
        if record.alive():
            signal_group(record.pid, signal.SIGKILL)
    # Anything still carrying the marker: stray children.
    for pid in marked_processes(paths.root):
        signal_group(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        poll_until(lambda: not marked_processes(paths.root), grace_s, "marked processes to exit")
    for mountpoint in _mounts_below(paths.root):
        subprocess.run(["umount", "-l", mountpoint], check=False, stderr=subprocess.DEVNULL)
    if node.root.exists():
        node_cleanup.cleanup(node, kube_proxy=build_dir() / "kube-proxy")
    shutil.rmtree(paths.data, ignore_errors=True)
    shutil.rmtree(paths.pvs, ignore_errors=True)
    paths.state.unlink(missing_ok=True)
    paths.minio_env.unlink(missing_ok=True)
    if not keep_logs:
        shutil.rmtree(paths.logs, ignore_errors=True)
    if records or state:
        log("down")


def cluster_status(paths: Paths) -> dict[str, Any]:
    state = State.load(paths.state)
    if state is None:
        return {"up": False, "dir": str(paths.root)}
    processes = {p.name: {"pid": p.pid, "alive": p.alive()} for p in state.processes}
    up = state.ready and all(p["alive"] for p in processes.values())
    return {"up": up, **asdict(state), "processes": processes}


def stop_service(paths: Paths, name: str, grace_s: float = 10.0) -> None:
    """Stop one process of the cluster (fault injection: `stop minio`); `start_service` brings it back."""
    state = State.load(paths.state)
    record = next((p for p in (state.processes if state else []) if p.name == name), None)
    if record is None:
        raise RuntimeError(f"no cluster process named {name}")
    signal_group(record.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        poll_until(functools.partial(exited, record), grace_s, f"{name} to stop")
    if record.alive():
        signal_group(record.pid, signal.SIGKILL)
        poll_until(functools.partial(exited, record), grace_s, f"{name} to be killed")


def start_service(paths: Paths, name: str) -> None:
    """Start a stopped process of the cluster again, with its recorded arguments and environment."""
    state = State.load(paths.state)
    record = next((p for p in (state.processes if state else []) if p.name == name), None)
    if state is None or record is None:
        raise RuntimeError(f"no cluster process named {name}")
    if record.alive():
        return
    state.processes.remove(record)
    start_process(name, record.args, paths, state, env=record.env, append_log=True)
