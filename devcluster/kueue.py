"""Kueue on the local cluster (hack/build-kueue.sh, pinned in hack/kueue/go.mod), with its webhooks:
no Service routing here, so its webhook configurations and its CRDs' conversion webhooks point at
``https://127.0.0.1:<port>`` with a serving certificate from the cluster's CA."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from devcluster import HACK, log, tools
from devcluster.processes import Paths, State, http_ok, start_process

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


def start_kueue(built: Path, paths: Paths, state: State) -> None:
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
