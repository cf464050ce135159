"""Stopping the real node's pods and undoing what the kubelet, containerd and kube-proxy leave on the
machine (cgroups, mounts, iptables chains, sysctls); `leftovers` lists what is left after ``down``."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from devcluster.real_node import (
    CGROUP_ROOT,
    CONTAINER_LOG_LINKS,
    SHIM_SOCKETS,
    NodePaths,
    check_dns_port,
    containerd_ready,
    ctr,
    node_ip,
    process_env,
)

# Chains the kubelet creates in the host's iptables (filter, nat, mangle) and leaves behind.
KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")
# Chains kube-proxy (iptables mode) creates; `kube-proxy --cleanup` removes them, `down` sweeps what
# is left, with the per-Service and per-endpoint chains (KUBE-SVC-…, KUBE-SEP-…, …).
KUBE_PROXY_CHAINS = (
    "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ",
    "KUBE-MARK-DROP", "KUBE-FORWARD", "KUBE-PROXY-CANARY", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL-ROUTING",
)
KUBE_PROXY_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-")


def pod_cgroups() -> list[Path]:
    """The kubelet's pod cgroups in every hierarchy, deepest first."""
    found: list[Path] = []
    with contextlib.suppress(OSError):
        for hierarchy in CGROUP_ROOT.iterdir():
            top = hierarchy / "kubepods"
            if top.is_dir():
                found.extend(path for path in top.rglob("*") if path.is_dir())
                found.append(top)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def pod_pids() -> set[int]:
    pids: set[int] = set()
    for cgroup in pod_cgroups():
        with contextlib.suppress(OSError):
            pids.update(int(pid) for pid in (cgroup / "cgroup.procs").read_text().split())
    return pids


def container_pids(container_id: str) -> set[int]:
    """The processes of one container (its status's ``containerID``, ``containerd://<id>``): what an
    OOM kill or a crash takes down, as opposed to a pod deletion, which the kubelet stops gracefully."""
    wanted = container_id.removeprefix("containerd://")
    pids: set[int] = set()
    for cgroup in pod_cgroups():
        if cgroup.name == wanted:
            with contextlib.suppress(OSError):
                pids.update(int(pid) for pid in (cgroup / "cgroup.procs").read_text().split())
    return pids


def _signal_pods(sig: signal.Signals, wait_s: float) -> None:
    pids = pod_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    deadline = time.monotonic() + wait_s
    while pids and pod_pids() and time.monotonic() < deadline:
        time.sleep(0.1)


def stop_pods(node: NodePaths, grace_s: float = 5.0) -> None:
    """Every container of the node, once the kubelet is stopped (so nothing restarts them):
    SIGTERM, then containerd deletes the tasks (killing what is left, so their shims exit and
    clean up), SIGKILL for anything still in a pod cgroup."""
    _signal_pods(signal.SIGTERM, grace_s)
    if containerd_ready(node):
        for task in ctr(node, "tasks", "list", "--quiet").stdout.split():
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                ctr(node, "tasks", "delete", "--force", task, timeout=30)
    _signal_pods(signal.SIGKILL, 10.0)


def _ours(chain: str) -> bool:
    return chain in KUBELET_CHAINS or chain in KUBE_PROXY_CHAINS or chain.startswith(KUBE_PROXY_CHAIN_PREFIXES)


def leftover_chains(binary: str = "iptables") -> dict[str, list[str]]:
    """The kubelet's and kube-proxy's chains still in the host's tables, per table."""
    found: dict[str, list[str]] = {}
    for table in ("filter", "nat", "mangle"):
        listing = subprocess.run([binary, "-w", "-t", table, "-S"], capture_output=True, text=True)
        chains = [line.split()[1] for line in listing.stdout.splitlines()
                  if line.startswith("-N ") and _ours(line.split()[1])]
        if chains:
            found[table] = chains
    return found


def leftovers(state_dir: Path, since: float) -> list[str]:
    """What a stopped real node of the cluster in ``state_dir`` left behind (nothing, after `down`):
    pod processes and cgroups, mounts below ``state_dir``, the bridge, the kubelet's and
    kube-proxy's iptables chains, port 53 held, shim sockets newer than ``since`` (a time.time()),
    and processes of the node that name ``state_dir``."""
    found: list[str] = []
    node = NodePaths(state_dir / "data" / "node")
    found += [f"pod process {pid}" for pid in sorted(pod_pids())]
    found += [f"pod cgroup {path}" for path in pod_cgroups()]
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {line.split()[1]}" for line in mounts.splitlines()
              if line.split()[1] == str(state_dir) or line.split()[1].startswith(f"{state_dir}/")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    if f" {node.bridge}:" in links or f" {node.bridge}@" in links:
        found.append(f"link {node.bridge}")
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary):
            found += [f"{binary} {table} chain {chain}" for table, chains in leftover_chains(binary).items()
                      for chain in chains]
    try:
        check_dns_port(node_ip())
    except RuntimeError as error:
        found.append(str(error))
    sockets = SHIM_SOCKETS.iterdir() if SHIM_SOCKETS.is_dir() else iter(())
    found += [f"shim socket {s}" for s in sockets if s.stat().st_mtime >= since]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ours = comm in ("kubelet", "containerd", "kube-proxy", "coredns") or comm.startswith("containerd-shim")
        if ours and str(state_dir).encode() in cmdline:
            found.append(f"process {comm} ({proc.name})")
    return found


def _iptables_cleanup() -> None:
    """Remove the kubelet's and kube-proxy's chains and the rules that jump to them (both iptables
    back ends)."""
    for binary in ("iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy"):
        if shutil.which(binary) is None:
            continue
        for table in ("filter", "nat", "mangle"):
            listing = subprocess.run([binary, "-w", "-t", table, "-S"], capture_output=True, text=True)
            if listing.returncode != 0:
                continue
            rules = [shlex.split(line) for line in listing.stdout.splitlines()]
            ours = {r[1] for r in rules if len(r) == 2 and r[0] == "-N" and _ours(r[1])}
            for rule in rules:
                if rule[:1] == ["-A"] and rule[1] not in ours and any(
                        _ours(rule[i + 1]) for i, w in enumerate(rule[:-1]) if w in ("-j", "-g")):
                    subprocess.run([binary, "-w", "-t", table, "-D", *rule[1:]], capture_output=True)
            for chain in ours:
                subprocess.run([binary, "-w", "-t", table, "-F", chain], capture_output=True)
            for chain in ours:
                subprocess.run([binary, "-w", "-t", table, "-X", chain], capture_output=True)


def cleanup(node: NodePaths, kube_proxy: Path | None = None) -> None:
    """After the node's processes are gone and the mounts below the cluster directory are undone:
    pod cgroups, the bridge, kube-proxy's rules (``kube-proxy --cleanup``), the kubelet's and
    kube-proxy's iptables chains, log links, kernel settings."""
    for cgroup in pod_cgroups():
        with contextlib.suppress(OSError):
            cgroup.rmdir()
    subprocess.run(["ip", "link", "delete", node.bridge], capture_output=True)
    if kube_proxy is not None and kube_proxy.is_file():
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([str(kube_proxy), "--cleanup", "--v=0"], capture_output=True, timeout=60,
                           env={**os.environ, **process_env()})
    _iptables_cleanup()
    with contextlib.suppress(OSError):
        for link in CONTAINER_LOG_LINKS.iterdir():
            if link.is_symlink() and os.readlink(link).startswith(f"{node.pod_logs}/"):
                link.unlink()
    try:
        saved = json.loads(node.machine_state.read_text())
    except (OSError, json.JSONDecodeError):
        return
    # Directories the kubelet or containerd created; rmdir keeps them if someone else uses them.
    if not saved.get("container_log_links_existed", True):
        with contextlib.suppress(OSError):
            CONTAINER_LOG_LINKS.rmdir()
    if not saved.get("shim_sockets_existed", True):
        for directory in (SHIM_SOCKETS, SHIM_SOCKETS.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()
    for name, value in saved.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            path = Path("/proc/sys") / name
            if path.read_text().strip() != value:
                path.write_text(value + "\n")
