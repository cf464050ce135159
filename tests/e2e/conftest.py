"""Fixtures for operator e2e tests: the CRD installed once, an operator process per test."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster import seed_demo
from devcluster.images import TEST_DOUBLE_PATH
from tests.support.faults import BlackholeProxy
from tests.support.helpers import Node
from tests.support.jobs import Operator, Signals, running_operator
from tests.support.prometheus import Prometheus

Cluster = Any  # tests/conftest.py's Cluster (conftest modules are not importable by name)
# The chaos suite runs with `make chaos` (KUBETUNE_CHAOS=1) only: long, and not a gate for `make test`.
collect_ignore = [] if os.environ.get("KUBETUNE_CHAOS") else ["chaos"]
REPO = Path(__file__).resolve().parents[2]
REAL_TRAINER_COMMAND = ["python", "-m", "kubetune_trainer"]  # the operator's default


OPERATOR_NAMESPACE = "kubetune-e2e"
OPERATOR_ACCOUNT = "e2e-operator"  # fullnameOverride: the chart's ServiceAccount and RBAC under this name


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig with the chart's ServiceAccount and RBAC (cluster-wide), not admin credentials:
    the e2e operator can do exactly what an installed one can."""
    cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    rbac = cluster.helm("template", "e2e", str(REPO / "helm" / "kubetune"), "-n", OPERATOR_NAMESPACE,
                        "--set", f"fullnameOverride={OPERATOR_ACCOUNT}", "--show-only", "templates/serviceaccount.yaml",
                        "--show-only", "templates/rbac.yaml").stdout
    cluster.kubectl("apply", "-f", "-", input=rbac)
    token = cluster.kubectl("create", "token", OPERATOR_ACCOUNT, "-n", OPERATOR_NAMESPACE,
                            "--duration=24h").stdout.strip()
    config = yaml.safe_load(Path(cluster.env["KUBECONFIG"]).read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = "operator"
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def fake_trainer_env(cluster_images: dict[str, str]) -> dict[str, str]:
    """Operator settings for the TEST DOUBLE trainer: tests/e2e/fake_trainer.py in its image
    (tests/e2e/fake_trainer.Dockerfile) from the cluster's registry."""
    return {"KUBETUNE_TRAINER_IMAGE": cluster_images["test-double"],
            "KUBETUNE_TRAINER_COMMAND": json.dumps(["python", TEST_DOUBLE_PATH])}


@pytest.fixture
def signals(node: Node) -> Iterator[Signals]:
    """Gates and start counts for the TEST DOUBLE trainer (FAKE_WAIT_FOR, FAKE_STARTED as URLs)."""
    served = Signals(node.host)
    try:
        yield served
    finally:
        served.close()


@pytest.fixture
def operator_env() -> dict[str, str]:
    """A test's operator settings, over the TEST DOUBLE trainer's (`fake_trainer_env`); tests of the
    real trainer return `real_trainer_env`."""
    return {}


@pytest.fixture(scope="session")
def demo_bucket(minio_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """MinIO seeded with the demo's tiny backbone and data (devcluster/seed_demo.py)."""
    assets = seed_demo.build_assets(tmp_path_factory.mktemp("demo-assets"))
    seed_demo.seed(minio_env["MINIO_ENDPOINT"], minio_env["MINIO_ACCESS_KEY"], minio_env["MINIO_SECRET_KEY"], assets)
    return str(seed_demo.BUCKET)


@pytest.fixture
def s3_secret(cluster: Cluster, namespace: str, demo_bucket: str, minio_env: dict[str, str]) -> None:
    """The Secret kubetune-s3 (MinIO's keys) that the quickstart-style jobs name, in the test namespace."""
    cluster.kubectl("create", "secret", "generic", "kubetune-s3", "-n", namespace,
                    f"--from-literal=AWS_ACCESS_KEY_ID={minio_env['MINIO_ACCESS_KEY']}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={minio_env['MINIO_SECRET_KEY']}")


@pytest.fixture
def real_trainer_env(minio_env: dict[str, str], node: Node, cluster_images: dict[str, str]) -> dict[str, str]:
    """Operator settings for the real trainer (no test double) in the trainer image from the
    cluster's registry, with MinIO as the default store at the node address (where pods reach it)."""
    port = minio_env["MINIO_ENDPOINT"].rsplit(":", 1)[1]
    return {"KUBETUNE_S3_ENDPOINT": f"{node.host}:{port}", "KUBETUNE_S3_INSECURE": "true",
            "KUBETUNE_TRAINER_COMMAND": json.dumps(REAL_TRAINER_COMMAND),
            "KUBETUNE_TRAINER_IMAGE": cluster_images["trainer"]}


@pytest.fixture
def operator(cluster: Cluster, crd: None, namespace: str, node: Node, fake_trainer_env: dict[str, str],
             operator_env: dict[str, str], operator_kubeconfig: Path, tmp_path: Path) -> Iterator[Operator]:
    """A running operator that watches only this test's namespace."""
    env = {"KUBECONFIG": str(operator_kubeconfig), **fake_trainer_env, **operator_env}
    with running_operator(cluster, namespace, tmp_path, env, report_host=node.host) as running:
        yield running


@pytest.fixture
def apiserver_proxy(cluster: Cluster) -> Iterator[BlackholeProxy]:
    """A fault-injecting TCP proxy in front of the API server (tests/support/faults.py)."""
    address = urllib.parse.urlsplit(cluster.apiserver)
    with BlackholeProxy(address.hostname or "127.0.0.1", address.port or 443) as proxy:
        yield proxy


@pytest.fixture
def proxied_operator(cluster: Cluster, crd: None, namespace: str, node: Node, fake_trainer_env: dict[str, str],
                     operator_env: dict[str, str], operator_kubeconfig: Path, apiserver_proxy: BlackholeProxy,
                     tmp_path: Path) -> Iterator[Operator]:
    """An operator that reaches the API server only through `apiserver_proxy` (API timeout 5 s
    unless `operator_env` says otherwise)."""
    kubeconfig = yaml.safe_load(operator_kubeconfig.read_text())
    for entry in kubeconfig["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{apiserver_proxy.port}"
    path = tmp_path / "kubeconfig-via-proxy"
    path.write_text(yaml.safe_dump(kubeconfig))
    env = {"KUBETUNE_API_TIMEOUT": "5", **fake_trainer_env, **operator_env, "KUBECONFIG": str(path)}
    with running_operator(cluster, namespace, tmp_path, env, report_host=node.host) as running:
        yield running


@pytest.fixture(scope="session")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """One real Prometheus for the session (Debian's, installed with the node's tools when the cluster
    started), with the chart's alert rules; a test points it at its operator."""
    server = Prometheus(tmp_path_factory.mktemp("prometheus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
