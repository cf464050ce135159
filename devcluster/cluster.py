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

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import functools
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devcluster import HACK, REPO, real_node, tools

DEFAULT_DIR = REPO / ".kubetune"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
DNS_SERVICE_IP = "10.0.0.10"  # the real node's `kube-dns` Service (CoreDNS)
NODE_NAME = "kubetune-local"
CLUSTER_NAME = "kubetune-local"
# Every process `up` starts carries this variable set to the cluster directory, so `down` finds
# stragglers even when the state file is incomplete.
MARKER_ENV = "KUBETUNE_LOCAL_CLUSTER"
READY_TIMEOUT_S = 120.0


def log(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


# --------------------------------------------------------------------------------------------
# Paths, binaries, ports


@dataclass(frozen=True)
class Paths:
    """Fixed places of one cluster instance below its directory."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def state(self) -> Path:
        return self.root / "cluster.json"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def minio_env(self) -> Path:
        return self.root / "minio.env"

    @property
    def data(self) -> Path:
        """Everything that belongs to one running cluster and goes away with `down`."""
        return self.root / "data"

    @property
    def pvs(self) -> Path:
        return self.root / "pvs"


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    minio: Path
    helm: Path
    kubectl_override: Path | None
    kubelet: Path
    registry: Path
    kube_proxy: Path
    coredns: Path


def read_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for line in (HACK / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key] = value
    return versions


def build_dir() -> Path:
    """Where hack/build-binaries.sh puts the binaries for the pinned versions."""
    v = read_versions()
    cache = tools.cache_root()
    minio_rev = v["MINIO_VERSION"].rsplit("-", 1)[-1]
    return cache / "bin" / f"k8s-{v['KUBERNETES_VERSION']}-etcd-{v['ETCD_VERSION']}-minio-{minio_rev}"


def helm_path() -> Path:
    """Where hack/build-binaries.sh puts helm for the pinned version."""
    return tools.cache_root() / "bin" / f"helm-{read_versions()['HELM_VERSION']}" / "helm"


def registry_path() -> Path:
    """Where hack/build-binaries.sh puts the distribution registry for the pinned version."""
    return tools.cache_root() / "bin" / f"registry-{read_versions()['REGISTRY_VERSION']}" / "registry"


def coredns_path() -> Path:
    """Where hack/build-binaries.sh puts CoreDNS (the real node's cluster DNS) for the pinned version."""
    path: Path = tools.cache_root() / "bin" / f"coredns-{read_versions()['COREDNS_VERSION']}" / "coredns"
    return path


def registry_storage() -> Path:
    """The loopback registry's blobs and manifests: kept across clusters, so a push sends only new layers."""
    return tools.cache_root() / "registry"


def find_binaries() -> Binaries:
    """Locate the binaries, building the missing ones (slow once, cached afterwards)."""
    built = build_dir()
    assets_env = os.environ.get("KUBEBUILDER_ASSETS")
    assets = Path(assets_env) if assets_env else None

    def pick(name: str) -> Path:
        if assets is not None and (assets / name).is_file():
            return assets / name
        return built / name

    names = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "minio", "kubelet", "kube-proxy"]
    extra = [helm_path(), registry_path(), coredns_path()]
    if not all(pick(name).is_file() for name in names) or not all(path.is_file() for path in extra):
        log(f"building binaries into {built} (hack/build-binaries.sh)")
        subprocess.run(["bash", str(HACK / "build-binaries.sh")], check=True, stdout=subprocess.DEVNULL)
    kubectl = assets / "kubectl" if assets is not None and (assets / "kubectl").is_file() else None
    return Binaries(
        etcd=pick("etcd"),
        kube_apiserver=pick("kube-apiserver"),
        kube_controller_manager=pick("kube-controller-manager"),
        kube_scheduler=pick("kube-scheduler"),
        minio=pick("minio"),
        helm=helm_path(),
        kubectl_override=kubectl,
        kubelet=pick("kubelet"),
        registry=registry_path(),
        kube_proxy=pick("kube-proxy"),
        coredns=coredns_path(),
    )


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# --------------------------------------------------------------------------------------------
# Certificates


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _issue(
    pki: Path,
    stem: str,
    subject: x509.Name,
    *,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    server_names: list[str] | None = None,
    client: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    issuer_name, signing_key = (ca[0].subject, ca[1]) if ca else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650 if ca is None else 365))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            alt: list[x509.GeneralName] = []
            for name in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    alt.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
    cert = builder.sign(signing_key, hashes.SHA256())
    (pki / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki / f"{stem}.key", key)
    return cert, key


# Client identities: file stem → (common name, organization).
CLIENTS = {
    "admin": ("kubetune-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
}
APISERVER_NAMES = [
    "127.0.0.1", "localhost", SERVICE_IP, "kubernetes", "kubernetes.default",
    "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
]


def ensure_pki(pki: Path) -> None:
    """CA, apiserver serving cert, client certs and the service-account key pair (kept across ups)."""
    wanted = ["ca.crt", "apiserver.crt", "sa.key", "sa.pub", *(f"{c}.crt" for c in CLIENTS)]
    if all((pki / name).is_file() for name in wanted):
        return
    log("generating certificates")
    shutil.rmtree(pki, ignore_errors=True)
    pki.mkdir(parents=True)
    ca = _issue(pki, "ca", _name("kubetune-local-ca"), ca=None)
    _issue(pki, "apiserver", _name("kube-apiserver"), ca=ca, server_names=APISERVER_NAMES)
    for stem, (cn, org) in CLIENTS.items():
        _issue(pki, stem, _name(cn, org), ca=ca, client=True)
    sa_key = ec.generate_private_key(ec.SECP256R1())
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def kubeconfig_text(server: str, pki: Path, client: str) -> str:
    """A self-contained kubeconfig (certificates embedded) as JSON, which is valid YAML."""

    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": {
            "server": server, "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": client, "user": {
            "client-certificate-data": b64(f"{client}.crt"), "client-key-data": b64(f"{client}.key")}}],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": client}}],
        "current-context": CLUSTER_NAME,
        "preferences": {},
    }
    return json.dumps(config, indent=2) + "\n"


# --------------------------------------------------------------------------------------------
# Processes and state


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid from ours
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # extra environment, to restart it alike

    def alive(self) -> bool:
        return process_start_ticks(self.pid) == self.start_ticks


@dataclass
class State:
    dir: str
    processes: list[ProcessRecord] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    ready: bool = False
    apiserver: str = ""
    kubeconfig: str = ""
    kubectl: str = ""
    helm: str = ""
    node: str = NODE_NAME
    minio_endpoint: str = ""
    kubectl_cache: str = ""  # KUBECACHEDIR for this cluster: no stale discovery from an earlier one
    gpus: int = 0  # nvidia.com/gpu capacity of the node
    registry: str = ""  # host:port of the loopback image registry (plain HTTP)
    node_ip: str = ""  # the node's address: pods reach the apiserver and MinIO there

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.chmod(0o600)  # holds MinIO's credentials
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> State | None:
        try:
            raw = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        raw["processes"] = [ProcessRecord(**p) for p in raw.get("processes", [])]
        return cls(**raw)


def process_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is gone for our purposes
        return None
    return int(fields[19])


def start_process(
    name: str, args: list[str], paths: Paths, state: State, env: dict[str, str] | None = None,
    append_log: bool = False,
) -> ProcessRecord:
    """Start a detached process (own session and process group) logging to logs/<name>.log."""
    full_env = {**os.environ, **(env or {}), MARKER_ENV: str(paths.root)}
    with (paths.logs / f"{name}.log").open("ab" if append_log else "wb") as logfile:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            start_new_session=True, env=full_env, cwd=paths.root,
        )
    record = ProcessRecord(name=name, pid=proc.pid, start_ticks=process_start_ticks(proc.pid) or 0, args=args,
                           env=env or {})
    state.processes.append(record)
    state.save(paths.state)
    return record


def marked_processes(root: Path) -> list[int]:
    """Pids of live processes whose environment carries this cluster's marker."""
    marker = f"{MARKER_ENV}={root}".encode()
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            environ = (proc_dir / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and process_start_ticks(int(proc_dir.name)) is not None:
            pids.append(int(proc_dir.name))
    return pids


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def poll_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Readiness probes


def _https_context(pki: Path, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


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
    ensure_cert(paths.pki, "apiserver", _name("kube-apiserver"), server_names=[*APISERVER_NAMES, node_address])
    ensure_cert(paths.pki, "kubelet-client", _name("kube-apiserver-kubelet-client"), client=True)
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
        _start_etcd(binaries, paths, state)
        _start_minio(binaries, paths, state, minio_user, minio_password)
        _start_registry(binaries, paths, state)
        wait_ready("etcd", state, lambda: http_ok(f"http://127.0.0.1:{ports['etcd']}/health"))
        _start_apiserver(binaries, paths, state)
        wait_ready("kube-apiserver", state, lambda: http_ok(apiserver + "/readyz", _https_context(paths.pki)))
        _start_controllers(binaries, paths, state)
        _start_real_node(binaries, paths, state)
        if kueue_built is not None:  # while the controllers and the node start
            install_kueue(kueue_built, paths, state)
            _start_kueue(kueue_built, paths, state)
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


def _start_etcd(binaries: Binaries, paths: Paths, state: State) -> None:
    client, peer = f"http://127.0.0.1:{state.ports['etcd']}", f"http://127.0.0.1:{state.ports['etcd-peer']}"
    start_process("etcd", [
        str(binaries.etcd), "--name=default", f"--data-dir={paths.data / 'etcd'}",
        f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}", "--initial-cluster-state=new",
        # A throwaway test cluster: durability is not worth the fsync latency.
        "--unsafe-no-fsync", "--log-level=warn",
    ], paths, state)


def _start_minio(binaries: Binaries, paths: Paths, state: State, user: str, password: str) -> None:
    # Pods on the node's pod network reach MinIO at the node's own address: listen there too.
    start_process("minio", [
        str(binaries.minio), "server", str(paths.data / "minio"), "--quiet",
        f"--address=:{state.ports['minio']}",
        f"--console-address=127.0.0.1:{state.ports['minio-console']}",
    ], paths, state, env={
        "MINIO_ROOT_USER": user, "MINIO_ROOT_PASSWORD": password, "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off", "HOME": str(paths.data / "minio-home"),
    })


def registry_config(state: State, storage: Path) -> dict[str, Any]:
    """The distribution registry's configuration: plain HTTP on loopback, blobs on disk."""
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": state.registry},
    }


def _start_registry(binaries: Binaries, paths: Paths, state: State) -> None:
    """The image registry on loopback (plain HTTP): `make images` pushes there, the real node pulls."""
    storage = registry_storage()
    storage.mkdir(parents=True, exist_ok=True)
    config = paths.data / "registry.yaml"
    config.write_text(json.dumps(registry_config(state, storage), indent=2) + "\n")  # JSON is YAML
    start_process("registry", [str(binaries.registry), "serve", str(config)], paths, state,
                  env={"OTEL_TRACES_EXPORTER": "none"})


def _start_apiserver(binaries: Binaries, paths: Paths, state: State) -> None:
    pki = paths.pki
    # Pods reach the apiserver through the `kubernetes` Service (kube-proxy), whose endpoint the lease
    # reconciler (the default) keeps at the node address. It serves there and on loopback (all
    # addresses: the kubeconfigs keep 127.0.0.1).
    serving = ["--bind-address=0.0.0.0", f"--advertise-address={state.node_ip}"]
    start_process("kube-apiserver", [
        str(binaries.kube_apiserver),
        f"--etcd-servers=http://127.0.0.1:{state.ports['etcd']}",
        *serving,
        f"--secure-port={state.ports['apiserver']}",
        f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--authorization-mode=Node,RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # The defaults (NamespaceLifecycle, LimitRanger, ServiceAccount, PodSecurity, Priority,
        # DefaultStorageClass, ResourceQuota, webhooks, ...) plus NodeRestriction, as kubeadm does.
        # OwnerReferencesPermissionEnforcement is on in OpenShift: children with blockOwnerDeletion
        # need update on finetunejobs/finalizers, which the chart's RBAC must grant.
        "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
        "--allow-privileged=true",
        # `kubectl logs` and `exec` reach the kubelet on the node's InternalIP.
        "--kubelet-preferred-address-types=InternalIP",
        # logs/exec/port-forward: the apiserver authenticates to the kubelet with its own client
        # certificate (allowed by RBAC: ClusterRole system:kubelet-api-admin).
        f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'kubelet-client.key'}",
        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
        "--profiling=false", "--event-ttl=1h",
    ], paths, state)


def _start_controllers(binaries: Binaries, paths: Paths, state: State) -> None:
    pki = paths.pki
    serving = [f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}"]
    cm_kubeconfig = str(pki / "controller-manager.kubeconfig")
    start_process("kube-controller-manager", [
        str(binaries.kube_controller_manager),
        f"--kubeconfig={cm_kubeconfig}", f"--authentication-kubeconfig={cm_kubeconfig}",
        f"--authorization-kubeconfig={cm_kubeconfig}",
        "--leader-elect=false", "--bind-address=127.0.0.1",
        f"--secure-port={state.ports['controller-manager']}", *serving,
        f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
        "--use-service-account-credentials=true",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}", f"--cluster-name={CLUSTER_NAME}",
        "--profiling=false",
    ], paths, state)
    sched_kubeconfig = str(pki / "scheduler.kubeconfig")
    start_process("kube-scheduler", [
        str(binaries.kube_scheduler),
        f"--kubeconfig={sched_kubeconfig}", f"--authentication-kubeconfig={sched_kubeconfig}",
        f"--authorization-kubeconfig={sched_kubeconfig}",
        "--leader-elect=false", "--bind-address=127.0.0.1",
        f"--secure-port={state.ports['scheduler']}", *serving, "--profiling=false",
    ], paths, state)


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
    ensure_cert(pki, "kubelet-serving", _name(f"system:node:{state.node}", "system:nodes"),
                server_names=[address, state.node])
    ensure_cert(pki, f"node-{state.node}", _name(f"system:node:{state.node}", "system:nodes"), client=True)
    ensure_cert(pki, "kube-proxy", _name("system:kube-proxy"), client=True)
    ensure_cert(pki, "coredns", _name("system:coredns"), client=True)
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

KUEUE_MODULE = "sigs.k8s.io/kueue"
KUEUE_NAMESPACE = "kueue-system"
# Only what FineTuneJobs use: Kueue's own kinds and batch/v1 Jobs. The webhooks of integrations that
# are not enabled (pods, Deployments, other job kinds) are left out, so creating those objects never
# depends on Kueue being up.
KUEUE_FRAMEWORKS = ["batch/job"]
KUEUE_WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}
KUEUE_METRICS_CERTS = Path("/etc/kueue/metrics/certs")  # fixed in Kueue's cmd/kueue/main.go


def kueue_from_env() -> bool:
    """Kueue is part of the cluster unless KUBETUNE_KUEUE says 0/false/no."""
    return os.environ.get("KUBETUNE_KUEUE", "1").strip().lower() not in {"0", "false", "no", "off"}


def kueue_version() -> str:
    for line in (HACK / "kueue" / "go.mod").read_text().splitlines():
        words = line.split()
        if words[:2] == ["require", KUEUE_MODULE]:
            return words[2]
    raise RuntimeError(f"no 'require {KUEUE_MODULE}' in hack/kueue/go.mod")


def find_kueue() -> Path:
    """The directory hack/build-kueue.sh fills (binary, CRDs, webhook manifests), built if missing."""
    built: Path = tools.cache_root() / "bin" / f"kueue-{kueue_version()}"
    if not all((built / name).exists() for name in ("kueue", "crd", "webhooks.yaml")):
        log(f"building Kueue into {built} (hack/build-kueue.sh)")
        subprocess.run(["bash", str(HACK / "build-kueue.sh")], check=True, stdout=subprocess.DEVNULL)
    return built


def ensure_serving_cert(pki: Path, stem: str, names: list[str]) -> None:
    """A serving certificate signed by the cluster's CA (kept across ups, like the others)."""
    ensure_cert(pki, stem, _name(stem), server_names=names)


def _cert_names(path: Path) -> set[str]:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    return {str(name.value) for name in alt}


def ensure_cert(pki: Path, stem: str, subject: x509.Name, *, server_names: list[str] | None = None,
                client: bool = False) -> None:
    """A certificate signed by the cluster's CA, kept across ups unless its server names changed."""
    crt, key = pki / f"{stem}.crt", pki / f"{stem}.key"
    if crt.is_file() and key.is_file() and (not server_names or _cert_names(crt) == set(server_names)):
        return
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    _issue(pki, stem, subject, ca=(ca_cert, ca_key), server_names=server_names, client=client)


def kueue_manifests(built: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's CRDs and webhook configurations, pointed at its webhook server on loopback.

    The CRDs whose conversion Kueue's kustomization routes through its webhook (those with a
    `patches/webhook_in_*` entry) get the same conversion, by URL; of the webhook configurations
    only those for KUEUE_WEBHOOK_GROUPS are kept."""
    crd_dir = built / "crd"
    kustomization = yaml.load((crd_dir / "kustomization.yaml").read_text(), Loader=yaml.CSafeLoader)
    converted = set()
    for patch in kustomization.get("patches") or []:
        doc = yaml.load((crd_dir / patch["path"]).read_text(), Loader=yaml.CSafeLoader)
        if (doc.get("spec") or {}).get("conversion", {}).get("strategy") == "Webhook":
            converted.add(doc["metadata"]["name"])
    documents: list[dict[str, Any]] = []
    for path in sorted((crd_dir / "bases").glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        if crd["metadata"]["name"] in converted:
            crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                "clientConfig": {"url": f"{url}/convert", "caBundle": ca_bundle},
                "conversionReviewVersions": ["v1"]}}
        documents.append(crd)
    for config in yaml.load_all((built / "webhooks.yaml").read_text(), Loader=yaml.CSafeLoader):
        if not config:
            continue
        hooks = []
        for hook in config["webhooks"]:
            if not {group for rule in hook["rules"] for group in rule["apiGroups"]} <= KUEUE_WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hooks.append({**hook, "clientConfig": {"url": url + path, "caBundle": ca_bundle}})
        config["metadata"]["name"] = f"kueue-{config['metadata']['name']}"
        documents.append({**config, "webhooks": hooks})
    return documents


def kueue_config(state: State, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration for the local cluster: loopback ports, its certificate from our CA (no
    internal cert management), no leader election, the batch/v1 Job integration, only jobs that
    name a queue managed, no visibility API server (an aggregated API on a fixed port)."""
    ports = state.ports
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['kueue-health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['kueue-metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["kueue-webhook"], "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": KUEUE_FRAMEWORKS},
        "featureGates": {"VisibilityOnDemand": False},
        "clientConnection": {"qps": 50, "burst": 100},
    }


def install_kueue(built: Path, paths: Paths, state: State) -> None:
    """Kueue's CRDs (Established) and webhook configurations, server-side applied."""
    url = f"https://127.0.0.1:{state.ports['kueue-webhook']}"
    ca_bundle = base64.b64encode((paths.pki / "ca.crt").read_bytes()).decode()
    manifests = kueue_manifests(built, url, ca_bundle)
    env = {**os.environ, "KUBECONFIG": state.kubeconfig, "KUBECACHEDIR": state.kubectl_cache}
    text = "\n".join(json.dumps(doc) for doc in manifests)  # a stream of JSON objects
    subprocess.run([state.kubectl, "apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-cluster",
                    "-f", "-"], input=text, text=True, env=env, check=True, capture_output=True)
    crds = [f"crd/{doc['metadata']['name']}" for doc in manifests if doc["kind"] == "CustomResourceDefinition"]
    subprocess.run([state.kubectl, "wait", "--for=condition=Established", "--timeout=60s", *crds],
                   env=env, check=True, capture_output=True)


def _start_kueue(built: Path, paths: Paths, state: State) -> None:
    home = paths.data / "kueue"
    cert_dir = home / "certs"
    cert_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths.pki / "kueue.crt", cert_dir / "tls.crt")
    shutil.copyfile(paths.pki / "kueue.key", cert_dir / "tls.key")
    config = home / "config.yaml"
    config.write_text(json.dumps(kueue_config(state, cert_dir), indent=2) + "\n")
    # Kueue (v0.17) reads its metrics serving certificate from a fixed path when it does not manage
    # certificates itself: it gets ours there, bind-mounted in a private mount namespace, over an
    # empty directory created once on this machine.
    KUEUE_METRICS_CERTS.mkdir(parents=True, exist_ok=True)
    mount_then_run = 'mount --bind "$0" "$1" && shift && exec "$@"'
    # Admin credentials: Kueue's own RBAC (config/components/rbac) is not installed here.
    start_process("kueue", [
        "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount_then_run,
        str(cert_dir), str(KUEUE_METRICS_CERTS), str(built / "kueue"), f"--config={config}",
    ], paths, state, env={"KUBECONFIG": str(paths.kubeconfig)})


def kueue_ready(state: State) -> bool:
    return http_ok(f"http://127.0.0.1:{state.ports['kueue-health']}/readyz")


def _mounts_below(root: Path) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mountpoint = line.split()[1].replace("\\040", " ")
        if mountpoint == str(root) or mountpoint.startswith(f"{root}/"):
            mounts.append(mountpoint)
    return sorted(mounts, key=len, reverse=True)


def _exited(record: ProcessRecord) -> bool:
    return not record.alive()


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
                _signal_group(record.pid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    poll_until(functools.partial(_exited, record), grace_s, "kubelet to stop")
                if record.alive():
                    _signal_group(record.pid, signal.SIGKILL)
        real_node.stop_pods(node)
    # The storage last.
    for record in reversed(records):
        _signal_group(record.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        poll_until(lambda: not any(r.alive() for r in records), grace_s, "cluster processes to stop")
    for record in records:
        if record.alive():
            _signal_group(record.pid, signal.SIGKILL)
    # Anything still carrying the marker: stray children.
    for pid in marked_processes(paths.root):
        _signal_group(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        poll_until(lambda: not marked_processes(paths.root), grace_s, "marked processes to exit")
    for mountpoint in _mounts_below(paths.root):
        subprocess.run(["umount", "-l", mountpoint], check=False, stderr=subprocess.DEVNULL)
    if node.root.exists():
        real_node.cleanup(node, kube_proxy=build_dir() / "kube-proxy")
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
    _signal_group(record.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        poll_until(functools.partial(_exited, record), grace_s, f"{name} to stop")
    if record.alive():
        _signal_group(record.pid, signal.SIGKILL)
        poll_until(functools.partial(_exited, record), grace_s, f"{name} to be killed")


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


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Serialize up/down of one cluster directory (parallel test sessions may race)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "stop", "start"])
    parser.add_argument("service", nargs="?", help="stop/start: one process of the cluster (e.g. minio)")
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("KUBETUNE_CLUSTER_DIR", DEFAULT_DIR)),
                        help="state directory of this cluster instance (default: .kubetune/)")
    parser.add_argument("--gpus", type=int, default=int(os.environ.get("KUBETUNE_NODE_GPUS", "2")),
                        help="nvidia.com/gpu capacity of the local node (default 2)")
    parser.add_argument("--kueue", action=argparse.BooleanOptionalAction, default=kueue_from_env(),
                        help="up: start Kueue with the cluster (default: yes unless KUBETUNE_KUEUE=0)")
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    args = parser.parse_args(argv)
    paths = Paths(args.dir.resolve())

    if env_flag("USE_EXISTING_CLUSTER") and args.command != "status":
        log("USE_EXISTING_CLUSTER=true: using the current kubeconfig's cluster; nothing to start or stop")
        return 0
    if args.command in ("stop", "start"):
        if not args.service:
            parser.error(f"{args.command} needs a process name, e.g. minio")
        with exclusive(paths.root / ".lock"):
            (stop_service if args.command == "stop" else start_service)(paths, args.service)
        return 0
    if args.command in ("up", "down"):
        with exclusive(paths.root / ".lock"):
            if args.command == "down":
                cluster_down(paths)
                return 0
            try:
                cluster_up(paths, args.gpus, kueue=args.kueue)
            except (TimeoutError, RuntimeError, subprocess.CalledProcessError) as error:
                log(f"up failed: {error}")
                return 1
    else:
        status = cluster_status(paths)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            print("up" if status["up"] else "down", status.get("apiserver", ""))
            for name, proc in status.get("processes", {}).items():
                print(f"  {name:<24} pid {proc['pid']:<8} {'running' if proc['alive'] else 'exited'}")
        return 0 if status["up"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
