"""`make demo`: from a fresh clone to a fine-tuned adapter on the local cluster, in one command.

    python -m devcluster.demo up      cluster, images, Helm install, seed MinIO, apply
                                      examples/quickstart.yaml, follow it live, print the final
                                      status, metrics and artifacts
    python -m devcluster.demo down    helm uninstall, then stop the local cluster

The cluster's node is a real kubelet with containerd. The operator and trainer images are built
(`make images`, cached layers) and pushed to the cluster's loopback registry; the chart installs
the operator from there, under its own ServiceAccount and RBAC, and the trainer pod pulls the
trainer image, trains a tiny backbone on the CPU and reports to the operator through the chart's
Service DNS name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from devcluster import REPO, images, seed_demo

STATE = REPO / ".kubetune"  # --dir replaces it
RELEASE, RELEASE_NS, JOB_NS = "kubetune", "kubetune-system", "default"


def run(*args: str, capture: bool = False, check: bool = True, stdin: str | None = None) -> str:
    result = subprocess.run(args, text=True, capture_output=capture, check=False, input=stdin,
                            env={**os.environ, "KUBECONFIG": str(STATE / "kubeconfig")})
    if check and result.returncode != 0:
        sys.exit(f"demo: {' '.join(args)} failed:\n{result.stderr if capture else ''}")
    return result.stdout if capture else ""


def kubectl(*args: str, check: bool = True, stdin: str | None = None) -> str:
    return run(str(STATE / "bin" / "kubectl"), *args, capture=True, check=check, stdin=stdin)


def helm(*args: str) -> None:
    run(str(STATE / "bin" / "helm"), *args)


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def follow(name: str, timeout: float = 900) -> dict[str, Any]:
    """`kubetune watch NAME` until the job ends (a live bar on a terminal, plain lines elsewhere);
    return its status."""
    subprocess.run([sys.executable, "-m", "kubetune", "watch", name, "-n", JOB_NS, "--timeout", str(int(timeout))],
                   env={**os.environ, "KUBECONFIG": str(STATE / "kubeconfig")}, check=False)
    status: dict[str, Any] = json.loads(kubectl("get", "ftj", name, "-n", JOB_NS, "-o", "json")).get("status") or {}
    if status.get("phase") not in ("Succeeded", "Failed"):
        sys.exit(f"demo: {name} did not finish within {timeout:.0f}s")
    return status


def chart_values(images: dict[str, str], node_ip: str, minio_endpoint: str) -> list[str]:
    """`helm --set` flags for the local cluster: the operator and trainer images (references in the
    cluster's registry), MinIO at the node address (where pods reach this machine) over plain HTTP
    with the keys of the Secret ``kubetune-s3``, and reports through the chart's Service by its DNS
    name (the chart's default report URL)."""
    repository, tag = images["operator"].rsplit(":", 1)
    values = [f"image.repository={repository}", f"image.tag={tag}", f"trainer.image={images['trainer']}",
              f"storage.endpoint={node_ip}:{minio_endpoint.rsplit(':', 1)[1]}", "storage.insecure=true",
              "storage.secretName=kubetune-s3"]
    return [flag for value in values for flag in ("--set", value)]


def up() -> None:
    step("Starting the local cluster (kube-apiserver, etcd, controllers, scheduler, MinIO, registry, "
         "a kubelet + containerd node)")
    subprocess.run([sys.executable, "-m", "devcluster", "up", "--dir", str(STATE)], cwd=REPO, check=True)
    state = json.loads((STATE / "cluster.json").read_text())
    minio = seed_demo.read_env(STATE / "minio.env")
    print(kubectl("get", "nodes", "-o", "wide"))

    step("Building the operator and trainer images and pushing them to the cluster's registry (make images)")
    images.build_all(list(images.IMAGES), registry=state["registry"])
    pushed = {name: f"{state['registry']}/kubetune/{name}:{images.version()}" for name in images.IMAGES}
    print("\n".join(f"  {reference}" for reference in pushed.values()))
    settings = [*chart_values(pushed, state["node_ip"], minio["MINIO_ENDPOINT"]),
                "--set", "reports.statusIntervalSeconds=1"]
    step("Installing the KubeTune chart with helm (the operator runs as a pod on the local node)")
    helm("upgrade", "--install", RELEASE, str(REPO / "helm" / "kubetune"), "-n", RELEASE_NS, "--create-namespace",
         "--wait", "--timeout", "300s", *settings)
    print(kubectl("get", "pods", "-n", RELEASE_NS, "-o", "wide"))

    step("Seeding MinIO with a tiny Llama-architecture backbone and an instruction dataset (built locally)")
    assets = seed_demo.build_assets(STATE / "demo-assets")
    keys = seed_demo.seed(minio["MINIO_ENDPOINT"], minio["MINIO_ACCESS_KEY"], minio["MINIO_SECRET_KEY"], assets)
    print(f"  s3://{seed_demo.BUCKET}/: {len(keys)} objects")
    secret = kubectl("create", "secret", "generic", "kubetune-s3", "-n", JOB_NS,
                     f"--from-literal=AWS_ACCESS_KEY_ID={minio['MINIO_ACCESS_KEY']}",
                     f"--from-literal=AWS_SECRET_ACCESS_KEY={minio['MINIO_SECRET_KEY']}",
                     "--dry-run=client", "-o", "yaml")
    kubectl("apply", "-f", "-", stdin=secret)

    step("Applying examples/quickstart.yaml")
    kubectl("delete", "ftj", "quickstart", "-n", JOB_NS, "--ignore-not-found", "--wait=true")
    print(kubectl("apply", "-n", JOB_NS, "-f", str(REPO / "examples" / "quickstart.yaml")).strip(), flush=True)

    step("Training: kubetune watch quickstart (the first run pulls the trainer image, several GB)")
    status = follow("quickstart")
    print(kubectl("get", "pods", "-n", JOB_NS, "-l", "batch.kubernetes.io/job-name=quickstart-trainer",
                  "-o", "custom-columns=POD:.metadata.name,IMAGE:.spec.containers[0].image,PHASE:.status.phase"))

    step("Final status")
    print(kubectl("get", "ftj", "-n", JOB_NS, "-o", "wide"))
    print(json.dumps({k: status.get(k) for k in ("phase", "reason", "message", "progress", "metrics", "artifacts")},
                     indent=2))
    if status["phase"] != "Succeeded":
        sys.exit("demo: the quickstart job failed (kubectl describe ftj quickstart)")

    step("Is the fine-tuned model better? (status.evaluation: the adapter vs the backbone alone)")
    print("\n".join(evaluation_table(status.get("evaluation") or {})))

    step("Pulling the results: kubetune pull quickstart (every file checked against manifest.json)")
    pull_results(minio)


def evaluation_table(evaluation: dict[str, Any]) -> list[str]:
    """status.evaluation as a table: each metric tuned, base and the difference."""

    def shown(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) else "-"

    lines = [f"  {'metric':<12}{'tuned':>10}{'base':>10}{'delta':>10}  samples"]
    for name, result in (evaluation.get("metrics") or {}).items():
        lines.append(f"  {name:<12}{shown(result.get('tuned')):>10}{shown(result.get('base')):>10}"
                     f"{shown(result.get('delta')):>10}  {result.get('samples', '-')}")
    return lines


def pull_results(minio: dict[str, str]) -> None:
    """`kubetune pull quickstart` into .kubetune/demo/quickstart: the credentials from the job's Secret,
    MinIO at its address on this machine."""
    out = STATE / "demo" / "quickstart"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    pulled = subprocess.run([sys.executable, "-m", "kubetune", "pull", "quickstart", "-n", JOB_NS, "--to", str(out),
                             "--endpoint", minio["MINIO_ENDPOINT"], "--insecure", "--print-serving"],
                            env={**env, "KUBECONFIG": str(STATE / "kubeconfig")}, check=False)
    if pulled.returncode != 0:
        sys.exit("demo: kubetune pull quickstart failed")
    print(f"\nLoss curve: {out / 'loss.png'}\nkubectl: export KUBECONFIG={STATE / 'kubeconfig'} "
          f"PATH={STATE / 'bin'}:$PATH")
    print("Remove everything: make demo-down")


def down() -> None:
    if (STATE / "kubeconfig").exists() and (STATE / "bin" / "helm").exists():
        run(str(STATE / "bin" / "helm"), "uninstall", RELEASE, "-n", RELEASE_NS, "--wait", capture=True, check=False)
    subprocess.run([sys.executable, "-m", "devcluster", "down", "--dir", str(STATE)], cwd=REPO, check=True)


def main() -> None:
    global STATE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=STATE, help="local cluster directory (default .kubetune/)")
    args = parser.parse_args()
    STATE = args.dir.resolve()
    up() if args.command == "up" else down()


if __name__ == "__main__":
    main()
