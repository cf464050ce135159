"""reconcile.Reconciler with watch caches: a pass that would change nothing makes no API request; one
that acts does so on the cached FineTuneJob, unless the cache lags a status the operator wrote or the
pass would create children: then it reads the FineTuneJob afresh first."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune.reconcile import Reconciler
from kubetune.settings import Settings

Json = dict[str, Any]
UID = "11111111-2222-3333-4444-555555555555"


def finetunejob(status: Json | None = None) -> Json:
    return {"metadata": {"name": "job", "namespace": "ns", "uid": UID, "generation": 1},
            "spec": {"model": {"source": "s3://m/tiny/"}, "dataset": {"train": "s3://d/train.jsonl"},
                     "training": {"maxSteps": 10}, "output": {"location": "s3://runs/"},
                     "resources": {"gpus": 0}},
            "status": status or {}}


def training_job() -> Json:
    return {"metadata": {"name": "job-trainer", "namespace": "ns", "uid": "job-uid",
                         "ownerReferences": [{"uid": UID}], "annotations": {}},
            "spec": {}, "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}


def pod(phase: str) -> Json:
    return {"metadata": {"name": "job-trainer-abc", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": phase}}


class Cache:
    """The watch caches, as plain data (handlers.CachedChildren reads kopf indices the same way)."""

    def __init__(self, ftj: Json, job: Json, pods: list[Json]) -> None:
        self.ftj, self.job, self.pods = ftj, job, pods

    def get_finetunejob(self, namespace: str, name: str) -> Json | None:
        return self.ftj

    def get_job(self, namespace: str, name: str) -> Json | None:
        return self.job

    def list_pods(self, namespace: str, job: Json) -> list[Json]:
        return self.pods


class RecordingKube:
    """TEST DOUBLE for kube.Kube: answers from `stored` and records every call."""

    def __init__(self, stored: Json) -> None:
        self.stored = stored
        self.calls: list[str] = []

    def get_finetunejob(self, namespace: str, name: str) -> Json:
        self.calls.append("get_finetunejob")
        return copy.deepcopy(self.stored)

    def patch_status(self, namespace: str, name: str, status: Json) -> None:
        self.calls.append("patch_status")
        self.stored["status"] = {**self.stored["status"], **status}

    def event(self, owner: Json, kind: str, reason: str, message: str) -> None:
        self.calls.append(f"event {reason}")

    def get_namespace(self, name: str) -> Json:
        self.calls.append("get_namespace")
        return {"metadata": {"name": name}}


def settled(pods: list[Json]) -> tuple[RecordingKube, Cache, Reconciler]:
    """A reconciler with watch caches after one full pass, its status written and seen on the watch."""
    kube = RecordingKube(finetunejob())
    cache = Cache(finetunejob(), training_job(), pods)
    reconciler = Reconciler(kube, Settings())  # type: ignore[arg-type]
    reconciler.cache = cache
    reconciler("ns", "job")
    cache.ftj = copy.deepcopy(kube.stored)  # the watch brings the written status back
    kube.calls.clear()
    return kube, cache, reconciler


def test_a_pass_with_nothing_to_change_makes_no_request_and_a_change_is_written_from_the_cache() -> None:
    kube, cache, reconciler = settled([pod("Pending")])
    assert kube.stored["status"]["phase"] == "Pending"

    reconciler("ns", "job")  # e.g. a Pod event that changed nothing the status shows
    assert kube.calls == []

    cache.pods = [pod("Running")]
    reconciler("ns", "job")
    assert kube.calls == ["patch_status", "event Started"], "no read of the FineTuneJob: the cache is current"
    assert kube.stored["status"]["phase"] == "Running"


def test_a_stale_cached_status_leads_to_a_fresh_read_not_a_blind_write() -> None:
    kube, cache, reconciler = settled([pod("Pending")])
    cache.pods = [pod("Running")]
    reconciler("ns", "job")  # writes Running
    kube.calls.clear()
    reconciler("ns", "job")  # the watch has not brought the write back: the cache still shows Pending
    assert kube.calls == ["get_finetunejob"], "the fresh read shows the status is current: no second write"


def test_fresh_passes_always_read_the_finetunejob() -> None:
    kube, _cache, reconciler = settled([pod("Pending")])
    reconciler("ns", "job", fresh=True)  # the resync timer
    assert kube.calls == ["get_finetunejob"]


def test_a_job_without_its_training_job_is_never_settled_from_the_cache() -> None:
    kube = RecordingKube(finetunejob({"phase": "Pending", "reason": "Starting"}))
    cache = Cache(finetunejob({"phase": "Pending", "reason": "Starting"}), training_job(), [])
    cache.job = None  # type: ignore[assignment]
    reconciler = Reconciler(kube, Settings())  # type: ignore[arg-type]
    reconciler.cache = cache
    with pytest.raises(AttributeError):  # the test double stops the pass at its first create-path call
        reconciler("ns", "job")
    assert kube.calls == ["get_namespace", "get_finetunejob"], \
        "children are created only after a fresh read (the namespace read for the plan is not repeated)"


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_job_stays_finished_beside_a_job_of_its_name_it_does_not_own(phase: str) -> None:
    # `kubectl create job --from=job/job-trainer`, or a name built to collide: not the FineTuneJob's.
    done = {"phase": phase, "reason": phase, "completionTime": "2026-01-01T01:00:00Z", "observedGeneration": 1}
    stranger = {**training_job(), "metadata": {**training_job()["metadata"], "ownerReferences": []}}
    kube = RecordingKube(finetunejob(done))
    reconciler = Reconciler(kube, Settings())  # type: ignore[arg-type]
    reconciler.cache = Cache(finetunejob(done), stranger, [])
    reconciler("ns", "job", fresh=True)
    assert kube.stored["status"] == done, "no NameConflict, no Pending"
    reconciler.cache.job = None  # the stranger is gone: nothing is created again (RecordingKube cannot create)
    reconciler("ns", "job", fresh=True)
    assert kube.stored["status"] == done
    assert kube.calls == ["get_finetunejob", "get_finetunejob"]
