"""A third-party scanner (checkov, pinned in hack/scan-requirements.txt, `make scan-venv`) over what
KubeTune puts in a cluster: the rendered chart and a training Job the operator rendered. Every
finding is fixed or skipped in the manifest itself with a one-line reason."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from kubetune import render
from kubetune.api import FineTuneJobSpec
from kubetune.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CHECKOV = REPO / ".venv-scan" / "bin" / "checkov"


def operator_rendered(namespace: str) -> list[dict[str, Any]]:
    """What the operator creates for examples/quickstart.yaml in a tenant namespace."""
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    owner = {**manifest, "metadata": {"name": "quickstart", "namespace": namespace, "uid": "0123456789ab",
                                      "generation": 1}}
    spec = FineTuneJobSpec.model_validate(owner["spec"])
    settings = Settings(report_url="http://kubetune.kubetune-system.svc:8081")
    config_map = render.render_config_map(owner, spec, settings)
    return [render.render_report_secret(owner, "token"), config_map, render.render_network_policy(owner),
            render.render_job(owner, spec, settings, config_map)]


def test_checkov_reports_no_unexplained_finding(cluster: Any, tmp_path: Path) -> None:
    assert CHECKOV.exists(), "checkov is missing: run `make scan-venv`"
    chart = cluster.helm("template", "kubetune", str(REPO / "helm" / "kubetune"), "-n", "kubetune-system").stdout
    (tmp_path / "chart.yaml").write_text(chart)
    (tmp_path / "operator-rendered.yaml").write_text(yaml.safe_dump_all(operator_rendered("team-a")))
    result = subprocess.run([str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json"],
                            capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in report["results"]["failed_checks"]]
    print(f"checkov {report['summary']['checkov_version']}: {report['summary']}")
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["resource_count"] >= 10
    assert failed == [], failed
