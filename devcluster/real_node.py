"""The local cluster's node: kubelet + containerd + a CNI bridge.

devcluster/cluster.py starts the processes (through ``processes.start_process``, so ``down`` stops
them) and calls this module for the rest: the Debian packages (hack/install-node-tools.sh), the
pause image (hack/pause, built once into the tool cache), containerd's, the kubelet's, kube-proxy's
and CoreDNS's configuration and the stand-in GPU capacity. What the kubelet, containerd and
kube-proxy leave on the machine when they stop (mounts, pod cgroups, iptables chains, the bridge,
kernel settings, log links) is devcluster/node_cleanup.py's.

Everything of one node lives below ``<cluster dir>/data/node``; the kubelet and containerd listen
on the machine's own interface address (the kubelet rejects a loopback node IP) or on sockets and
loopback. Only one real node runs on a machine at a time: pod cgroups (``/kubepods``) and the
kubelet's iptables chains are machine-wide.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from devcluster import HACK

PAUSE_IMAGE = "kubetune.local/pause:1"
POD_CIDR = "10.244.0.0/24"  # host-local range of the CNI bridge; checked against this machine's routes
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # fixed in the kubelet
SHIM_SOCKETS = Path("/run/containerd/s")  # fixed in containerd 1.6: its shims' sockets
# Kernel settings the kubelet changes (protectKernelDefaults: false), and those `up` sets for
# Service traffic between pods on the bridge (bridge-nf-call-iptables: bridged frames pass the
# host's iptables, so kube-proxy's DNAT is undone on the reply); saved before the node starts,
# restored by `down`. Not net.ipv4.ip_forward, which the bridge plugin turns on for its gateway:
# other users of the machine (podman, buildah) rely on it too, so it stays on.
SYSCTLS = (
    "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
    "net/bridge/bridge-nf-call-iptables", "net/ipv4/conf/all/route_localnet",
)
BRIDGE_NF_CALL_IPTABLES = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
CLUSTER_DOMAIN = "cluster.local"
NVIDIA_GPU = "nvidia.com/gpu"


def install_tools() -> None:
    """containerd, runc, CNI plugins, buildah, busybox-static from Debian, where missing."""
    subprocess.run(["bash", str(HACK / "install-node-tools.sh")], check=True, stdout=subprocess.DEVNULL)


def node_ip() -> str:
    """The machine's own address on its first non-loopback interface (never leaves the machine)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        words = line.split()
        if "inet" in words:
            address = words[words.index("inet") + 1].split("/")[0]
            if not ipaddress.ip_address(address).is_loopback:
                return address
    raise RuntimeError("no non-loopback IPv4 address on this machine: the kubelet needs one as node IP")


def check_pod_cidr() -> None:
    """Refuse a pod range that overlaps a route of this machine (the bridge would shadow it)."""
    pods = ipaddress.ip_network(POD_CIDR)
    out = subprocess.run(["ip", "-4", "route", "show"], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        destination = line.split()[0]
        if destination == "default":
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.ip_network(destination, strict=False).overlaps(pods):
                raise RuntimeError(f"pod range {POD_CIDR} overlaps the route '{line.strip()}' of this machine")


def other_kubelet_running() -> int | None:
    """Pid of a kubelet already running on this machine (one real node at a time)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().strip() == "kubelet":
                    return int(proc.name)
    return None


# --------------------------------------------------------------------------------------------
# Images


def buildah_image(archive: Path, name: str, files: list[tuple[Path, str]], config: list[str]) -> Path:
    """An image built ``FROM scratch`` with buildah: ``files`` (host path → path in the image),
    ``config`` (``buildah config`` flags), written as an OCI archive whose reference is ``name``.

    buildah gets its own throwaway storage (vfs driver), so it never touches the machine's."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kubetune-buildah-") as tmp:
        buildah = ["buildah", "--root", f"{tmp}/root", "--runroot", f"{tmp}/run", "--storage-driver", "vfs"]

        def run(*args: str) -> str:
            return subprocess.run([*buildah, *args], check=True, capture_output=True, text=True).stdout.strip()

        container = run("from", "--quiet", "scratch")
        for source, destination in files:
            run("copy", container, str(source), destination)
        if config:
            run("config", *config, container)
        run("commit", "--quiet", container, name)
        partial = archive.with_name(archive.name + ".tmp")
        partial.unlink(missing_ok=True)
        run("push", "--quiet", name, f"oci-archive:{partial}:{name}")
        partial.replace(archive)
    return archive


def pause_archive(cache: Path) -> Path:
    """The sandbox image: hack/pause (waits for SIGTERM) built static, once per source version."""
    source = HACK / "pause"
    digest = hashlib.sha256(b"".join((source / n).read_bytes() for n in ("go.mod", "main.go"))).hexdigest()[:12]
    archive = cache / "images" / f"pause-{digest}.tar"
    if archive.is_file():
        return archive
    with tempfile.TemporaryDirectory(prefix="kubetune-pause-") as tmp:
        binary = Path(tmp) / "pause"
        env = {**os.environ, "GOWORK": "off", "CGO_ENABLED": "0"}
        subprocess.run(["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(binary), "."], cwd=source,
                       env=env, check=True, capture_output=True)
        return buildah_image(archive, PAUSE_IMAGE, [(binary, "/pause")],
                             ["--entrypoint", '["/pause"]', "--user", "65535:65535"])


# --------------------------------------------------------------------------------------------
# The node's files


@dataclass(frozen=True)
class NodePaths:
    root: Path  # <cluster dir>/data/node

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd-state"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet.yaml"

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.root / "kubelet.kubeconfig"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy.yaml"

    @property
    def kube_proxy_kubeconfig(self) -> Path:
        return self.root / "kube-proxy.kubeconfig"

    @property
    def corefile(self) -> Path:
        return self.root / "Corefile"

    @property
    def coredns_kubeconfig(self) -> Path:
        return self.root / "coredns.kubeconfig"

    @property
    def resolv_conf(self) -> Path:
        """The kubelet's `resolvConf`: no name servers or search domains of the machine reach pods."""
        return self.root / "resolv.conf"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def machine_state(self) -> Path:
        """What the machine was like before the node started (kernel settings, log directory)."""
        return self.root / "machine.json"

    @property
    def bridge(self) -> str:
        """The CNI bridge's interface name: fixed per cluster directory, at most 15 characters."""
        return "kt" + hashlib.sha256(str(self.root).encode()).hexdigest()[:10]


def containerd_config(node: NodePaths, registry: str) -> str:
    """containerd 1.6 (config version 2): everything under the node directory, cgroupfs like the
    kubelet, OOM score adjustments within the caller's, network namespaces under its state dir."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = {json.dumps(str(node.containerd_root))}
state = {json.dumps(str(node.containerd_state))}
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = {json.dumps(str(node.socket))}

[ttrpc]
  address = {json.dumps(str(node.socket) + ".ttrpc")}

[plugins."io.containerd.internal.v1.opt"]
  path = {json.dumps(str(node.root / "opt"))}

[{cri}]
  sandbox_image = {json.dumps(PAUSE_IMAGE)}
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = {json.dumps(str(node.root / "runc"))}

# The loopback registry (`make cluster-up` starts it) speaks plain HTTP.
[{cri}.registry.mirrors.{json.dumps(registry)}]
  endpoint = [{json.dumps("http://" + registry)}]

[{cri}.cni]
  bin_dir = {json.dumps(str(CNI_BIN_DIR))}
  conf_dir = {json.dumps(str(node.cni_conf_dir))}
  max_conf_num = 1
"""


def cni_conflist(node: NodePaths, address: str, service_cidr: str) -> dict[str, object]:
    """A bridge with host-local addresses: no default route and no masquerading out of the machine.
    Routes through the bridge's gateway (this machine) to the Service range (kube-proxy's DNAT
    happens there) and to the node address (MinIO, the apiserver, CoreDNS listen there)."""
    return {
        "cniVersion": "1.0.0",
        "name": "kubetune",
        "plugins": [
            {"type": "bridge", "bridge": node.bridge, "isGateway": True, "isDefaultGateway": False,
             "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                      "routes": [{"dst": service_cidr}, {"dst": f"{address}/32"}],
                      "dataDir": str(node.root / "cni" / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(node: NodePaths, pki: Path, address: str, port: int, healthz_port: int,
                   dns_ip: str) -> dict[str, object]:
    endpoint = f"unix://{node.socket}"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # Serving: on the node address only; clients need a certificate from the cluster CA (the
        # apiserver's kubelet client) or a token the apiserver confirms; no anonymous access.
        "address": address, "port": port, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
        "tlsCertFile": str(pki / "kubelet-serving.crt"), "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        # containerd 1.6 does not report its cgroup driver: both use cgroupfs.
        "cgroupDriver": "cgroupfs",
        # This machine mounts cgroup v1 controllers (with a v2 hierarchy beside them) and may swap.
        "failCgroupV1": False, "failSwapOn": False,
        "containerRuntimeEndpoint": endpoint, "imageServiceEndpoint": endpoint,
        "podLogsDir": str(node.pod_logs),
        # Cluster DNS: CoreDNS behind the kube-dns Service; the pods' search list is the cluster's only.
        "clusterDNS": [dns_ip], "clusterDomain": CLUSTER_DOMAIN, "resolvConf": str(node.resolv_conf),
        "volumePluginDir": str(node.root / "volume-plugins"),
        # Images are imported, never pulled; nothing here should delete them.
        "imageGCHighThresholdPercent": 100,
        # Absolute disk thresholds instead of the default percentages: the disk is shared with
        # other work and its file system reports far more size than the space it can hand out,
        # so "less than 10% available" holds on a healthy machine and would evict every pod.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1Gi", "imagefs.available": "1Gi",
                         "nodefs.inodesFree": "5%", "imagefs.inodesFree": "5%"},
    }


def kube_proxy_config(node: NodePaths, name: str, address: str, healthz_port: int,
                      metrics_port: int) -> dict[str, object]:
    """kube-proxy in iptables mode. It changes no conntrack settings (the zeros: leave the kernel's)
    and no route_localnet (no NodePorts on 127.0.0.1); its health and metrics on free loopback ports."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(node.kube_proxy_kubeconfig)},
        "mode": "iptables",
        "hostnameOverride": name,
        "bindAddress": address,
        "clusterCIDR": POD_CIDR,
        "detectLocalMode": "ClusterCIDR",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "nodePortAddresses": [f"{address}/32"],
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s",
                      "udpTimeout": "0s", "udpStreamTimeout": "0s"},
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "syncPeriod": "30s",
                     "minSyncPeriod": "0s"},
    }


def kube_proxy_args(kube_proxy: Path, node: NodePaths, name: str) -> list[str]:
    return [str(kube_proxy), f"--config={node.kube_proxy_config}", f"--hostname-override={name}",
            f"--cluster-cidr={POD_CIDR}"]


def corefile(node: NodePaths, address: str, health_port: int, ready_port: int) -> str:
    """CoreDNS on the node address, port 53: the cluster's zone from the apiserver (kubernetes
    plugin), reverse lookups of Service and pod addresses; NXDOMAIN for every other name (nothing
    is forwarded: no traffic leaves the machine)."""
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {address}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {node.coredns_kubeconfig}
        pods insecure
        ttl 5
    }}
    cache 5
    loadbalance
}}

.:53 {{
    bind {address}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


def coredns_args(coredns: Path, node: NodePaths) -> list[str]:
    return [str(coredns), "-conf", str(node.corefile)]


def check_dns_port(address: str) -> None:
    """CoreDNS needs port 53 (UDP and TCP) on the node address: refuse if something holds it."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((address, 53))
            except OSError as error:
                protocol = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
                raise RuntimeError(f"port 53/{protocol} on {address} is taken ({error}): CoreDNS needs it") from None


def enable_bridge_netfilter() -> None:
    """Bridged frames (pod to pod on the bridge) through the host's iptables, so the reply of a pod
    reached through a Service IP is un-DNATed (kube-proxy warns without it). Saved and restored
    with the other kernel settings."""
    if not BRIDGE_NF_CALL_IPTABLES.exists():
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    if not BRIDGE_NF_CALL_IPTABLES.exists():
        raise RuntimeError("no net.bridge.bridge-nf-call-iptables here (module br_netfilter): Services between "
                           "pods on the bridge would not work")
    if BRIDGE_NF_CALL_IPTABLES.read_text().strip() != "1":
        BRIDGE_NF_CALL_IPTABLES.write_text("1\n")


def write_config(node: NodePaths, pki: Path, address: str, port: int, healthz_port: int, registry: str,
                 service_cidr: str, dns_ip: str) -> None:
    for directory in (node.root, node.cni_conf_dir, node.kubelet_root, node.pod_logs):
        directory.mkdir(parents=True, exist_ok=True)
    node.containerd_config.write_text(containerd_config(node, registry))
    conflist = cni_conflist(node, address, service_cidr)
    (node.cni_conf_dir / "10-kubetune.conflist").write_text(json.dumps(conflist, indent=2) + "\n")
    node.resolv_conf.write_text("# the kubelet's resolvConf: pods get the cluster DNS only\n")
    node.kubelet_config.write_text(
        json.dumps(kubelet_config(node, pki, address, port, healthz_port, dns_ip), indent=2) + "\n")


def containerd_args(node: NodePaths) -> list[str]:
    return ["containerd", f"--config={node.containerd_config}", "--log-level=warn"]


def kubelet_args(kubelet: Path, node: NodePaths, name: str, address: str) -> list[str]:
    return [
        str(kubelet), f"--config={node.kubelet_config}", f"--kubeconfig={node.kubelet_kubeconfig}",
        f"--root-dir={node.kubelet_root}", f"--cert-dir={node.root / 'kubelet-pki'}",
        f"--hostname-override={name}", f"--node-ip={address}",
        "--node-labels=nvidia.com/gpu.present=true",
    ]


def process_env() -> dict[str, str]:
    """containerd starts runc and the CNI plugins through PATH."""
    path = os.environ.get("PATH", "/usr/bin:/bin")
    extra = [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in path.split(":")]
    return {"PATH": ":".join([path, *extra])}


def ctr(node: NodePaths, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", f"--address={node.socket}", "--namespace=k8s.io", *args], check=True,
                          capture_output=True, text=True, timeout=timeout)


def containerd_ready(node: NodePaths) -> bool:
    if not node.socket.exists():
        return False
    try:
        ctr(node, "version", timeout=5)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return False
    return True


def import_image(node: NodePaths, archive: Path) -> None:
    """Make an OCI archive's image known to the kubelet (``imagePullPolicy: Never`` / IfNotPresent)."""
    ctr(node, "images", "import", str(archive))


def save_machine_state(node: NodePaths) -> None:
    if node.machine_state.exists():  # saved by an earlier start of this node: those are the originals
        return
    sysctls = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            sysctls[name] = (Path("/proc/sys") / name).read_text().strip()
    saved = {"sysctls": sysctls, "container_log_links_existed": CONTAINER_LOG_LINKS.exists(),
             "shim_sockets_existed": SHIM_SOCKETS.exists()}
    node.machine_state.write_text(json.dumps(saved, indent=2) + "\n")
