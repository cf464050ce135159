"""The Argo CD health check of FineTuneJob in examples/argocd-application.yaml, run by a real Lua.

Argo CD evaluates health scripts with gopher-lua, a Lua 5.1 implementation, and hands the live
object to the script as the global ``obj``; the tests do the same with lupa's Lua 5.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa.lua51 import LuaRuntime

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "argocd-application.yaml"
HEALTH_KEY = "resource.customizations.health.kubetune.io_FineTuneJob"


def health_script() -> str:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "argocd-cm")
    script: str = config_map["data"][HEALTH_KEY]
    return script


def to_lua(lua: Any, value: Any) -> Any:
    """Python dicts and lists as Lua tables (lists 1-indexed), recursively."""
    if isinstance(value, dict):
        return lua.table_from({key: to_lua(lua, item) for key, item in value.items()})
    if isinstance(value, list):
        return lua.table_from([to_lua(lua, item) for item in value])
    return value


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) that the health script returns for a FineTuneJob."""
    lua = LuaRuntime()
    lua.globals().obj = to_lua(lua, obj)
    result = lua.execute(health_script())
    return result["status"], result["message"]


def job(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "llama", "namespace": "team-a", "generation": generation},
        "spec": {"model": {"source": "hf://org/model"}, "dataset": {"train": "s3://data/train.jsonl"},
                 "output": {"location": "s3://runs/"}},
    }
    if status is not None:
        body["status"] = status
    return body


def observed(phase: str, message: str = "", generation: int = 1, **fields: Any) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if phase == "Succeeded" else "False", "reason": phase,
                   "message": message, "lastTransitionTime": "2025-01-01T00:00:00Z",
                   "observedGeneration": generation}]
    return {"phase": phase, "reason": phase, "message": message, "observedGeneration": generation,
            "conditions": conditions, **fields}


def test_succeeded_is_healthy() -> None:
    assert health(job(observed("Succeeded", "training finished"))) == ("Healthy", "training finished")


def test_running_is_progressing_with_percent() -> None:
    status = observed("Running", "training: step 420/1000", progress={"step": 420, "totalSteps": 1000, "percent": 42})
    assert health(job(status)) == ("Progressing", "training: step 420/1000 (42%)")


@pytest.mark.parametrize("phase", ["Pending", "Queued", "Running", "Preempted"])
def test_waiting_and_running_phases_are_progressing(phase: str) -> None:
    message = f"{phase.lower()} for a reason"
    assert health(job(observed(phase, message))) == ("Progressing", message)


def test_queued_names_kueue_admission() -> None:
    status = observed("Queued", "waiting for Kueue to admit the job")
    assert health(job(status)) == ("Progressing", "waiting for Kueue to admit the job")


def test_failed_is_degraded_with_the_status_message() -> None:
    status = observed("Failed", "dataset s3://data/train.jsonl has no column 'answer'")
    assert health(job(status)) == ("Degraded", "dataset s3://data/train.jsonl has no column 'answer'")


def test_suspended_is_suspended() -> None:
    status = observed("Suspended", "suspended: set spec.suspend=false to resume")
    assert health(job(status)) == ("Suspended", "suspended: set spec.suspend=false to resume")


def test_no_status_yet_is_progressing() -> None:
    assert health(job()) == ("Progressing", "Waiting for the operator to pick up the FineTuneJob")


def test_status_without_phase_is_progressing() -> None:
    assert health(job({}))[0] == "Progressing"


def test_stale_observed_generation_is_progressing_even_when_succeeded() -> None:
    status = observed("Succeeded", "training finished", generation=1)
    assert health(job(status, generation=2)) == ("Progressing", "Waiting for the operator to observe generation 2")


def test_missing_observed_generation_is_progressing() -> None:
    status = observed("Running", "training")
    del status["observedGeneration"]
    assert health(job(status))[0] == "Progressing"


def test_empty_message_falls_back_to_the_phase() -> None:
    assert health(job(observed("Failed", ""))) == ("Degraded", "Failed")


def test_unknown_phase_is_unknown() -> None:
    assert health(job(observed("Exploded", "?"))) == ("Unknown", "Unknown phase Exploded")
