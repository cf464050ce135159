"""The GPU memory check before a Job is created: a job that cannot fit fails WontFit and holds no GPU.

The operator reads config.json without credentials, so the backbones here sit in a MinIO bucket that
allows anonymous reads. The trainer is the TEST DOUBLE (tests/e2e/fake_trainer.py): the local node's
GPUs are not real, and only what the operator does before and around the Job is under test.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import HostileConfigServer
from tests.support.helpers import wait_for
from tests.support.jobs import events, finetunejob, ftj, wait_phase

pytestmark = pytest.mark.e2e
MODELS = Path(__file__).resolve().parents[1] / "unit" / "models"
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 54}


@pytest.fixture
def public_models(minio_env: dict[str, str]) -> Iterator[str]:
    """A bucket readable without credentials with big/config.json (70B shape) and tiny/config.json."""
    from minio import Minio

    client = Minio(minio_env["MINIO_ENDPOINT"], access_key=minio_env["MINIO_ACCESS_KEY"],
                   secret_key=minio_env["MINIO_SECRET_KEY"], secure=False)
    bucket = f"public-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    client.set_bucket_policy(bucket, json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": ["*"]}, "Action": ["s3:GetObject"],
        "Resource": [f"arn:aws:s3:::{bucket}/*"]}]}))
    for name, body in (("big", (MODELS / "llama-70b" / "config.json").read_bytes()),
                       ("tiny", json.dumps(TINY).encode())):
        client.put_object(bucket, f"{name}/config.json", io.BytesIO(body), len(body))
    yield bucket
    for obj in client.list_objects(bucket, recursive=True):
        client.remove_object(bucket, obj.object_name or "")
    client.remove_bucket(bucket)


@pytest.fixture
def operator_env(minio_env: dict[str, str]) -> dict[str, str]:
    """MinIO as the default store (where the operator reads config.json); the TEST DOUBLE trainer."""
    return {"KUBETUNE_S3_ENDPOINT": minio_env["MINIO_ENDPOINT"], "KUBETUNE_S3_INSECURE": "true"}


def test_a_job_that_cannot_fit_fails_won_fit_before_any_job_exists(
        cluster: Any, namespace: str, operator: Any, public_models: str) -> None:
    cluster.apply(finetunejob("too-big", model={"source": f"s3://{public_models}/big/"},
                              resources={"gpus": 1, "gpuMemory": "80Gi", "sharedMemory": "64Mi"}), namespace)
    status = wait_phase(cluster, namespace, "too-big", "Failed", reason="WontFit")
    assert "does not fit in 80.0 GiB (resources.gpuMemory)" in status["message"]
    assert "quantization int4 (now none)" in status["message"]
    assert cluster.get("jobs", "-n", namespace)["items"] == []
    assert cluster.get("configmaps", "-n", namespace, "-l", "kubetune.io/job=too-big")["items"] == []
    wait_for(lambda: any(e["reason"] == "Failed" and e["message"].startswith("WontFit: estimated peak GPU memory")
                         for e in events(cluster, namespace, "too-big")),
             timeout=30, message="a Failed event with the estimate")


def test_a_job_that_fits_runs(cluster: Any, namespace: str, operator: Any, public_models: str) -> None:
    cluster.apply(finetunejob("fits", model={"source": f"s3://{public_models}/tiny/"},
                              resources={"gpus": 1, "gpuMemory": "24Gi", "sharedMemory": "64Mi"}), namespace)
    wait_phase(cluster, namespace, "fits", "Succeeded")
    estimated = [e for e in events(cluster, namespace, "fits") if e["reason"] == "Estimated"]
    assert estimated and "fits in 24.0 GiB" in estimated[0]["message"]


def test_a_config_the_operator_cannot_read_skips_the_check(cluster: Any, namespace: str, operator: Any) -> None:
    # s3://models/tiny/ is private: the operator has no credentials, says so, and lets the trainer check.
    cluster.apply(finetunejob("private", resources={"gpus": 1, "gpuMemory": "1Mi", "sharedMemory": "64Mi"}),
                  namespace)
    wait_phase(cluster, namespace, "private", "Succeeded")
    skipped = [e for e in events(cluster, namespace, "private") if e["reason"] == "EstimateSkipped"]
    assert skipped and "HTTP 403" in skipped[0]["message"]


def test_an_out_of_memory_fails_at_once_without_retries(cluster: Any, namespace: str, operator: Any) -> None:
    message = ("out of accelerator memory during step 3: CUDA out of memory (estimated peak 21.3 GiB per GPU: "
               "weights 14.9, activations 1.0, logits 3.0 GiB). To fit, try quantization int4 (now none)")
    env = [{"name": "FAKE_EXIT_CODE", "value": "6"}, {"name": "FAKE_MESSAGE", "value": message}]
    cluster.apply(finetunejob("oom", backoffLimit=3, resources={"gpus": 1, "sharedMemory": "64Mi"}, env=env),
                  namespace)
    status = wait_phase(cluster, namespace, "oom", "Failed")
    assert status["reason"] == "OutOfMemory"
    assert "estimated peak 21.3 GiB" in status["message"] and "quantization int4" in status["message"]
    assert status["attempts"] == 1, "an out-of-memory must not be retried"


HOSTILE_REASONS = {
    "drip": "no complete answer within 5s",
    "drip-headers": "no complete answer within 5s",
    "redirect": "HTTP 302 redirect, not followed",
    "nested": "nested too deeply",
    "huge-int": "not JSON",
    "huge-dims": "hidden_size is larger than 2147483648",
}


@pytest.fixture
def hostile() -> Iterator[HostileConfigServer]:
    server = HostileConfigServer(drip_every=0.5)
    yield server
    server.close()


def test_no_tenant_can_stall_the_operator_through_the_estimate(cluster: Any, namespace: str, operator: Any,
                                                               hostile: HostileConfigServer) -> None:
    # 16 dripping servers once took every reconcile worker (kopf's 16): now each read is bounded and
    # runs off the reconcile path, so a job applied after them gets its Job as usual.
    names = [*(["drip", "drip-headers"] * 8), "redirect", "nested", "huge-int", "huge-dims"]
    for i, name in enumerate(names):
        cluster.apply(finetunejob(f"hostile-{i}", suspend=True, model={"source": f"s3://m/{name}/"},
                                  storage={"endpoint": hostile.endpoint, "insecure": True},
                                  resources={"gpus": 1, "gpuMemory": "80Gi", "sharedMemory": "64Mi"}), namespace)
    wait_for(lambda: len(hostile.requests) >= 4, timeout=60, message="the estimates reading from the hostile server")
    cluster.apply(finetunejob("ordinary"), namespace)
    wait_for(lambda: cluster.kubectl("get", "job", "ordinary-trainer", "-n", namespace, check=False).returncode == 0,
             timeout=30, message="the ordinary job's Job while the hostile estimates are pending")
    assert any(n.startswith("/m/drip") for n in hostile.requests)

    def skipped(i: int) -> str | None:
        found = [e["message"] for e in events(cluster, namespace, f"hostile-{i}") if e["reason"] == "EstimateSkipped"]
        return found[0] if found else None

    for i, name in enumerate(names):
        message = wait_for(lambda i=i: skipped(i), timeout=120, message=f"EstimateSkipped of hostile-{i} ({name})")
        assert HOSTILE_REASONS[name] in message, message
        # the job goes on: its (suspended) Job exists, and the trainer checks the device itself
        wait_for(lambda i=i: ftj(cluster, namespace, f"hostile-{i}")["status"]["phase"] == "Suspended",
                 timeout=30, message=f"hostile-{i} created its Job")
    assert not [r for r in hostile.requests if r.startswith("/m/tiny")], "a redirect was followed"
