"""A FineTuneJob over several pods, with the real trainer: an Indexed Job and a headless Service,
torchrun's rendezvous at pod 0, one progress in status, one published run; a deleted pod
restarts the whole group, which resumes from its newest checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helpers import wait_for
from tests.support.jobs import ftj, published, train_steps, wait_phase

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


@pytest.fixture
def operator_env(real_trainer_env: dict[str, str]) -> dict[str, str]:
    return real_trainer_env


def two_by_two(name: str, steps: int, checkpoint_every: int) -> dict[str, Any]:
    """The quickstart over two pods of two CPU processes each (a world of four)."""
    manifest: dict[str, Any] = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["training"].update(maxSteps=steps, evalEverySteps=steps, checkpointEverySteps=checkpoint_every,
                                        logEverySteps=5)
    manifest["spec"]["resources"] = {"gpus": 0, "sharedMemory": "256Mi",
                                     "distribution": {"nodes": 2, "processesPerNode": 2}}
    return manifest


def test_two_pods_of_two_processes_train_as_one_run(cluster: Any, namespace: str, s3_secret: None,
                                                     minio_env: dict[str, str], operator: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.apply(two_by_two("two-nodes", steps=30, checkpoint_every=15), namespace)
    status = wait_phase(cluster, namespace, "two-nodes", "Succeeded", timeout=900)
    assert status["progress"]["step"] == 30 and status["attempts"] == 1

    job = cluster.get("job", "two-nodes-trainer", "-n", namespace)
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    service = cluster.get("service", "two-nodes-trainer", "-n", namespace)
    assert service["spec"]["clusterIP"] == "None"
    pods = cluster.get("pods", "-n", namespace, "-l", "job-name=two-nodes-trainer")["items"]
    assert sorted(p["spec"]["hostname"] for p in pods) == ["two-nodes-trainer-0", "two-nodes-trainer-1"]
    logs = "".join(cluster.kubectl("logs", "-n", namespace, p["metadata"]["name"]).stdout for p in pods)
    assert all(f"rank {rank} of 4" in logs for rank in range(4)), logs[-3000:]

    steps = train_steps(published(status, minio_env, monkeypatch))
    assert steps == sorted(set(steps)) and steps[-1] == 30


@pytest.mark.parametrize("index", [0, 1], ids=["rendezvous-host", "peer"])
def test_a_deleted_pod_restarts_the_group_which_resumes(index: int, cluster: Any, namespace: str, s3_secret: None,
                                                        minio_env: dict[str, str], operator: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.apply(two_by_two("regroup", steps=60, checkpoint_every=10), namespace)

    def past_a_checkpoint() -> bool:
        status = ftj(cluster, namespace, "regroup").get("status") or {}
        assert status.get("phase") not in ("Failed", "Succeeded"), f"ended before the pod was deleted: {status}"
        return int((status.get("progress") or {}).get("step") or 0) >= 15

    wait_for(past_a_checkpoint, timeout=600, interval=0.2, message="training past the checkpoint of step 10")
    cluster.kubectl("delete", "pod", "-n", namespace, "-l", f"job-name=regroup-trainer,{INDEX_LABEL}={index}",
                    "--wait=false")

    status = wait_phase(cluster, namespace, "regroup", "Succeeded", timeout=900)
    assert status["progress"]["step"] == 60
    assert status["attempts"] == 2  # one restart of the group, not one per pod

    pods = cluster.get("pods", "-n", namespace, "-l", "job-name=regroup-trainer")["items"]
    # Both indexes ran again (the deleted pod is gone; its peer failed with it).
    assert len(pods) == 3, [(p["metadata"]["name"], p["status"].get("phase")) for p in pods]
    logs = "".join(cluster.kubectl("logs", "-n", namespace, p["metadata"]["name"]).stdout for p in pods)
    resumed = [int(line.rsplit("resuming from step ", 1)[1].split()[0]) for line in logs.splitlines()
               if "resuming from step " in line]
    assert resumed and len(set(resumed)) == 1 and resumed[0] >= 10, resumed  # every rank, the same checkpoint

    # The published history is one run: no step after the resume point was trained twice.
    steps = train_steps(published(status, minio_env, monkeypatch))
    assert steps == sorted(set(steps)) and steps[-1] == 60, steps
