"""examples/quickstart.yaml end to end: the REAL trainer on the local GPU node, real MinIO.

Live progress in status while it trains, the operator killed mid-run and started again after the
trainer finished (the final summary arrives through the termination message), verified artifacts,
and the operator's /metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_contract.config import StorageSpec
from kubetune_trainer.artifacts import verify_manifest
from tests.support.helpers import wait_for
from tests.support.jobs import event_reasons, report_token, wait_phase

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def operator_env(real_trainer_env: dict[str, str]) -> dict[str, str]:
    return real_trainer_env


def test_quickstart_trains_reports_progress_and_publishes_artifacts(
    cluster: Any, namespace: str, demo_bucket: str, minio_env: dict[str, str], operator: Any,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    cluster.kubectl("create", "secret", "generic", "kubetune-s3", "-n", namespace,
                    f"--from-literal=AWS_ACCESS_KEY_ID={minio_env['MINIO_ACCESS_KEY']}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={minio_env['MINIO_SECRET_KEY']}")
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "quickstart.yaml"))
    watching = Terminal([sys.executable, "-m", "kubetune", "watch", "quickstart", "-n", namespace, "--timeout", "900"],
                        cluster.env)

    seen: list[int] = []

    def progressed_twice() -> bool:
        status = cluster.get("ftj", "quickstart", "-n", namespace).get("status") or {}
        assert status.get("phase") not in ("Failed", "Succeeded"), f"ended before progress was seen: {status}"
        step = (status.get("progress") or {}).get("step")
        if status.get("phase") == "Running" and step is not None and (not seen or step > seen[-1]):
            seen.append(step)
        return len(seen) >= 3

    wait_for(progressed_twice, timeout=300, interval=0.1, message="progress to increase twice while Running")
    table = cluster.kubectl("get", "ftj", "-n", namespace).stdout
    assert "Running" in table
    print(table)

    # The operator goes away mid-run; the trainer finishes without it.
    operator.stop(kill=True)
    wait_for(lambda: cluster.get("job", "quickstart-trainer", "-n", namespace)["status"].get("succeeded"),
             timeout=600, message="the training Job to complete")
    operator.start()
    status = wait_phase(cluster, namespace, "quickstart", "Succeeded", timeout=120)
    print(cluster.kubectl("get", "ftj", "-n", namespace).stdout)
    print(cluster.kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout)

    assert status["progress"]["percent"] == 100 and status["progress"]["step"] == 300
    assert status["metrics"]["trainLoss"] > 0 and status["metrics"]["evalLoss"] > 0
    location = status["artifacts"]["location"]
    assert location.startswith(f"s3://{demo_bucket}/runs/{namespace}/quickstart")

    for key, value in minio_env.items():
        monkeypatch.setenv({"MINIO_ACCESS_KEY": "AWS_ACCESS_KEY_ID", "MINIO_SECRET_KEY": "AWS_SECRET_ACCESS_KEY"}
                           .get(key, key), value)
    manifest = verify_manifest(location.rstrip("/"), StorageSpec(endpoint=minio_env["MINIO_ENDPOINT"],
                                                                 insecure=True))
    paths = {entry["path"] for entry in manifest["files"]}
    assert {"adapter/adapter_model.safetensors", "metrics.jsonl", "README.md", "loss.png", "evaluation.json",
            "predictions.jsonl", "samples.txt"} <= paths
    # Evaluation (tuned vs the backbone) and the data's statistics reach the status.
    evaluation = status["evaluation"]["metrics"]
    assert set(evaluation) == {"perplexity", "bleu", "rouge", "exactMatch"}
    assert evaluation["perplexity"]["tuned"] < evaluation["perplexity"]["base"]
    assert evaluation["exactMatch"]["samples"] > 0 and evaluation["bleu"]["base"] is not None
    assert status["evaluation"]["headline"].startswith("perplexity ")
    assert status["dataset"]["samples"] > 0 and status["dataset"]["totalSteps"] == 300
    pull_and_check_lineage(cluster, namespace, status, manifest, minio_env, tmp_path)

    # `kubetune watch` in a terminal followed it to the end, through the operator's restart.
    shown = watching.wait(timeout=120)
    assert watching.code == 0, shown[-3000:]
    assert "\x1b[" in shown and "300/300" in shown and "Running (Training)" in shown and "Succeeded" in shown
    # Plain lines in a pipe; the same command as a kubectl plugin.
    plain = subprocess.run([sys.executable, "-m", "kubetune", "watch", "quickstart", "-n", namespace],
                           env=cluster.env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "\x1b" not in plain.stdout and f"artifacts: {location}" in plain.stdout
    plugin_path = {**cluster.env, "PATH": f"{Path(sys.executable).parent}:{cluster.env.get('PATH', '')}"}
    described = subprocess.run([str(cluster.kubectl_path), "kubetune", "describe", "quickstart", "-n", namespace],
                               env=plugin_path, capture_output=True, text=True, timeout=120)
    assert described.returncode == 0, described.stderr
    assert "Phase:        Succeeded" in described.stdout and "manifestSha256:" in described.stdout
    assert "Created" in described.stdout.split("Events:")[1]

    wait_for(lambda: {"Created", "Started", "Succeeded"} <= set(event_reasons(cluster, namespace, "quickstart")),
             timeout=30, message="Created, Started and Succeeded events")
    with urllib.request.urlopen(f"{operator.report_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'kubetune_finetunejobs{phase="Succeeded"} 1.0' in text

    # Neither the storage credentials nor the report token appear anywhere but in their Secrets.
    token = report_token(cluster, namespace, "quickstart")
    visible = [
        cluster.get("configmap", "quickstart-config", "-n", namespace)["data"]["config.yaml"],
        json.dumps(cluster.get("ftj,jobs,pods,events", "-n", namespace)),
        cluster.kubectl("logs", "-n", namespace, "job/quickstart-trainer").stdout,
        operator.logs(),
    ]
    for credential in (minio_env["MINIO_SECRET_KEY"], minio_env["MINIO_ACCESS_KEY"], token):
        assert all(credential not in text for text in visible), "a credential leaked"

    # `kubetune logs`: the pod's log while it exists, then the copy published with the outputs.
    logs = [sys.executable, "-m", "kubetune", "logs", "quickstart", "-n", namespace]
    live = subprocess.run(logs, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert live.returncode == 0 and "training: 300 steps" in live.stdout, live.stderr
    cluster.kubectl("delete", "job", "quickstart-trainer", "-n", namespace, "--cascade=foreground", "--wait=true")
    wait_for(lambda: not cluster.get("pods", "-n", namespace, "-l", "job-name=quickstart-trainer")["items"],
             timeout=120, message="the training pods gone")
    env = {k: v for k, v in cluster.env.items() if not k.startswith("AWS_")}
    kept = subprocess.run([*logs, "--endpoint", minio_env["MINIO_ENDPOINT"], "--insecure"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0, kept.stderr
    assert "the pods are gone" in kept.stderr and "training: 300 steps" in kept.stdout


class Terminal:
    """A command whose stdout is a pseudo-terminal; what it shows is collected by a thread."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        import pty
        import threading

        self.leader, follower = pty.openpty()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
        os.close(follower)
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.code: int | None = None

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.leader, 65536)
            except OSError:  # the command exited and its end of the terminal is closed
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    def wait(self, timeout: float) -> str:
        self.code = self.process.wait(timeout=timeout)
        self.thread.join(timeout=10)
        os.close(self.leader)
        return b"".join(self.chunks).decode(errors="replace")


def pull_and_check_lineage(cluster: Any, namespace: str, status: dict[str, Any], manifest: dict[str, Any],
                           minio_env: dict[str, str], tmp_path: Path) -> None:
    """The lineage names the image the node ran by digest; `kubetune pull` (credentials from the job's
    Secret, read with the caller's kubeconfig) downloads and verifies the run, and refuses, naming the
    file, once a file is altered in the bucket."""
    from minio import Minio

    pod = cluster.get("pods", "-n", namespace, "-l", "job-name=quickstart-trainer")["items"][0]
    image_id = pod["status"]["containerStatuses"][0]["imageID"]
    lineage = status["artifacts"]["lineage"]
    assert lineage["imageID"] == image_id and "sha256:" in image_id
    assert {k: v for k, v in lineage.items() if k != "imageID"} == manifest["lineage"]
    assert [d["role"] for d in lineage["data"]] == ["train", "validation"]

    env = {k: v for k, v in cluster.env.items() if not k.startswith("AWS_")}
    pull = [sys.executable, "-m", "kubetune", "pull", "quickstart", "-n", namespace, "--endpoint",
            minio_env["MINIO_ENDPOINT"], "--insecure", "--quiet"]
    done = subprocess.run([*pull, "--to", str(tmp_path / "quickstart"), "--print-serving"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"verified {len(manifest['files'])} files" in done.stdout and f"imageID: {image_id}" in done.stdout
    assert "vllm serve" in done.stdout and "--lora-modules quickstart=" in done.stdout
    assert (tmp_path / "quickstart" / "adapter" / "adapter_model.safetensors").is_file()
    assert minio_env["MINIO_SECRET_KEY"] not in done.stdout + done.stderr

    bucket, _, prefix = status["artifacts"]["location"].removeprefix("s3://").rstrip("/").partition("/")
    client = Minio(minio_env["MINIO_ENDPOINT"], access_key=minio_env["MINIO_ACCESS_KEY"],
                   secret_key=minio_env["MINIO_SECRET_KEY"], secure=False)
    altered = tmp_path / "adapter_config.json"
    altered.write_text((tmp_path / "quickstart" / "adapter" / "adapter_config.json").read_text().replace('"r": 8',
                                                                                                         '"r": 9'))
    client.fput_object(bucket, f"{prefix}/adapter/adapter_config.json", str(altered))
    refused = subprocess.run([*pull, "--to", str(tmp_path / "again")], env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 1
    assert "adapter/adapter_config.json has size" in refused.stderr and "nothing was written" in refused.stderr
    assert not (tmp_path / "again").exists()


def test_two_training_processes_in_one_pod_push_one_oci_artifact(
    cluster: Any, namespace: str, demo_bucket: str, minio_env: dict[str, str], operator: Any, node: Any,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """A CPU-only job with distribution.processesPerNode 2: torchrun (gloo) and DDP in the pod, rank 0
    reporting, publishing and pushing (output.oci, to the cluster's registry at the node's address,
    credentials from a dockerconfigjson Secret): one progress in status, one verified manifest, one
    artifact whose digest in status resolves and pulls verified with `kubetune pull --digest`."""
    cluster.kubectl("create", "secret", "generic", "kubetune-s3", "-n", namespace,
                    f"--from-literal=AWS_ACCESS_KEY_ID={minio_env['MINIO_ACCESS_KEY']}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={minio_env['MINIO_SECRET_KEY']}")
    registry = f"{node.host}:{node.registry.rsplit(':', 1)[1]}"
    password = "registry-Pa55-" + namespace
    cluster.kubectl("create", "secret", "docker-registry", "registry", "-n", namespace, f"--docker-server={registry}",
                    "--docker-username=team", f"--docker-password={password}")
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"]["name"] = "two-ranks"
    manifest["spec"]["training"].update(maxSteps=40, evalEverySteps=20, checkpointEverySteps=20, logEverySteps=5)
    manifest["spec"]["resources"] = {"gpus": 0, "sharedMemory": "256Mi", "distribution": {"processesPerNode": 2}}
    manifest["spec"]["output"]["oci"] = {"repository": f"{registry}/kubetune-tests/{namespace}", "insecure": True,
                                         "secretRef": {"name": "registry"}}
    cluster.apply(manifest, namespace)
    status = wait_phase(cluster, namespace, "two-ranks", "Succeeded", timeout=600)
    assert status["progress"]["step"] == 40 and status["attempts"] == 1
    command = cluster.get("job", "two-ranks-trainer", "-n", namespace)["spec"]["template"]["spec"]["containers"][0]
    assert command["command"][-4:] == ["--nproc-per-node", "2", "-m", "kubetune_trainer"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio_env["MINIO_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio_env["MINIO_SECRET_KEY"])
    published = verify_manifest(status["artifacts"]["location"].rstrip("/"),
                                StorageSpec(endpoint=minio_env["MINIO_ENDPOINT"], insecure=True))
    assert "adapter/adapter_model.safetensors" in {entry["path"] for entry in published["files"]}

    # The digest in status resolves in the registry, under the tag the job's name gave it.
    artifacts = status["artifacts"]
    digest, reference = artifacts["ociDigest"], artifacts["ociReference"]
    assert reference == f"{registry}/kubetune-tests/{namespace}@{digest}"
    for ref in (digest, "two-ranks"):
        request = urllib.request.Request(f"http://{node.registry}/v2/kubetune-tests/{namespace}/manifests/{ref}",
                                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Docker-Content-Digest"] == digest
    wait_for(lambda: "Pushed" in event_reasons(cluster, namespace, "two-ranks"), timeout=30, message="Pushed event")

    env = {k: v for k, v in cluster.env.items() if not k.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-m", "kubetune", "pull", "two-ranks", "-n", namespace, "--digest",
                           "--quiet", "--to", str(tmp_path / "pulled")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"from oci://{reference}" in done.stderr
    pulled = {p.relative_to(tmp_path / "pulled").as_posix() for p in (tmp_path / "pulled").rglob("*")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "evaluation.json", "README.md",
            "manifest.json"} <= pulled
    assert not (tmp_path / "pulled" / "metrics.jsonl").exists(), "the artifact holds the adapter, not the whole run"
    visible = json.dumps(cluster.get("ftj,jobs,pods,events,configmaps", "-n", namespace)) + cluster.kubectl(
        "logs", "-n", namespace, "job/two-ranks-trainer").stdout
    assert password not in visible, "the registry password leaked"


def test_a_dpo_job_succeeds_with_its_rewards_in_status(cluster: Any, namespace: str, s3_secret: None,
                                                       operator: Any) -> None:
    """examples/dpo.yaml: preference pairs, the backbone as the reference, the rewards in status."""
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "dpo.yaml"))
    status = wait_phase(cluster, namespace, "dpo", "Succeeded", timeout=600)
    assert status["progress"]["step"] == 80
    rewards, held_out = status["metrics"]["rewards"], status["metrics"]["evalRewards"]
    # the training pairs since the last report: logEverySteps 5 x 8 pairs
    assert rewards["pairs"] == 40 and set(rewards) >= {"chosen", "rejected", "margin", "accuracy", "loss"}
    assert held_out["pairs"] == 32 and held_out["accuracy"] >= 0.75 and held_out["margin"] > 0
    assert status["dataset"]["samples"] == 256
    # generation metrics on the chosen answers, tuned vs the backbone
    assert status["evaluation"]["metrics"]["rouge"]["tuned"] > status["evaluation"]["metrics"]["rouge"]["base"]


def test_a_frozen_trainer_is_stalled_restarted_and_resumes(cluster: Any, namespace: str, s3_secret: None,
                                                           operator: Any, prometheus: Any) -> None:
    """training.stallTimeoutSeconds on the real node: the training container's processes are frozen
    (SIGSTOP, as a hung NCCL collective leaves them) after a checkpoint; the job turns Stalled
    (NoProgress) with a Warning Event and the chart's KubeTuneJobStalled alert fires in a real
    Prometheus scraping the operator; its pod is replaced, and the run resumes from the checkpoint
    to Succeeded with one stall restart."""
    from tests.support.faults import freeze, pod_processes

    prometheus.scrape(operator.report_url)
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"]["name"] = "frozen"
    # Checkpoints every 100 steps and one evaluation at the end: from step 105 on, the trainer trains
    # (its activity) for long enough that the freeze lands while it does.
    manifest["spec"]["training"].update(checkpointEverySteps=100, evalEverySteps=300, stallTimeoutSeconds=30)
    manifest["spec"]["resources"] = {"gpus": 0}
    cluster.apply(manifest, namespace)
    following = subprocess.Popen([sys.executable, "-m", "kubetune", "logs", "frozen", "-n", namespace, "-f"],
                                 env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def training_past_a_checkpoint() -> bool:
        status = cluster.get("ftj", "frozen", "-n", namespace).get("status") or {}
        assert status.get("phase") != "Succeeded", "finished before it could be frozen"
        progress = status.get("progress") or {}
        return status.get("phase") == "Running" and progress.get("activity") == "training" and \
            progress.get("step", 0) >= 105

    wait_for(lambda: cluster.get("pods", "-n", namespace, "-l", "job-name=frozen-trainer")["items"], timeout=300,
             message="the training pod")
    first = cluster.get("pods", "-n", namespace, "-l", "job-name=frozen-trainer")["items"][0]
    wait_for(training_past_a_checkpoint, timeout=600, interval=0.1, message="training past step 105")
    pids = pod_processes(first["metadata"]["uid"])
    assert pids, "the training container's processes on this machine"
    freeze(pids)  # between the checkpoint of step 100 and the next, with no evaluation before the end
    wait_for(lambda: prometheus.query(f'kubetune_finetunejob_progress_ratio{{namespace="{namespace}"}} > 0'),
             timeout=60, message="the running job's progress in Prometheus")

    def stalled() -> dict[str, Any]:
        status = cluster.get("ftj", "frozen", "-n", namespace)["status"]
        condition = next(c for c in status["conditions"] if c["type"] == "Stalled")
        return status if (condition["status"], condition["reason"]) == ("True", "NoProgress") else {}

    shown = wait_for(stalled, timeout=180, message="condition Stalled, reason NoProgress")
    assert "no training step for" in shown["message"] and "restarted" in shown["message"]
    assert "NoProgress" in event_reasons(cluster, namespace, "frozen")
    alert = wait_for(lambda: [a for a in prometheus.firing("KubeTuneJobStalled")
                              if a["labels"].get("namespace") == namespace], timeout=120,
                     message="the KubeTuneJobStalled alert firing")
    assert alert[0]["labels"]["severity"] == "warning"
    status = wait_phase(cluster, namespace, "frozen", "Succeeded", timeout=600)
    assert status["stallRestarts"] == 1 and status["progress"]["step"] == 300
    pods = cluster.get("pods", "-n", namespace, "-l", "job-name=frozen-trainer")["items"]
    assert first["metadata"]["uid"] not in {p["metadata"]["uid"] for p in pods}, "the frozen pod was replaced"
    following.kill()  # what `kubetune logs -f` printed across the restart is not checked yet
    following.communicate(timeout=30)
