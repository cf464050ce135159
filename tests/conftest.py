"""Shared fixtures: one local cluster per test session, a fresh namespace per test.

Session fixtures start the cluster (devcluster/cluster.py) only when a test asks for them, reuse a
running one, and stop it at the end only if this session started it (``KUBETUNE_KEEP_CLUSTER=1``
keeps it). ``USE_EXISTING_CLUSTER=true`` runs against the current kubeconfig's cluster instead
(``KUBECONFIG`` or ``~/.kube/config``); MinIO then comes from the ``MINIO_*`` environment.

    cluster      Cluster: kubeconfig, kubectl_path, helm_path, apiserver, kubectl(*args), helm(*args)
    minio_env    {"MINIO_ENDPOINT": "host:port", "MINIO_ACCESS_KEY": ..., "MINIO_SECRET_KEY": ...}
    k8s_api      kubernetes.client.ApiClient for the cluster
    namespace    name of a fresh namespace (with its default ServiceAccount), deleted afterwards
    images       {"operator": tag, "trainer": tag}: the images `make images` builds (cached layers)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster import images as images_lib
from devcluster import node_cleanup
from tests.support.helpers import REPO, Cluster, Node, devcluster, wait_for

MINIO_KEYS = ("MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY")

def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def _existing_cluster() -> Cluster:
    kubeconfig = Path(os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or Path.home() / ".kube" / "config")
    config = yaml.safe_load(kubeconfig.read_text())
    context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
    server = next(c["cluster"]["server"] for c in config["clusters"] if c["name"] == context["cluster"])
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    kubectl = shutil.which("kubectl") or (f"{assets}/kubectl" if assets else None)
    if kubectl is None:
        from devcluster import tools

        kubectl = str(tools.cached_tools()["kubectl"])
    helm = shutil.which("helm")
    return Cluster(kubeconfig=kubeconfig, kubectl_path=Path(kubectl), helm_path=Path(helm) if helm else None,
                   apiserver=server, env={**os.environ, "KUBECONFIG": str(kubeconfig)})


def _cluster_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return devcluster(*args, timeout=None)


def _local_cluster(state_dir: Path) -> Cluster:
    state = json.loads((state_dir / "cluster.json").read_text())
    env = {**os.environ, "KUBECONFIG": state["kubeconfig"]}
    if state.get("kubectl_cache"):
        env["KUBECACHEDIR"] = state["kubectl_cache"]
    return Cluster(kubeconfig=Path(state["kubeconfig"]), kubectl_path=Path(state["kubectl"]),
                   helm_path=Path(state["helm"]), apiserver=state["apiserver"], dir=state_dir, env=env)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The session's cluster: the running local one, a freshly started one, or USE_EXISTING_CLUSTER's."""
    if _flag("USE_EXISTING_CLUSTER"):
        yield _existing_cluster()
        return
    state_dir = Path(os.environ.get("KUBETUNE_CLUSTER_DIR", REPO / ".kubetune")).resolve()
    status = _cluster_cli("status", "--json", "--dir", str(state_dir))
    started = status.returncode != 0
    if started:
        up = _cluster_cli("up", "--dir", str(state_dir))
        if up.returncode != 0:
            pytest.fail(f"devcluster/cluster.py up failed:\n{up.stderr[-4000:]}", pytrace=False)
    real_node_started = (state_dir / "kubeconfig").stat().st_mtime
    try:
        yield _local_cluster(state_dir)
    finally:
        if started and not _flag("KUBETUNE_KEEP_CLUSTER"):
            down = _cluster_cli("down", "--dir", str(state_dir))
            assert down.returncode == 0, down.stderr[-3000:]
            # `down` leaves nothing of the node behind: pods, cgroups, mounts, the bridge, iptables
            # chains (IPv4 and IPv6), CoreDNS's port 53, the shims' sockets, the node's processes.
            assert node_cleanup.leftovers(state_dir, real_node_started) == []


@pytest.fixture(scope="session")
def minio_env(cluster: Cluster) -> dict[str, str]:
    """MinIO endpoint (host:port, plain HTTP) and credentials of the session's cluster."""
    if cluster.dir is None:
        missing = [key for key in MINIO_KEYS if not os.environ.get(key)]
        if missing:
            pytest.skip(f"USE_EXISTING_CLUSTER: set {', '.join(missing)} for MinIO tests")
        return {key: os.environ[key] for key in MINIO_KEYS}
    values = dict(line.split("=", 1) for line in (cluster.dir / "minio.env").read_text().splitlines() if "=" in line)
    return {key: values[key] for key in MINIO_KEYS}


@pytest.fixture(scope="session")
def k8s_api(cluster: Cluster) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient`` configured from the cluster's kubeconfig."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test (ready for pods: its default ServiceAccount exists)."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{stem}-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
             timeout=60, message=f"default ServiceAccount in {name}")
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> None:
    """The FineTuneJob and preset CRDs (crds/), applied once per session and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io",
                    "crd/finetunepresets.kubetune.io", "crd/clusterfinetunepresets.kubetune.io")


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """The operator and trainer images, built as `make images` builds them (devcluster/images.py; cached
    layers: seconds when nothing changed), in this machine's container storage."""
    proc = subprocess.run([sys.executable, "-m", "devcluster.images", "build"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {line.split("\t")[0]: line.split("\t")[1] for line in proc.stdout.splitlines() if "\t" in line}


@pytest.fixture(scope="session")
def node(cluster: Cluster) -> Node:
    """Where the cluster's pods reach this machine, and the registry they pull the tests' images
    from: the local cluster's, or (USE_EXISTING_CLUSTER) KUBETUNE_TEST_NODE_HOST's and
    KUBETUNE_TEST_REGISTRY's."""
    if cluster.dir is None:
        host, registry = os.environ.get("KUBETUNE_TEST_NODE_HOST"), os.environ.get("KUBETUNE_TEST_REGISTRY")
        if not host or not registry:
            pytest.skip("USE_EXISTING_CLUSTER: set KUBETUNE_TEST_NODE_HOST and KUBETUNE_TEST_REGISTRY for tests "
                        "that run pods")
        return Node(host=host, registry=registry)
    state = json.loads((cluster.dir / "cluster.json").read_text())
    return Node(host=state["node_ip"], registry=state["registry"])


@pytest.fixture(scope="session")
def cluster_images(node: Node, images: dict[str, str]) -> dict[str, str]:
    """The operator and trainer images (`make images`) and the TEST DOUBLE trainer image, pushed to
    the cluster's registry: name -> reference there."""
    pushed = {name: images_lib.push(images_lib.IMAGES[name], images_lib.version(), node.registry) for name in images}
    pushed["test-double"] = images_lib.build_test_double(node.registry)
    return pushed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A plain `pytest` (no paths: the testpaths) is the fast tier: tests marked slow are left out."""
    if config.option.file_or_dir:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]

