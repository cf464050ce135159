"""The pinned binaries of the local cluster (hack/versions.env): where hack/build-binaries.sh puts
them, built on first use; ``KUBEBUILDER_ASSETS`` may supply etcd, kube-apiserver and kubectl."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devcluster import HACK, log, tools


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
