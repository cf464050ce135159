"""The Helm chart: lint, server-side dry-run of its manifests, and a real install on the local cluster.

The install runs the operator as a pod on the local node under the chart's ServiceAccount and
RBAC, trains the quickstart with the real trainer, runs `helm test`, and uninstalls.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster import seed_demo
from devcluster.demo import chart_values
from tests.support.helpers import Node, load_hack, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kubetune"
chart_docs = load_hack("chart_docs")

NON_DEFAULT = ["--set", "storage.endpoint=minio.storage:9000", "--set", "storage.insecure=true",
               "--set", "storage.secretName=s3", "--set", "trainer.nodeSelector.gpu=h100",
               "--set", "image.tag=9.9.9", "--set", "logLevel=DEBUG", "--set", "reports.port=9091",
               "--set", "serviceAccount.annotations.team=ml"]


def test_chart_docs_and_schema_are_generated_from_values() -> None:
    stale = [p for p, text in chart_docs.generated().items() if p.read_text() != text]
    assert stale == [], "run `make chart-docs`"


def test_chart_version_and_trainer_image_follow_the_one_project_version(cluster: Any) -> None:
    """kubetune.__version__ is the only place the version is written; a different Chart.yaml is stale."""
    from kubetune import __version__
    from kubetune.settings import DEFAULT_TRAINER_IMAGE

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__ == chart_docs.project_version()
    bumped = chart_docs.stamp_version((CHART / "Chart.yaml").read_text(), "9.8.7")
    assert yaml.safe_load(bumped)["appVersion"] == "9.8.7" and yaml.safe_load(bumped)["version"] == "9.8.7"
    assert f"ghcr.io/kubetune/trainer:{__version__}" == DEFAULT_TRAINER_IMAGE
    docs = [d for d in yaml.safe_load_all(cluster.helm("template", "kt", str(CHART)).stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == DEFAULT_TRAINER_IMAGE
    assert container["image"] == f"ghcr.io/kubetune/operator:{__version__}"


def test_schema_rejects_unknown_values(cluster: Any) -> None:
    result = cluster.helm("template", "kt", str(CHART), "--set", "replicas=3", check=False)
    assert result.returncode != 0 and "replicas" in result.stderr


def test_the_plain_http_report_endpoint_cannot_get_a_load_balancer(cluster: Any) -> None:
    result = cluster.helm("template", "kt", str(CHART), "--set", "service.type=LoadBalancer", check=False)
    assert result.returncode != 0 and "/service/type" in result.stderr


def test_only_training_pods_reach_the_report_port(cluster: Any) -> None:
    docs = [d for d in yaml.safe_load_all(cluster.helm("template", "kt", str(CHART)).stdout) if d]
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    reports, health = policy["spec"]["ingress"]
    assert reports["from"] == [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "kubetune-trainer"}}}]
    assert reports["ports"] == [{"port": "reports", "protocol": "TCP"}]
    assert "from" not in health and health["ports"] == [{"port": "health", "protocol": "TCP"}]


@pytest.mark.parametrize("values", [[], NON_DEFAULT], ids=["default", "non-default"])
def test_lint_and_server_side_dry_run(cluster: Any, crd: None, namespace: str, values: list[str]) -> None:
    cluster.helm("lint", str(CHART), *values)
    rendered = cluster.helm("template", "kt", str(CHART), "-n", namespace, "--skip-tests", *values).stdout
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)
    assert "deployment.apps/kt-kubetune created (server dry run)" in result.stdout


def test_watch_namespaces_binds_only_those(cluster: Any, crd: None, namespace: str) -> None:
    rendered = cluster.helm("template", "kt", str(CHART), "-n", namespace,
                            "--skip-tests", "--set", f"watchNamespaces={{{namespace}}}").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    bindings = [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs
                if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert ("RoleBinding", "kt-kubetune", namespace) in bindings
    assert ("ClusterRoleBinding", "kt-kubetune", None) not in bindings
    env = {e["name"]: e["value"] for d in docs if d["kind"] == "Deployment"
           for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_NAMESPACES"] == namespace
    cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)


def test_admission_policies_follow_the_values(cluster: Any) -> None:
    def policies(*values: str) -> dict[str, Any]:
        docs = [d for d in yaml.safe_load_all(cluster.helm("template", "kt", str(CHART), *values).stdout) if d]
        return {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}

    found = policies()
    assert {p["spec"].get("paramKind", {}).get("kind") for p in found.values()} == {
        "FineTunePreset", "ClusterFineTunePreset", None}
    env = {e["name"]: e["value"] for d in yaml.safe_load_all(cluster.helm("template", "kt", str(CHART)).stdout)
           if d and d["kind"] == "Deployment" for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_RESTRICT_IMAGES_AND_SERVICE_ACCOUNTS"] == "true"
    # Turned off, a job may choose its image and service account (within its preset's lists, if any).
    relaxed = policies("--set", "admissionPolicy.restrictImagesAndServiceAccounts=false")
    assert len(relaxed) == 3
    # the policy for jobs without a preset then keeps only the kubetune.io/preset-required rule
    rules = [v["messageExpression"] for v in relaxed["kt-kubetune-finetunejob-without-preset"]["spec"]["validations"]]
    assert len(rules) == 1 and "requires a preset" in rules[0]
    assert len(found["kt-kubetune-finetunejob-without-preset"]["spec"]["validations"]) == 3
    assert policies("--set", "admissionPolicy.enabled=false") == {}


@pytest.mark.e2e
def test_install_train_test_uninstall(cluster: Any, crd: None, namespace: str, minio_env: dict[str, str],
                                      node: Node, cluster_images: dict[str, str], tmp_path: Path) -> None:
    release_ns = f"kubetune-system-{secrets.token_hex(3)}"
    values = chart_values(cluster_images, node.host, minio_env["MINIO_ENDPOINT"])
    install = cluster.helm("install", "kubetune", str(CHART), "-n", release_ns, "--create-namespace",
                           "--wait", "--timeout", "180s", *values)
    assert "helm test kubetune" in install.stdout  # NOTES.txt tells what to do next
    try:
        pod = wait_for(lambda: next(iter(cluster.get("pods", "-n", release_ns, "-l",
                                                     "app.kubernetes.io/component=operator")["items"]), None),
                       timeout=60, message="operator pod")
        assert pod["spec"]["nodeName"] == "kubetune-local"
        assert pod["spec"]["serviceAccountName"] == "kubetune"
        wait_for(lambda: cluster.get("pod", pod["metadata"]["name"], "-n", release_ns)["status"]["phase"]
                 == "Running", timeout=60, message="operator pod Running")

        assets = seed_demo.build_assets(tmp_path / "assets")
        seed_demo.seed(minio_env["MINIO_ENDPOINT"], minio_env["MINIO_ACCESS_KEY"], minio_env["MINIO_SECRET_KEY"],
                       assets)
        cluster.kubectl("create", "secret", "generic", "kubetune-s3", "-n", namespace,
                        f"--from-literal=AWS_ACCESS_KEY_ID={minio_env['MINIO_ACCESS_KEY']}",
                        f"--from-literal=AWS_SECRET_ACCESS_KEY={minio_env['MINIO_SECRET_KEY']}")
        cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "quickstart.yaml"))

        def finished() -> dict[str, Any] | None:
            status = cluster.get("ftj", "quickstart", "-n", namespace).get("status") or {}
            assert status.get("phase") != "Failed", status
            return status if status.get("phase") == "Succeeded" else None

        status = wait_for(finished, timeout=600, message="quickstart Succeeded under the chart's operator")
        assert status["metrics"]["evalLoss"] > 0 and status["artifacts"]["location"].startswith("s3://")
        installed = cluster.kubectl("get", "validatingadmissionpolicies,validatingadmissionpolicybindings",
                                    "-o", "name").stdout.split()
        for kind in ("validatingadmissionpolicy", "validatingadmissionpolicybinding"):
            for name in ("finetunepreset-limits", "clusterfinetunepreset-limits", "finetunejob-without-preset"):
                assert f"{kind}.admissionregistration.k8s.io/kubetune-{name}" in installed, installed
        for crd_name in ("finetunepresets.kubetune.io", "clusterfinetunepresets.kubetune.io"):
            assert cluster.kubectl("get", "crd", crd_name, check=False).returncode == 0, crd_name
        own = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
        own["metadata"]["name"], own["spec"]["image"] = "own-image", "example.com/trainer:1"
        chosen = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", check=False,
                                 input=yaml.safe_dump(own))
        assert chosen.returncode != 0 and "spec.image: a FineTuneJob without a preset" in chosen.stderr
        operator_log = cluster.kubectl("logs", "-n", release_ns, pod["metadata"]["name"]).stdout
        assert "kubetune.reconcile" in operator_log, "no operator log to check"
        # An RBAC denial reads 'is forbidden: User "system:serviceaccount:…" cannot …'.
        assert 'forbidden: User "system:serviceaccount' not in operator_log, "RBAC denial"
        sa = f"system:serviceaccount:{release_ns}:kubetune"
        assert cluster.kubectl("auth", "can-i", f"--as={sa}", "update", "finetunejobs.kubetune.io",
                               "--subresource=finalizers", "-n", namespace).stdout.strip() == "yes"
        for verb in ("get", "list", "delete"):  # the operator never reads or deletes a Secret
            denied = cluster.kubectl("auth", "can-i", f"--as={sa}", verb, "secrets", "-n", "kube-system", check=False)
            assert denied.stdout.strip() == "no", verb

        test = cluster.helm("test", "kubetune", "-n", release_ns, "--timeout", "180s")
        phases = re.findall(r"^Phase:\s+(\w+)", test.stdout, re.MULTILINE)
        assert phases and set(phases) == {"Succeeded"}, test.stdout
    finally:
        cluster.helm("uninstall", "kubetune", "-n", release_ns, "--wait", "--timeout", "120s", check=False)

    def left() -> list[str]:
        found = json.loads(cluster.kubectl("get", "deployments,services,serviceaccounts,pods", "-n", release_ns,
                                           "-l", "app.kubernetes.io/instance=kubetune", "-o", "json").stdout)
        return [f"{i['kind']}/{i['metadata']['name']}" for i in found["items"]]

    wait_for(lambda: left() == [], timeout=120, message="no operator resources left after helm uninstall")
    cluster_wide = cluster.kubectl("get", "clusterroles,clusterrolebindings,validatingadmissionpolicies,"
                                   "validatingadmissionpolicybindings", "-o", "name").stdout
    assert "kubetune" not in cluster_wide.replace("finetunejobs.kubetune.io", "")
    assert cluster.kubectl("get", "crd", "finetunejobs.kubetune.io", check=False).returncode == 0, "CRD kept"
    subprocess.run([str(cluster.kubectl_path), "delete", "namespace", release_ns, "--wait=false"],
                   env=cluster.env, check=False, capture_output=True)


def test_alerts_pass_promtool_and_the_chart_carries_them_and_the_dashboard(cluster: Any) -> None:
    """files/prometheus-rules.yaml is a valid Prometheus rule file (Debian's promtool, installed with
    the node's tools); prometheusRule.enabled renders its groups unchanged, grafanaDashboard.enabled the
    dashboard JSON in a ConfigMap the Grafana sidecar discovers. Both are off by default."""
    rules = CHART / "files" / "prometheus-rules.yaml"
    checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(cluster.helm("template", "kt", str(CHART)).stdout) if d}
    assert not {"PrometheusRule", "ServiceMonitor"} & kinds
    docs = [d for d in yaml.safe_load_all(cluster.helm(
        "template", "kt", str(CHART), "--set", "prometheusRule.enabled=true", "--set", "grafanaDashboard.enabled=true",
        "--set", "prometheusRule.labels.release=prom").stdout) if d]
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(rules.read_text()) and rule["metadata"]["labels"]["release"] == "prom"
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kt-kubetune-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kubetune.json"]) == json.loads(
        (CHART / "files" / "grafana-dashboard.json").read_text())
