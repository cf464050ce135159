"""Every limit of kubetune/policy.py, on every one of its cases: the chart's admission policy (its
variables, then the validation), evaluated in the API server's own CEL environment, admits or refuses
the job as the case says, and the operator's check of the effective spec (presets.violations, and
presets.selects for a ClusterFineTunePreset's namespaceSelector) names the same limits."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from devcluster import cel
from kubetune import api, crd, policy, presets
from kubetune.policy import CLUSTER, Case, Limit

KINDS = (presets.KIND, CLUSTER)
BASE_SPEC: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "quantization": "none",
    "output": {"location": "s3://runs/"},
}
CASES = [pytest.param(kind, limit, case, id=f"{kind}-{limit.name}-{i}-{'ok' if case.ok else 'refused'}")
         for kind in KINDS for limit in policy.LIMITS if kind == CLUSTER or not limit.cluster_only
         for i, case in enumerate(limit.cases)]
LIMIT_NAME = re.compile(r"limits\.\w+|spec\.namespaceSelector")


def filled(text: str, kind: str, unlisted: bool = True) -> str:
    return text.replace("{kind}", kind).replace("{unlisted}", str(unlisted).lower())


def activation(kind: str, case: Case) -> dict[str, Any]:
    job = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
           "metadata": {"name": "job", "namespace": "team"},
           "spec": {**BASE_SPEC, **case.spec, "preset": {"kind": kind, "name": "p"}}}
    spec: dict[str, Any] = {"limits": case.limits, "defaults": case.defaults or {}}
    if case.selector is not None:
        spec["namespaceSelector"] = case.selector
    return {"object": job, "oldObject": None, "request": {"operation": "CREATE"},
            "params": {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": kind, "metadata": {"name": "p"},
                       "spec": spec},
            "namespaceObject": {"metadata": {"name": "team", "labels": case.labels or {}, "annotations": {}}}}


def policy_of(kind: str) -> tuple[list[list[str]], list[Limit]]:
    """The variables and the limits of the policy for this preset kind."""
    return ([[v.name, filled(v.expression, kind)] for v in policy.VARIABLES if kind == CLUSTER or not v.cluster_only],
            [lim for lim in policy.LIMITS if kind == CLUSTER or not lim.cluster_only])


def admission(kind: str, case: Case, unlisted: bool = True) -> list[str]:
    """The messages of the validations the policy of this kind refuses the case with."""
    variables, limits = policy_of(kind)
    context = activation(kind, case)
    verdicts = cel.evaluate([{"expression": filled(policy.expression(lim), kind, unlisted), "activation": context,
                              "variables": variables} for lim in limits])
    assert not [r for r in verdicts if r.get("error")], verdicts
    assert all(isinstance(v["value"], bool) for v in verdicts), verdicts
    refused = [lim for lim, v in zip(limits, verdicts, strict=True) if not v["value"]]
    # the API server evaluates a messageExpression only for a validation that fails
    messages = cel.evaluate([{"expression": filled(lim.message, kind), "activation": context, "variables": variables}
                             for lim in refused])
    assert not [r for r in messages if r.get("error")], messages
    return [m["value"] for m in messages]


def operator_check(kind: str, case: Case) -> list[str]:
    """What the operator says of the job under the preset (reason PolicyViolation), or []."""
    context = activation(kind, case)
    preset = context["params"]
    if not presets.selects(preset, context["namespaceObject"]):
        return ["spec.preset: not selected by its spec.namespaceSelector"]
    raw = context["object"]["spec"]
    defaults = presets.preset_defaults(preset)
    spec = api.FineTuneJobSpec.model_validate(presets.effective_spec(raw, defaults))
    limits = presets.PresetLimits.model_validate(case.limits)
    return presets.violations(spec, raw, limits, preset=f"{kind}/p", restrict_images_and_accounts=False,
                              defaults=defaults)


@pytest.mark.parametrize(("kind", "limit", "case"), CASES)
def test_the_policy_and_the_operator_agree_on_each_case(kind: str, limit: Limit, case: Case) -> None:
    refused = admission(kind, case)
    assert (not refused) == case.ok, refused or f"admitted: {case}"
    found = operator_check(kind, case)
    assert (not found) == case.ok, found or f"the operator admits {case}"
    assert {n for m in refused for n in LIMIT_NAME.findall(m)} == {n for m in found for n in LIMIT_NAME.findall(m)}, (
        refused, found)


@pytest.mark.parametrize("kind", KINDS)
def test_a_preset_that_is_not_the_jobs_has_no_say(kind: str) -> None:
    case = Case({"image": "evil/x:1"}, {"allowedImages": ["registry.local/"], "maxGpusPerNode": 0}, ok=False)
    assert admission(kind, case)
    context = activation(kind, case)
    context["object"]["spec"]["preset"]["name"] = "another"
    variables, limits = policy_of(kind)
    results = cel.evaluate([{"expression": filled(policy.expression(lim), kind), "activation": context,
                             "variables": variables} for lim in limits])
    assert all(r.get("value") is True for r in results), results


def test_restricted_images_need_a_list() -> None:
    """admissionPolicy.restrictImagesAndServiceAccounts: an empty allowedImages admits no chosen image."""
    case = Case({"image": "evil/img:1"}, {"allowedImages": []}, ok=False)
    assert admission(presets.KIND, case, unlisted=True) == []
    refused = admission(presets.KIND, case, unlisted=False)
    assert len(refused) == 1 and "allows no user-chosen image" in refused[0]


def test_every_limit_has_a_case_it_admits_and_one_it_refuses() -> None:
    assert [lim.name for lim in policy.LIMITS if {c.ok for c in lim.cases} != {True, False}] == []
    assert len({lim.name for lim in policy.LIMITS}) == len(policy.LIMITS)


def test_every_limit_of_a_preset_is_checked_at_apply_time() -> None:
    """Each field of limits appears in some validation of the policy (a new limit needs one here)."""
    text = "\n".join(lim.expression for lim in policy.LIMITS)
    fields = presets.PresetLimits.model_json_schema(by_alias=True)["properties"]
    assert [f for f in fields if f"limits.?{f}" not in text and f"limits.{f}" not in text] == []


def test_the_chart_holds_the_generated_policy() -> None:
    rendered = (crd.REPO / crd.OUTPUTS["policy"]).read_text()  # the chart's file as committed
    assert "Do not edit" in rendered
    # Helm's own actions aside, the template is YAML that holds every limit's expression and message.
    body = re.sub(r"\{\{-? /\*.*?\*/ ?\}\}", "", rendered, flags=re.DOTALL)
    body = re.sub(r"^\s*\{\{-.*\}\}$", "", body, flags=re.MULTILINE)
    body = body.replace("{{ $kind }}", "K").replace("{{ not $restrict }}", "R")
    body = re.sub(r"\{\{.*?\}\}", "x", body)
    held = {(" ".join(v["expression"].split()), " ".join(v["messageExpression"].split()))
            for d in yaml.safe_load_all(body) if d and d["kind"] == "ValidatingAdmissionPolicy"
            for v in d["spec"]["validations"] if "messageExpression" in v}
    for limit in policy.LIMITS:
        expected = (" ".join(policy.expression(limit).replace("{kind}", "K").replace("{unlisted}", "R").split()),
                    " ".join(limit.message.replace("{kind}", "K").split()))
        assert expected in held, limit.name
