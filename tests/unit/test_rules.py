"""Every rule of kubetune/rules.py, on every one of its cases: the CEL the CRD carries, evaluated in the
API server's own CEL environment (devcluster/cel.py), says what the case says; the pydantic models
(the operator's check, and the trainer's for the run's rules) agree, with the same message. No
cluster: parity between apply time and the operator no longer needs an e2e run."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from devcluster import cel
from kubetune import api, crd, rules
from kubetune_contract.config import TrainerConfig
from kubetune_contract.rules import RUN_RULES, Case, Rule

BASE_SPEC: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "training": {},
    "lora": {"enabled": True, "targetModules": ["all-linear"]},
    "quantization": "none",
    "output": {"location": "s3://runs/", "mergeAdapter": False},
}
CASES = [pytest.param(rule, case, id=f"{rule.name}-{i}-{'ok' if case.ok else 'refused'}")
         for rule in rules.ALL for i, case in enumerate(rule.cases)]


def merged(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in patch.items()}}
    return copy.deepcopy(patch)


def job_of(case: Case) -> dict[str, Any]:
    return {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
            "metadata": {"name": case.name, "namespace": "team"}, "spec": merged(BASE_SPEC, case.spec)}


def values_at(obj: Any, place: str) -> list[Any]:
    """What `self` is at a rule's place: nothing where the field is unset (the API server then
    evaluates nothing), each item for a list (``[]``)."""
    found = [obj]
    for part in filter(None, place.split(".")):
        found = [v[part.removesuffix("[]")] for v in found if isinstance(v, dict) and part.removesuffix("[]") in v]
        if part.endswith("[]"):
            found = [item for v in found for item in v]
    return found


def cel_verdict(rule: Rule, job: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the API server accepts the job under this rule, and the messages it would give."""
    selves = [value for place in rule.at for value in values_at(job, place)]
    requests = [{"expression": rule.cel, "activation": {"self": value}} for value in selves]
    if rule.message_expression:
        requests += [{"expression": rule.message_expression, "activation": {"self": value}} for value in selves]
    results = cel.evaluate(requests)
    assert not [r for r in results if r.get("error")], (rule.cel, results)
    verdicts = [r["value"] for r in results[:len(selves)]]
    assert all(isinstance(v, bool) for v in verdicts), verdicts
    messages = ([str(r["value"]) for r in results[len(selves):]] if rule.message_expression
                else [rule.message] * len(selves))
    refused = [m for v, m in zip(verdicts, messages, strict=True) if not v]
    return all(verdicts), refused


def operator_problems(job: dict[str, Any]) -> str:
    """What the operator says of the job (its InvalidSpec message), or ''."""
    try:
        spec = api.FineTuneJob.model_validate(job).spec
    except ValidationError as e:
        return str(e)
    problems = [api.name_problem(job["metadata"]["name"], spec) or ""]
    problems += [rules.denied_env_message(e.name) for e in spec.env or [] if rules.denied_env_name(e.name)]
    return "\n".join(p for p in problems if p)


def trainer_problems(spec: dict[str, Any]) -> str:
    """What the standalone trainer says of the run's sections of a job (its config file), or ''."""
    config = {k: v for k, v in spec.items() if k in TrainerConfig.model_fields}
    if "distribution" in spec.get("resources", {}):
        config["distribution"] = {"strategy": spec["resources"]["distribution"].get("strategy", "ddp")}
    try:
        TrainerConfig.model_validate(config)
    except ValidationError as e:
        return str(e)
    return ""


@pytest.mark.parametrize(("rule", "case"), CASES)
def test_cel_and_the_operator_agree_on_each_case(rule: Rule, case: Case) -> None:
    job = job_of(case)
    accepted, messages = cel_verdict(rule, job)
    assert accepted == case.ok, f"CEL {'accepts' if accepted else 'refuses'} {case.spec}: {rule.cel}"
    operator_ok = case.ok if case.operator is None else case.operator
    problems = operator_problems(job)
    assert (not problems) == operator_ok, problems or f"the operator accepts {case.spec}"
    for message in messages:  # the operator refuses with the API server's words
        assert message in problems, (message, problems)
    if rule in RUN_RULES and case.operator is None:
        problems = trainer_problems(job["spec"])
        assert (not problems) == case.ok, problems or f"the trainer accepts {case.spec}"
        assert all(m.removeprefix("resources.") in problems for m in messages), (messages, problems)


def test_every_rule_has_a_case_it_accepts_and_one_it_refuses() -> None:
    assert [r.name for r in rules.ALL if {c.ok for c in r.cases} != {True, False}] == []
    assert len({r.name for r in rules.ALL}) == len(rules.ALL)
    assert [c.why for r in rules.ALL for c in r.cases if c.operator is not None and not c.why] == []


def test_the_crd_carries_every_rule_where_it_applies() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for rule in rules.ALL:
        for place in rule.at:
            node = schema
            for part in filter(None, place.split(".")):
                node = node["properties"][part.removesuffix("[]")]
                node = node["items"] if part.endswith("[]") else node
            assert rule.validation() in node["x-kubernetes-validations"], (rule.name, place)


def test_a_preset_is_held_to_the_rules_of_the_sections_it_defaults() -> None:
    schema = crd.build_preset_crd("FineTunePreset")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    defaults = schema["properties"]["spec"]["properties"]["defaults"]["properties"]
    held = {v["rule"] for v in defaults["training"]["x-kubernetes-validations"]}
    assert {r.cel for r in RUN_RULES if r.at == ("spec.training",)} <= held
    env = {v["rule"] for v in defaults["env"]["items"]["x-kubernetes-validations"]}
    assert env == {rules.RESERVED_ENV.cel, rules.ONE_ENV_SOURCE.cel}  # a preset may set denied variables


def test_the_evaluator_is_the_api_servers_cel() -> None:
    """The Kubernetes libraries are there (optionals, strings, regex), and a broken rule is an error."""
    results = cel.evaluate([
        {"expression": "self.?a.?b.orValue('x') + ['p', 'q'].join(',') + 'abc'.substring(1)",
         "activation": {"self": {}}},
        {"expression": "self.matches('^s3://') && type(self) == string", "activation": {"self": "s3://b"}},
        {"expression": "self.missing", "activation": {"self": {}}},
    ])
    assert results[0]["value"] == "xp,qbc" and results[1]["value"] is True
    assert "no such key" in results[2]["error"]
