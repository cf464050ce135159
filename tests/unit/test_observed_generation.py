"""status.observedGeneration advances only for edits the running Job takes."""

from __future__ import annotations

import copy
from typing import Any

from kubetune import render
from kubetune.plan import applied_generation

SPEC: dict[str, Any] = {"model": {"source": "s3://m/"}, "resources": {"gpus": 1}, "suspend": False}


def ftj(generation: int, observed: int | None = None, **changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec.update(changes)
    status = {"observedGeneration": observed} if observed else {}
    return {"metadata": {"name": "j", "generation": generation}, "spec": spec, "status": status}


def job_made_from(owner: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"annotations": {render.SPEC_HASH_ANNOTATION: render.spec_hash(owner),
                                         render.GENERATION_ANNOTATION: str(owner["metadata"]["generation"])}}}


def test_suspend_and_ttl_edits_are_observed() -> None:
    job = job_made_from(ftj(1))
    assert applied_generation(ftj(2, observed=1, suspend=True), job) == 2
    assert applied_generation(ftj(3, observed=2, suspend=True, ttlSecondsAfterFinished=60), job) == 3


def test_an_edit_the_running_job_cannot_take_is_not_observed() -> None:
    job = job_made_from(ftj(1))
    assert applied_generation(ftj(2, observed=1, resources={"gpus": 4}), job) == 1
    assert applied_generation(ftj(3, observed=1, resources={"gpus": 4}, suspend=True), job) == 1
    assert applied_generation(ftj(4, observed=1), job) == 4  # reverted: the Job runs the current spec
