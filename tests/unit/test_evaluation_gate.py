"""The promotion gate: its verdict on the evaluated metrics, the Promotable condition, failJob, and
how Argo CD's health check and kstatus-based tools (Flux, kubectl wait) see a failed gate."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune import status
from kubetune.api import Phase
from kubetune_contract.config import EvaluationSpec, GateSpec
from kubetune_contract.events import UNAVAILABLE_MAX, Evaluation, EvaluationMetrics, check_gate
from tests.unit.test_argocd_health import health
from tests.unit.test_argocd_health import job as argo_job

NOW = "2026-01-01T00:10:00Z"
METRICS = {"bleu": {"tuned": 31.5, "base": 12.0, "delta": 19.5, "samples": 64},
           "exactMatch": {"tuned": 0.42, "base": 0.40, "delta": 0.02, "samples": 64},
           "perplexity": {"tuned": 6.1, "base": 9.3, "delta": -3.2},
           "judge": {"samples": 64, "unavailable": "http://judge:8000/v1 answered HTTP 500"}}


def gate(*rules: dict[str, Any], fail_job: bool = False) -> GateSpec:
    return GateSpec.model_validate({"rules": list(rules), "failJob": fail_job})


@pytest.mark.parametrize(("rule", "passed", "message"), [
    ({"metric": "bleu", "min": 20}, True, "every gate rule holds (1)"),
    ({"metric": "bleu", "min": 40}, False, "bleu 31.5 < min 40"),
    ({"metric": "perplexity", "max": 8}, True, ""),
    ({"metric": "perplexity", "max": 5}, False, "perplexity 6.1 > max 5"),
    ({"metric": "perplexity", "minImprovement": 3}, True, ""),  # lower is better: base - tuned = 3.2
    ({"metric": "perplexity", "minImprovement": 4}, False, "perplexity improved by 3.2 (tuned 6.1, base 9.3)"),
    ({"metric": "exactMatch", "minImprovement": 0.05}, False, "exactMatch improved by 0.02 (tuned 0.42, base 0.4)"),
    ({"metric": "judge", "min": 5}, False, "judge is unavailable (http://judge:8000/v1 answered HTTP 500)"),
    ({"metric": "rouge", "min": 0.1}, False, "rouge is unavailable (not computed)"),
])
def test_gate_verdict(rule: dict[str, Any], passed: bool, message: str) -> None:
    verdict = check_gate(gate(rule), EvaluationMetrics.model_validate(METRICS))
    assert verdict.passed is passed
    assert message in verdict.message


def test_every_failing_rule_is_named_with_its_values() -> None:
    verdict = check_gate(gate({"metric": "bleu", "min": 40}, {"metric": "exactMatch", "min": 0.5},
                              {"metric": "perplexity", "max": 8}), EvaluationMetrics.model_validate(METRICS))
    assert verdict.message == "gate failed: bleu 31.5 < min 40; exactMatch 0.42 < min 0.5"


def succeeded(evaluation: dict[str, Any] | None) -> status.Observed:
    summary = {"step": 10, "totalSteps": 10, "artifacts": {"location": "s3://runs/ns/j/"}}
    if evaluation is not None:
        summary["evaluation"] = evaluation
    return status.Observed(Phase.SUCCEEDED, "Succeeded", "training finished", completion_time=NOW, summary=summary)


def built(observed: status.Observed, spec_gate: GateSpec | None, previous: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    return status.as_patch(status.build_status(observed, previous=previous or {}, generation=1, job_name="j", now=NOW,
                                               gate=spec_gate))


def conditions(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in result["conditions"]}


def test_a_passed_gate_is_promotable_and_ready() -> None:
    result = built(succeeded({"metrics": METRICS, "headline": "bleu 31.5 (base 12)"}),
                   gate({"metric": "bleu", "min": 20}))
    assert result["phase"] == "Succeeded"
    assert result["evaluation"]["headline"] == "bleu 31.5 (base 12)"
    assert result["evaluation"]["gate"] == {"passed": True, "message": "every gate rule holds (1)"}
    got = conditions(result)
    assert got["Promotable"] == ("True", "GatePassed")
    assert got["Ready"] == ("True", "Succeeded") and got["Stalled"][0] == "False"
    assert health(argo_job(result))[0] == "Healthy"


def test_a_failed_gate_leaves_the_job_succeeded_but_not_promotable_nor_healthy() -> None:
    result = built(succeeded({"metrics": METRICS}), gate({"metric": "bleu", "min": 40}))
    assert result["phase"] == "Succeeded" and result["reason"] == "Succeeded"
    got = conditions(result)
    assert got["Promotable"] == ("False", "EvaluationGateFailed")
    # kstatus: Stalled True is Failed, Ready False is not Current; kubectl wait --for=condition=Ready times out
    assert got["Ready"] == ("False", "EvaluationGateFailed") and got["Stalled"] == ("True", "EvaluationGateFailed")
    state, message = health(argo_job(result))
    assert state == "Degraded" and "bleu 31.5 < min 40" in message


def test_fail_job_makes_a_failed_gate_fail_the_job() -> None:
    result = built(succeeded({"metrics": METRICS}), gate({"metric": "bleu", "min": 40}, fail_job=True))
    assert (result["phase"], result["reason"]) == ("Failed", "EvaluationGateFailed")
    assert "bleu 31.5 < min 40" in result["message"] and result["completionTime"] == NOW
    assert conditions(result)["Stalled"] == ("True", "EvaluationGateFailed")
    assert health(argo_job(result))[0] == "Degraded"


def test_a_run_that_reported_no_evaluation_is_not_promotable() -> None:
    result = built(succeeded(None), gate({"metric": "bleu", "min": 1}))
    assert conditions(result)["Promotable"] == ("False", "EvaluationGateFailed")
    assert "reported no evaluation results" in result["evaluation"]["gate"]["message"]


def test_the_verdict_holds_once_the_pods_are_gone() -> None:
    """The summary comes from the pod's termination message; later passes keep the status's evaluation."""
    first = built(succeeded({"metrics": METRICS}), gate({"metric": "bleu", "min": 20}))
    again = built(status.Observed(Phase.SUCCEEDED, "Succeeded", "training finished", completion_time=NOW),
                  gate({"metric": "bleu", "min": 20}), previous=first)
    assert conditions(again)["Promotable"] == ("True", "GatePassed")


def test_without_a_gate_there_is_no_promotable_condition() -> None:
    result = built(succeeded({"metrics": METRICS}), None)
    assert "Promotable" not in conditions(result) and result["evaluation"]["metrics"]["bleu"]["tuned"] == 31.5


def test_the_evaluation_fits_the_termination_message() -> None:
    """Five metrics with the longest reasons and the headline leave room in the 4 KiB termination
    message for the rest of the summary (the gate's verdict is the operator's to compute)."""
    long = {"tuned": 1.234567, "base": 2.345678, "delta": -1.111111, "samples": 2000,
            "unavailable": "x" * UNAVAILABLE_MAX}
    evaluation = Evaluation.model_validate({"metrics": {m: long for m in ("perplexity", "bleu", "rouge", "exactMatch",
                                                                          "judge")}, "headline": "h" * 128})
    assert len(json.dumps(evaluation.model_dump(by_alias=True, exclude_none=True))) < 2000


def test_the_default_metrics_are_the_ones_the_cel_rule_assumes() -> None:
    from kubetune_contract import rules

    assert EvaluationSpec().metrics == list(rules.DEFAULT_EVAL_METRICS)
    assert f"r.metric in {list(rules.DEFAULT_EVAL_METRICS)}" in rules.GATE_METRIC_LISTED.cel
