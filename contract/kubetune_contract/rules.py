"""Cross-field rules, each declared once: where it applies, its CEL expression, its message, its cases.

The CRD's ``x-kubernetes-validations`` are generated from these rules (kubetune/crd.py), so the API
server refuses a bad spec at ``kubectl apply``; the pydantic validators raise the same messages, so
the operator (reason InvalidSpec) and the standalone trainer say the same thing. Each rule's cases
are evaluated by tests/unit/test_rules.py in the API server's own CEL environment (hack/k8s/celeval)
and against the pydantic models, which must agree with CEL unless a case says why not.

This module holds the rules of a training run (the trainer checks them too); kubetune/rules.py adds
the FineTuneJob's own (resources, env, sources, name) and lists them all. It imports nothing but the
standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
DEFAULT_EVAL_METRICS: tuple[Literal["perplexity", "bleu", "rouge", "exactMatch"], ...] = (
    "perplexity", "bleu", "rouge", "exactMatch")
"""evaluation.metrics when unset (config.EvaluationSpec; the gate's CEL rule needs it too)."""


@dataclass(frozen=True)
class Case:
    """A FineTuneJob that the rule accepts (ok) or refuses.

    ``spec`` is merged into a valid spec that sets every field a rule reads; ``name`` is the job's
    metadata.name. ``operator`` is what the pydantic models say where it differs from CEL, with
    ``why``: the CRD lets an unset field pass when a preset may fill it, and the operator then checks
    the effective spec.
    """

    spec: dict[str, Any]
    ok: bool
    operator: bool | None = None
    why: str = ""
    name: str = "job"


@dataclass(frozen=True)
class Rule:
    """One rule. ``at`` lists where it sits in the FineTuneJob's schema (``spec``, ``spec.training``,
    ``spec.env[]`` for each item of a list, ``""`` for the whole object); ``self`` in ``cel`` is the
    value there. ``field`` is the path the API server reports, relative to that place (``fieldPath``)."""

    name: str
    at: tuple[str, ...]
    cel: str
    message: str
    field: str | None = None
    reason: str | None = "FieldValueInvalid"
    message_expression: str | None = None
    cases: tuple[Case, ...] = ()

    def validation(self) -> dict[str, Any]:
        """The rule as an x-kubernetes-validations entry."""
        entry: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.message_expression:
            entry["messageExpression"] = self.message_expression
        if self.field:
            entry["fieldPath"] = self.field
        if self.reason:
            entry["reason"] = self.reason
        return entry

    def error(self, field_name: str | None = None) -> ValueError:
        """The error the pydantic validators raise: the same message, with the field named as the
        caller's document spells it (the trainer's config has distribution.strategy where a
        FineTuneJob has resources.distribution.strategy)."""
        if field_name and self.field:
            return ValueError(self.message.replace(self.field.lstrip("."), field_name, 1))
        return ValueError(self.message)


def strategy(value: str) -> dict[str, Any]:
    return {"resources": {"gpus": 2, "distribution": {"strategy": value}}}


QUANTIZATION_NEEDS_LORA = Rule(
    name="quantization-needs-lora",
    at=("spec",),
    cel="self.quantization == 'none' || self.lora.enabled",
    message="quantization int8/int4 requires lora.enabled=true (a quantized backbone can only be trained "
            "through adapters)",
    field=".lora.enabled",
    cases=(
        Case({"quantization": "int8", "lora": {"enabled": False}}, ok=False),
        Case({"quantization": "int4", "lora": {"enabled": False}}, ok=False),
        Case({"quantization": "int4", "lora": {"enabled": True}}, ok=True),
        Case({"quantization": "none", "lora": {"enabled": False}}, ok=True),
    ),
)
FSDP_NOT_INT8 = Rule(
    name="fsdp-not-int8",
    at=("spec",),
    cel="!(self.?resources.?distribution.?strategy.orValue('ddp') == 'fsdp' && self.quantization == 'int8')",
    message="resources.distribution.strategy fsdp is not supported with quantization int8: bitsandbytes cannot "
            "shard 8-bit weights; use quantization int4 or none, or strategy ddp",
    field=".resources.distribution.strategy",
    cases=(
        Case({**strategy("fsdp"), "quantization": "int8"}, ok=False),
        Case({**strategy("fsdp"), "quantization": "int4"}, ok=True),
        Case({**strategy("ddp"), "quantization": "int8"}, ok=True),
        Case({"quantization": "int8"}, ok=True),
    ),
)
FSDP_NOT_BITSANDBYTES_OPTIMIZER = Rule(
    name="fsdp-not-bitsandbytes-optimizer",
    at=("spec",),
    # training may be filled by a preset as well: an unset optimizer passes (the default is adamw).
    cel="!(self.?resources.?distribution.?strategy.orValue('ddp') == 'fsdp' && "
        f"self.?training.?optimizer.orValue('adamw') in {list(BITSANDBYTES_OPTIMIZERS)})",
    message="resources.distribution.strategy fsdp is not supported with the bitsandbytes optimizers "
            f"(training.optimizer {', '.join(BITSANDBYTES_OPTIMIZERS)}): they cannot update sharded parameters; "
            "use adamw or sgd (fsdp shards their states), or strategy ddp",
    field=".resources.distribution.strategy",
    cases=(
        *(Case({**strategy("fsdp"), "training": {"optimizer": o}}, ok=False) for o in BITSANDBYTES_OPTIMIZERS),
        Case({**strategy("fsdp"), "training": {"optimizer": "sgd"}}, ok=True),
        Case({**strategy("ddp"), "training": {"optimizer": "adamw_8bit"}}, ok=True),
    ),
)
EPOCHS_OR_STEPS = Rule(
    name="epochs-or-steps",
    at=("spec.training",),
    cel="!(has(self.epochs) && has(self.maxSteps))",
    message="set either training.epochs or training.maxSteps, not both",
    reason=None,
    cases=(
        Case({"training": {"epochs": 1, "maxSteps": 10}}, ok=False),
        Case({"training": {"maxSteps": 10}}, ok=True),
        Case({"training": {"epochs": 2}}, ok=True),
    ),
)
AUTO_BATCH_NEEDS_GLOBAL = Rule(
    name="auto-batch-needs-global-batch",
    at=("spec.training",),
    cel="!has(self.batchSize) || type(self.batchSize) == int || has(self.globalBatchSize)",
    message="training.batchSize auto needs training.globalBatchSize (the samples per optimizer step over all "
            "processes)",
    field=".globalBatchSize",
    reason="FieldValueRequired",
    cases=(
        Case({"training": {"batchSize": "auto"}}, ok=False),
        Case({"training": {"batchSize": "auto", "globalBatchSize": 32}}, ok=True),
        Case({"training": {"batchSize": 4}}, ok=True),
    ),
)
GLOBAL_BATCH_ONLY_AUTO = Rule(
    name="global-batch-only-with-auto",
    at=("spec.training",),
    # An unset batchSize passes: a preset may make it auto (the operator checks the effective spec).
    cel="!has(self.globalBatchSize) || !has(self.batchSize) || type(self.batchSize) == string",
    message="training.globalBatchSize is only for training.batchSize auto; with an integer batchSize the global "
            "batch is batchSize x gradientAccumulation x processes",
    field=".globalBatchSize",
    cases=(
        Case({"training": {"batchSize": 8, "globalBatchSize": 64}}, ok=False),
        Case({"training": {"globalBatchSize": 64}}, ok=True, operator=False,
             why="batchSize is unset: a preset may make it auto"),
        Case({"training": {"batchSize": "auto", "globalBatchSize": 64}}, ok=True),
    ),
)
ALL_LINEAR_ALONE = Rule(
    name="all-linear-alone",
    at=("spec.lora.targetModules",),
    cel="!('all-linear' in self) || size(self) == 1",
    message="\"all-linear\" cannot be combined with module names",
    reason=None,
    cases=(
        Case({"lora": {"targetModules": ["all-linear", "q_proj"]}}, ok=False),
        Case({"lora": {"targetModules": ["q_proj", "v_proj"]}}, ok=True),
        Case({"lora": {"targetModules": ["all-linear"]}}, ok=True),
    ),
)

JUDGE = {"url": "http://judge.example:8000/v1", "model": "grader"}
JUDGE_NEEDS_ENDPOINT = Rule(
    name="judge-needs-endpoint",
    at=("spec.evaluation",),
    # has() rather than self.?metrics.orValue([]): the API server cannot bound the cost of a list from orValue.
    cel="!has(self.metrics) || !('judge' in self.metrics) || has(self.judge)",
    message="evaluation.metrics lists judge: set evaluation.judge (url and model of an OpenAI-compatible "
            "chat-completions endpoint)",
    field=".judge",
    reason="FieldValueRequired",
    cases=(
        Case({"evaluation": {"metrics": ["bleu", "judge"]}}, ok=False),
        Case({"evaluation": {"metrics": ["judge"], "judge": JUDGE}}, ok=True),
        Case({"evaluation": {"metrics": ["bleu"]}}, ok=True),
    ),
)
GATE_METRIC_LISTED = Rule(
    name="gate-metric-listed",
    at=("spec.evaluation",),
    cel="!has(self.gate) || self.gate.rules.all(r, has(self.metrics) ? r.metric in self.metrics : "
        f"r.metric in {list(DEFAULT_EVAL_METRICS)})",
    message="evaluation.gate.rules: every rule's metric must be listed in evaluation.metrics (a metric that is "
            "not computed cannot be checked)",
    field=".gate.rules",
    cases=(
        Case({"evaluation": {"metrics": ["perplexity"], "gate": {"rules": [{"metric": "bleu", "min": 20}]}}},
             ok=False),
        Case({"evaluation": {"gate": {"rules": [{"metric": "judge", "min": 5}]}}}, ok=False),
        Case({"evaluation": {"gate": {"rules": [{"metric": "exactMatch", "min": 0.5}]}}}, ok=True),
        Case({"evaluation": {"metrics": ["bleu"], "gate": {"rules": [{"metric": "bleu", "min": 20}]}}}, ok=True),
        Case({"evaluation": {"gate": {"rules": [{"metric": "perplexity", "max": 8}]}}}, ok=True),
    ),
)
GATE_IMPROVEMENT_NEEDS_BASE = Rule(
    name="gate-improvement-needs-base",
    at=("spec.evaluation",),
    cel="!has(self.gate) || !has(self.compareBase) || self.compareBase || "
        "!self.gate.rules.exists(r, has(r.minImprovement))",
    message="evaluation.gate.rules: minImprovement compares with the backbone; it needs evaluation.compareBase "
            "true",
    field=".compareBase",
    cases=(
        Case({"evaluation": {"compareBase": False, "metrics": ["bleu"],
                             "gate": {"rules": [{"metric": "bleu", "minImprovement": 1}]}}}, ok=False),
        Case({"evaluation": {"metrics": ["bleu"], "gate": {"rules": [{"metric": "bleu", "minImprovement": 1}]}}},
             ok=True),
        Case({"evaluation": {"compareBase": False, "metrics": ["bleu"],
                             "gate": {"rules": [{"metric": "bleu", "min": 1}]}}}, ok=True),
    ),
)
GATE_RULE_BOUND = Rule(
    name="gate-rule-bound",
    at=("spec.evaluation.gate.rules[]",),
    cel="has(self.min) || has(self.max) || has(self.minImprovement)",
    message="evaluation.gate.rules: a rule needs min, max or minImprovement",
    reason="FieldValueRequired",
    cases=(
        Case({"evaluation": {"metrics": ["bleu"], "gate": {"rules": [{"metric": "bleu"}]}}}, ok=False),
        Case({"evaluation": {"metrics": ["bleu"], "gate": {"rules": [{"metric": "bleu", "max": 90}]}}}, ok=True),
    ),
)

PRESET_MAY_SET_METHOD = "training.method is unset: a preset may set it"


def method_is(methods: list[str]) -> str:
    """CEL: training.method is one of ``methods``, or unset (a preset may set it; the operator
    checks the effective spec)."""
    return f"self.?training.?method.orValue('') in {[*methods, '']}"


PREFERENCE_NEEDS_METHOD = Rule(
    name="preference-needs-method",
    at=("spec",),
    cel="!(has(self.preference) && self.?training.?method.orValue('') == 'sft')",
    message="preference is for training.method dpo, ipo, orpo or simpo; training.method is sft",
    field=".preference",
    cases=(
        Case({"training": {"method": "sft"}, "preference": {"beta": 0.2}}, ok=False),
        Case({"training": {"method": "dpo"}, "preference": {"beta": 0.2}}, ok=True),
        Case({"preference": {"beta": 0.2}}, ok=True, operator=False, why=PRESET_MAY_SET_METHOD),
    ),
)
LABEL_SMOOTHING_DPO = Rule(
    name="label-smoothing-dpo",
    at=("spec",),
    cel="!has(self.preference) || !has(self.preference.labelSmoothing) || self.preference.labelSmoothing == 0.0 || "
        + method_is(["dpo"]),
    message="preference.labelSmoothing is for training.method dpo",
    field=".preference.labelSmoothing",
    cases=(
        Case({"training": {"method": "ipo"}, "preference": {"labelSmoothing": 0.1}}, ok=False),
        Case({"training": {"method": "dpo"}, "preference": {"labelSmoothing": 0.1}}, ok=True),
        Case({"training": {"method": "ipo"}, "preference": {"labelSmoothing": 0.0}}, ok=True),
    ),
)
SIMPO_GAMMA_SIMPO = Rule(
    name="simpo-gamma-simpo",
    at=("spec",),
    cel="!has(self.preference) || !has(self.preference.simpoGamma) || " + method_is(["simpo"]),
    message="preference.simpoGamma is for training.method simpo",
    field=".preference.simpoGamma",
    cases=(
        Case({"training": {"method": "dpo"}, "preference": {"simpoGamma": 1.0}}, ok=False),
        Case({"training": {"method": "simpo"}, "preference": {"simpoGamma": 1.0}}, ok=True),
    ),
)
ORPO_LAMBDA_ORPO = Rule(
    name="orpo-lambda-orpo",
    at=("spec",),
    cel="!has(self.preference) || !has(self.preference.orpoLambda) || " + method_is(["orpo"]),
    message="preference.orpoLambda is for training.method orpo",
    field=".preference.orpoLambda",
    cases=(
        Case({"training": {"method": "simpo"}, "preference": {"orpoLambda": 0.2}}, ok=False),
        Case({"training": {"method": "orpo"}, "preference": {"orpoLambda": 0.2}}, ok=True),
    ),
)
MESSAGES_ONLY_SFT = Rule(
    name="messages-only-sft",
    at=("spec",),
    cel="!has(self.dataset.messagesColumn) || self.?training.?method.orValue('sft') == 'sft'",
    message="dataset.messagesColumn is for training.method sft; the preference methods read conversations from "
            "dataset.promptColumn, chosenColumn and rejectedColumn",
    field=".dataset.messagesColumn",
    cases=(
        Case({"training": {"method": "dpo"}, "dataset": {"messagesColumn": "messages"}}, ok=False),
        Case({"dataset": {"messagesColumn": "messages"}}, ok=True),
        Case({"training": {"method": "sft"}, "dataset": {"messagesColumn": "messages"}}, ok=True),
    ),
)
PACKING_ONLY_SFT = Rule(
    name="packing-only-sft",
    at=("spec.training",),
    cel="!(has(self.packing) && self.packing && has(self.method) && self.method != 'sft')",
    message="training.packing is for training.method sft: a preference pair's two answers are compared whole",
    field=".packing",
    cases=(
        Case({"training": {"method": "dpo", "packing": True}}, ok=False),
        Case({"training": {"method": "sft", "packing": True}}, ok=True),
        Case({"training": {"method": "orpo", "packing": False}}, ok=True),
    ),
)

RUN_RULES: tuple[Rule, ...] = (
    QUANTIZATION_NEEDS_LORA, FSDP_NOT_INT8, FSDP_NOT_BITSANDBYTES_OPTIMIZER,
    EPOCHS_OR_STEPS, AUTO_BATCH_NEEDS_GLOBAL, GLOBAL_BATCH_ONLY_AUTO, ALL_LINEAR_ALONE,
    JUDGE_NEEDS_ENDPOINT, GATE_METRIC_LISTED, GATE_IMPROVEMENT_NEEDS_BASE, GATE_RULE_BOUND,
    PREFERENCE_NEEDS_METHOD, LABEL_SMOOTHING_DPO, SIMPO_GAMMA_SIMPO, ORPO_LAMBDA_ORPO, MESSAGES_ONLY_SFT,
    PACKING_ONLY_SFT,
)
"""The rules of a training run, in the order the CRD lists them."""
