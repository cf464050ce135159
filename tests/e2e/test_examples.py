"""Every manifest in examples/ against a real API server (server-side dry run, nothing persisted).

Documents whose kind the cluster serves (FineTuneJob with the CRD installed, Secret, ConfigMap,
PersistentVolumeClaim, ...) go through ``kubectl apply --dry-run=server``: schema, defaults, CEL
rules and admission all run. The local cluster runs Kueue (unless started with ``--no-kueue``), so
examples/kueue.yaml goes through Kueue's CRDs and webhooks too. Argo CD and Flux kinds are not
served there (their CRDs are not installed), so those documents are only checked to be well-formed
objects with apiVersion, kind and metadata.name, and are reported as skipped in the test's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

Cluster = Any  # tests/conftest.py's Cluster

pytestmark = pytest.mark.e2e

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


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
    assert {"quickstart.yaml", "s3-secret.yaml", "argocd-application.yaml", "kueue.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_server_dry_run(cluster: Cluster, crd: None, namespace: str, path: Path,
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
    with capsys.disabled():
        print(f"\n{path.name}: dry-run ok: {', '.join(applied) or 'none'}"
              f"; skipped (kind not served here): {', '.join(skipped) or 'none'}")
