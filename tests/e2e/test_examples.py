"""Every manifest in examples/ against a real API server (server-side dry run, nothing persisted).

Documents whose kind the cluster serves (FineTuneJob with the CRD installed, Secret, ConfigMap,
PersistentVolumeClaim, ...) go through ``kubectl apply --dry-run=server``: schema, defaults, CEL
rules and admission all run. The local cluster runs Kueue (unless started with ``--no-kueue``), so
examples/kueue.yaml goes through Kueue's CRDs and webhooks too. Argo CD and Flux kinds are not
served there (their CRDs are not installed), so those documents are only checked to be well-formed
objects with apiVersion, kind and metadata.name, and are reported as skipped in the test's output.
KServe's InferenceService and LLMInferenceService CRDs are installed from its pinned Go module
(hack/kserve-crds.sh), so the serving examples are dry-run in full: none of their documents is
skipped.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

Cluster = Any  # tests/conftest.py's Cluster

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.fixture(scope="session")
def kserve_crds(cluster: Cluster) -> None:
    """KServe's serving CRDs on the cluster (server-side apply: too large for the annotation)."""
    crds = Path(subprocess.run(["bash", str(REPO / "hack" / "kserve-crds.sh")], check=True, capture_output=True,
                               text=True, timeout=600).stdout.strip())
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/inferenceservices.serving.kserve.io", "crd/llminferenceservices.serving.kserve.io")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def served_kinds(cluster: Cluster, api_version: str) -> set[str]:
    """Kinds the API server serves for a group/version; empty when it serves none."""
    path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    result = cluster.kubectl("get", "--raw", path, check=False)
    if result.returncode != 0:
        return set()
    return {r["kind"] for r in json.loads(result.stdout)["resources"]}


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "s3-secret.yaml", "argocd-application.yaml", "kueue.yaml", "serving-vllm.yaml",
            "serving-kserve.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_server_dry_run(cluster: Cluster, crd: None, kserve_crds: None, namespace: str, path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no document"
    kinds: dict[str, set[str]] = {}
    applied, skipped = [], []
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
        api_version, kind = doc.get("apiVersion"), doc.get("kind")
        name = (doc.get("metadata") or {}).get("name")
        assert api_version and kind and name, f"{path.name}: document without apiVersion/kind/metadata.name"
        if api_version not in kinds:
            kinds[api_version] = served_kinds(cluster, api_version)
        if kind not in kinds[api_version]:
            skipped.append(f"{kind}/{name} ({api_version})")
            continue
        # Namespaced examples carry no namespace except Argo CD's argocd-cm, which lives in
        # namespace argocd: every served document is dry-run in the test's namespace.
        if (doc.get("metadata") or {}).get("namespace"):
            doc = {**doc, "metadata": {**doc["metadata"], "namespace": namespace}}
        result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                 input=yaml.safe_dump(doc), check=False)
        assert result.returncode == 0, f"{path.name}: {kind}/{name} rejected:\n{result.stderr}"
        applied.append(f"{kind}/{name}")
    if path.name.startswith("serving-"):
        assert not skipped, f"{path.name}: not dry-run: {skipped}"
    with capsys.disabled():
        print(f"\n{path.name}: dry-run ok: {', '.join(applied) or 'none'}"
              f"; skipped (kind not served here): {', '.join(skipped) or 'none'}")
