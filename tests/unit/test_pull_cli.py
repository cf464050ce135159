"""`kubetune pull`'s decisions that need no cluster: which jobs it refuses, the store it reads, and the
serving snippets it prints (the download itself: tests/trainer/test_pull.py; end to end:
tests/e2e/test_quickstart.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import pull


class Jobs:
    """The one call `finished_job` makes, answered from a dict."""

    def __init__(self, **jobs: dict[str, Any]) -> None:
        self.jobs = jobs

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.jobs.get(name)


LOCATION = "s3://runs/ns/q/abcd1234"
DONE = {"spec": {"model": {"source": "hf://Org/Tiny"}, "storage": {"endpoint": "minio.svc:9000", "insecure": True,
                                                                     "secretRef": {"name": "s3"}}},
        "status": {"phase": "Succeeded", "artifacts": {"location": LOCATION, "merged": f"{LOCATION}/merged"}}}


@pytest.mark.parametrize(("name", "message"), [
    ("absent", "FineTuneJob ns/absent not found"),
    ("running", "FineTuneJob ns/running is Running; only a Succeeded job's outputs are complete"),
    ("new", "is not started"),
    ("empty", "has no status.artifacts.location"),
])
def test_only_a_succeeded_job_with_artifacts_is_pulled(name: str, message: str) -> None:
    kube = Jobs(running={"status": {"phase": "Running"}}, new={}, empty={"status": {"phase": "Succeeded"}})
    with pytest.raises(pull.PullError, match=message):
        pull.finished_job(kube, "ns", name)
    assert pull.finished_job(Jobs(done=DONE), "ns", "done") is DONE


def test_the_store_is_the_jobs_with_the_endpoint_as_seen_from_here() -> None:
    assert pull.storage_of(DONE, None, None).endpoint == "minio.svc:9000"
    here = pull.storage_of(DONE, "127.0.0.1:9000", False)
    assert (here.endpoint, here.insecure) == ("127.0.0.1:9000", False)


def test_serving_snippets_name_the_adapter_the_merged_model_and_the_pin(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 32}))
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    text = pull.serving("q", "ns", tmp_path, LOCATION, DONE, "d" * 64)
    assert f"vllm serve Org/Tiny --enable-lora --max-lora-rank 32 --lora-modules q={tmp_path / 'adapter'}" in text
    assert f"vllm serve {tmp_path / 'merged'} --served-model-name q" in text
    assert f"--location={LOCATION} --manifest-sha256=sha256:{'d' * 64}" in text
    service = yaml.safe_load(text.split("\n---\n", 1)[1])
    assert service["kind"] == "InferenceService" and service["metadata"]["annotations"] == {
        "kubetune.io/finetunejob": "ns/q", "kubetune.io/manifest-sha256": "d" * 64}
    assert service["spec"]["predictor"]["model"]["storageUri"] == f"{LOCATION}/merged"


OCI = {"repository": "reg.example:5000/team/a", "insecure": True}
PUSHED = {**DONE, "spec": {**DONE["spec"], "output": {"oci": OCI}},
          "status": {"phase": "Succeeded", "artifacts": {
              "location": LOCATION, "ociDigest": "sha256:" + "e" * 64,
              "ociReference": "reg.example:5000/team/a@sha256:" + "e" * 64}}}


def test_digest_pulls_the_jobs_oci_artifact_or_the_one_named() -> None:
    assert pull.oci_location(PUSHED, "", None) == (f"oci://reg.example:5000/team/a@sha256:{'e' * 64}", True)
    assert pull.oci_location(PUSHED, "f" * 64, False) == (f"oci://reg.example:5000/team/a@sha256:{'f' * 64}", False)
    with pytest.raises(pull.PullError, match="pushed no OCI artifact"):
        pull.oci_location(DONE, "", None)


def test_serving_snippets_pull_the_oci_artifact_by_digest(tmp_path: Path) -> None:
    text = pull.serving("q", "ns", tmp_path, LOCATION, PUSHED, "d" * 64)
    assert f"--location=oci://reg.example:5000/team/a@sha256:{'e' * 64} --manifest-sha256=sha256:{'d' * 64}" in text
