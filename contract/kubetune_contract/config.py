"""The trainer contract: what a fine-tuning run is, as pydantic models.

The same section models (model, dataset, training, lora, quantization, output, storage) appear in
the FineTuneJob spec and in the trainer's config file, so a section means the same thing in both;
the config's distribution section is the spec's resources.distribution (its strategy).
This module imports only pydantic: the operator imports it, and it must stay light (no torch).
Field names are camelCase in YAML/JSON; the Python attributes are snake_case.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune_contract import rules
from kubetune_contract.rules import BITSANDBYTES_OPTIMIZERS

SOURCE_SCHEMES = ("hf", "s3", "pvc", "file")
"""URI schemes a model or dataset source may use; a value without ``://`` is a local path."""

Quantization = Literal["none", "int8", "int4"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
DataFormat = Literal["auto", "jsonl", "csv", "parquet"]
Template = Literal["auto", "chat", "plain"]
LrScheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"]
Strategy = Literal["ddp", "fsdp"]
Method = Literal["sft", "dpo", "ipo", "orpo", "simpo"]
PREFERENCE_METHODS = ("dpo", "ipo", "orpo", "simpo")
"""Methods that train on preference pairs (prompt, chosen, rejected)."""
REFERENCE_METHODS = ("dpo", "ipo")
"""Preference methods that compare with a reference model (ORPO and SimPO need none)."""
EvalMetric = Literal["perplexity", "bleu", "rouge", "exactMatch", "judge"]
TEXT_METRICS = ("bleu", "rouge", "exactMatch", "judge")
"""Metrics scored on generated answers (the others come from the validation loss)."""
Auto = Literal["auto"]

# Exit codes of `python -m kubetune_trainer`, a contract with the operator (docs/trainer.md).
EXIT_OK = 0
EXIT_ERROR = 1
"""Anything else; worth retrying."""
EXIT_INVALID_INPUT = 3
"""Invalid config or data: retrying cannot help, the Job fails at once."""
EXIT_SOURCE_UNAVAILABLE = 4
"""A model or dataset source was not found or not reachable."""
EXIT_STORE_UNAVAILABLE = 5
"""The artifact store became unreachable mid-run and stayed so past the retry window; the run's
checkpoints are intact, so a replacement pod resumes (the Job does not count it as a failure)."""
EXIT_OUT_OF_MEMORY = 6
"""The accelerator ran out of memory: retrying the same settings cannot help, the Job fails at once."""
EXIT_REGISTRY_UNAVAILABLE = 7
"""The OCI registry of output.oci answered when the run started, then stayed unreachable past the
retry window while the run pushed its published outputs; a replacement pod pushes again (the Job
does not count it as a failure, as for EXIT_STORE_UNAVAILABLE)."""
EXIT_TERMINATED = 143
"""Stopped by SIGTERM (128 + 15) after checkpointing the current step; a retry continues from there."""

JUDGE_API_KEY_ENV = "KUBETUNE_JUDGE_API_KEY"
REGISTRY_AUTH_ENV = "KUBETUNE_REGISTRY_AUTH"
"""output.oci's credentials in the trainer's environment: the docker config JSON of its Secret."""
"""The judge endpoint's API key in the trainer's environment (from evaluation.judge.secretRef)."""

PVC_MOUNT_ROOT = "/mnt/pvc"
"""pvc://claim/path resolves to PVC_MOUNT_ROOT/claim/path; the operator mounts each claim there."""

URI_MAX = 2048
NAME_MAX = 253


class Section(BaseModel):
    """Base of every API section: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )


def check_source(value: str) -> str:
    """Accept a source URI with a known scheme, or a plain local path."""
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if scheme not in SOURCE_SCHEMES:
            known = ", ".join(f"{s}://" for s in SOURCE_SCHEMES)
            raise ValueError(f"unknown scheme {scheme + '://'!r}; use one of {known} or a local path")
        if not value.split("://", 1)[1].strip("/"):
            raise ValueError(f"{value!r} names no bucket, repository or path")
    elif not value.strip():
        raise ValueError("must not be empty")
    return value


class ModelSpec(Section):
    """The backbone: pretrained weights to fine-tune."""

    source: str = Field(min_length=1, max_length=URI_MAX, examples=["hf://Qwen/Qwen2.5-0.5B"])
    """Where the backbone is: hf://org/name, s3://bucket/prefix, pvc://claim/path, file:///path."""
    revision: str | None = Field(default=None, max_length=NAME_MAX)
    """Branch, tag or commit of an hf:// backbone."""
    trust_remote_code: bool = False
    """Allow the backbone's own Python code to run. Only for backbones you trust."""
    tokenizer: str | None = Field(default=None, max_length=URI_MAX)
    """Another source for the tokenizer (same schemes); the backbone's tokenizer when unset."""

    @field_validator("source", "tokenizer")
    @classmethod
    def _check_sources(cls, v: str | None) -> str | None:
        return None if v is None else check_source(v)


class DatasetSpec(Section):
    """Instruction data: prompt/answer pairs in CSV, JSONL or Parquet."""

    train: str = Field(min_length=1, max_length=URI_MAX)
    """Training file: s3://bucket/key, pvc://claim/path, file:///path or hf://datasets/org/name/file."""
    validation: str | None = Field(default=None, max_length=URI_MAX)
    """Validation file (same schemes). When unset, validationSplit of the training data is held out."""
    format: DataFormat = "auto"
    """File format; auto picks it from the file extension."""
    prompt_column: str = Field(default="prompt", min_length=1, max_length=NAME_MAX)
    """Column with the prompt (instruction)."""
    answer_column: str = Field(default="answer", min_length=1, max_length=NAME_MAX)
    """Column with the expected answer."""
    system_column: str | None = Field(default=None, max_length=NAME_MAX)
    """Optional column with a per-row system prompt."""
    system_prompt: str | None = Field(default=None, max_length=8192)
    """System prompt for every row (systemColumn wins where both are set)."""
    template: Template = "auto"
    """How a row becomes text: chat (the tokenizer's chat template), plain (promptFormat), or auto
    (chat when the tokenizer has a chat template, else plain)."""
    prompt_format: str = Field(
        default="{system}### Instruction:\n{prompt}\n\n### Response:\n", max_length=8192
    )
    """Plain template for the prompt; {prompt} and optionally {system} are replaced."""
    messages_column: str | None = Field(default=None, max_length=NAME_MAX)
    """Column with a conversation for training.method sft: a list of {role, content} messages
    (system first, optional; then user and assistant turns in turn, ending with the assistant),
    rendered with the tokenizer's chat template; the loss is taken on the assistant turns. When set,
    promptColumn and answerColumn are not read."""
    chosen_column: str = Field(default="chosen", min_length=1, max_length=NAME_MAX)
    """Column with the preferred answer, for the preference methods (text, or a list of assistant
    messages)."""
    rejected_column: str = Field(default="rejected", min_length=1, max_length=NAME_MAX)
    """Column with the dispreferred answer, for the preference methods (text, or a list of assistant
    messages)."""
    max_length: int = Field(default=1024, ge=16, le=131072)
    """Maximum tokens per sample; longer samples are truncated (and counted in the logs). A preference
    pair keeps its answers and loses the start of its prompt."""
    mask_prompt: bool = True
    """Compute the loss on answer tokens only (prompt tokens get label -100)."""
    validation_split: float = Field(default=0.1, gt=0, le=0.5)
    """Fraction of the training data held out for evaluation when no validation file is given."""

    @field_validator("train", "validation")
    @classmethod
    def _check_sources(cls, v: str | None) -> str | None:
        return None if v is None else check_source(v)

    @field_validator("prompt_format")
    @classmethod
    def _check_prompt_format(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("must contain {prompt}")
        return v


class TrainingSpec(Section):
    """Hyperparameters. Set either epochs or maxSteps; with neither, one epoch."""

    method: Method = "sft"
    """sft: supervised fine-tuning on prompt/answer rows or conversations. dpo, ipo, orpo, simpo:
    preference tuning on prompt/chosen/rejected rows (their parameters in preference); dpo and ipo
    compare with the backbone as the reference model, orpo and simpo need none. A batch size counts
    pairs."""

    epochs: float | None = Field(default=None, gt=0, le=1000)
    """Passes over the training data (fractions allowed). Exclusive with maxSteps."""
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    """Optimizer steps to run. Exclusive with epochs."""
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    """Peak learning rate."""
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Auto = 4
    """Samples per device per forward pass (the micro-batch), or auto: the trainer chooses the
    micro-batch and the gradient accumulation that keep training.globalBatchSize samples per
    optimizer step and fill at most training.memoryFraction of the free GPU memory, and halves the
    micro-batch (doubling the accumulation, repeating the step with the same samples) on a CUDA
    out-of-memory."""
    gradient_accumulation: int = Field(default=1, ge=1, le=4096)
    """Forward passes per optimizer step (with batchSize auto the trainer chooses it; this is ignored)."""
    global_batch_size: int | None = Field(default=None, ge=1, le=1_048_576)
    """Samples per optimizer step over all processes; required with batchSize auto, and only
    allowed with it (an integer batchSize makes the global batch batchSize x gradientAccumulation x
    processes)."""
    memory_fraction: float = Field(default=0.85, ge=0.5, le=0.95)
    """With batchSize or gradientCheckpointing auto: the fraction of the GPU's free memory that the
    estimated peak may fill when the trainer chooses the micro-batch and checkpointing."""
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    """Fraction of the steps spent warming the learning rate up."""
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    """AdamW weight decay."""
    lr_scheduler: LrScheduler = "cosine"
    """Learning-rate schedule after warmup."""
    optimizer: Optimizer = "adamw"
    """Optimizer; the 8-bit and paged variants come from bitsandbytes."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping norm (0 disables clipping)."""
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    """Seed for data order, initialisation of adapters and dropout."""
    precision: Precision = "auto"
    """Compute precision: auto is bf16 where the device supports it, else fp32."""
    gradient_checkpointing: bool | Auto = True
    """Recompute activations in the backward pass: less memory, about 20-30% slower. auto: on only
    where the estimate at the chosen micro-batch does not fit training.memoryFraction of the free GPU
    memory without it (off on the CPU)."""
    packing: bool = False
    """Concatenate samples into full maxLength blocks (faster; prompts stay masked)."""
    eval_every_steps: int = Field(default=100, ge=1)
    """Evaluate on the validation data every N steps (and always at the end)."""
    checkpoint_every_steps: int = Field(default=100, ge=1)
    """Write a resumable checkpoint to the output location every N steps."""
    log_every_steps: int = Field(default=1, ge=1)
    """Report progress every N steps (and at least once a minute while steps advance)."""
    stall_timeout_seconds: int | None = Field(default=1200, ge=30, le=7 * 24 * 3600)
    """A Running job whose training steps have not advanced for this long is stalled: condition
    Stalled, reason NoProgress, and a Warning Event (docs/operations.md#stalled-jobs). Preparing,
    evaluating, checkpointing and publishing are not stalls. null: never checked."""
    stall_action: Literal["restart", "none"] = "restart"
    """restart: a stalled job's pods are deleted, so the Job replaces them and the run resumes from its
    last checkpoint (counted in status.stallRestarts, at most backoffLimit); none: only reported."""

    @model_validator(mode="after")
    def _one_length(self) -> TrainingSpec:
        if self.epochs is not None and self.max_steps is not None:
            raise rules.EPOCHS_OR_STEPS.error()
        if self.batch_size == "auto" and self.global_batch_size is None:
            raise rules.AUTO_BATCH_NEEDS_GLOBAL.error()
        if self.batch_size != "auto" and self.global_batch_size is not None:
            raise rules.GLOBAL_BATCH_ONLY_AUTO.error()
        if self.packing and self.method != "sft":
            raise rules.PACKING_ONLY_SFT.error()
        return self

    @property
    def auto_batch(self) -> bool:
        """batchSize auto: the trainer chooses the micro-batch and the accumulation."""
        return self.batch_size == "auto"

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step over ``world_size`` processes."""
        if isinstance(self.batch_size, int):
            return self.batch_size * self.gradient_accumulation * world_size
        assert self.global_batch_size is not None  # checked by the validator
        return self.global_batch_size


class LoraSpec(Section):
    """Low-rank adapters; the backbone stays frozen. Disable for a full fine-tune."""

    enabled: bool = True
    """Train LoRA adapters (false: full fine-tune, quantization must be none)."""
    r: int = Field(default=16, ge=1, le=1024)
    """Adapter rank."""
    alpha: int = Field(default=32, ge=1, le=4096)
    """Adapter scaling (alpha / r multiplies the update)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(default=["all-linear"], min_length=1, max_length=64)
    """Modules that get adapters: ["all-linear"] or module names such as q_proj, v_proj."""

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, v: list[str]) -> list[str]:
        if "all-linear" in v and len(v) > 1:
            raise rules.ALL_LINEAR_ALONE.error()
        if any(not name.strip() or len(name) > NAME_MAX for name in v):
            raise ValueError("module names must be non-empty and at most 253 characters")
        return v


OCI_REPOSITORY = r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)+$"
OCI_TAG = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"


class OciSpec(Section):
    """Also push the adapter, its model card, evaluation and manifest to an OCI registry, as one
    artifact (docs/artifacts.md#oci-artifacts)."""

    repository: str = Field(min_length=1, max_length=URI_MAX, pattern=OCI_REPOSITORY)
    """registry[:port]/path, e.g. ghcr.io/acme/adapters."""
    tag: str | None = Field(default=None, pattern=OCI_TAG)
    """Tag to push; the FineTuneJob's name when unset."""
    overwrite: bool = False
    """Replace the tag when it names another artifact; otherwise the run fails before training
    (exit 3) and the tag is left as it was."""
    insecure: bool = False
    """Plain HTTP to the registry (a local registry)."""


class OutputSpec(Section):
    """Where the adapter, checkpoints and reports go."""

    location: str = Field(min_length=1, max_length=URI_MAX)
    """s3://bucket/prefix (the run's own path is appended), or a local directory for standalone runs."""
    merge_adapter: bool = False
    """Also save the backbone with the adapter merged in, as a complete Hugging Face model directory
    (merged/); int8 and int4 runs merge into the backbone loaded unquantized (docs/artifacts.md)."""
    merge_precision: Precision = "auto"
    """dtype of the merged model's weights: bf16, fp16 or fp32; auto: the training precision."""
    keep_checkpoints: int = Field(default=2, ge=1, le=100)
    """How many of the newest checkpoints to keep."""
    oci: OciSpec | None = None
    """Also push the results to an OCI registry; the digest goes to status.artifacts.ociDigest."""

    @field_validator("location")
    @classmethod
    def _check_location(cls, v: str) -> str:
        if "://" in v:
            scheme, rest = v.split("://", 1)
            if scheme not in ("s3", "file"):
                raise ValueError(f"unknown scheme {scheme + '://'!r}; use s3://bucket/prefix or a directory")
            if not rest.strip("/"):
                raise ValueError(f"{v!r} names no bucket or directory")
        return v


class StorageSpec(Section):
    """S3-compatible object store (AWS S3, MinIO, …) for s3:// sources and outputs."""

    endpoint: str | None = Field(default=None, max_length=URI_MAX)
    """host:port or URL of the S3 endpoint; AWS S3 when unset."""
    region: str | None = Field(default=None, max_length=64)
    """Bucket region."""
    insecure: bool = False
    """Use plain HTTP (local MinIO) instead of HTTPS."""


class DistributionSpec(Section):
    """How the training processes share the work."""

    strategy: Strategy = "ddp"
    """ddp: every process holds the whole model and gradients are all-reduced (PyTorch DDP). fsdp:
    parameters, gradients and optimizer states are sharded across the processes (PyTorch FSDP2),
    for backbones that do not fit one device; needs two or more processes, quantization none or int4
    and the optimizer adamw or sgd."""


DEFAULT_JUDGE_PROMPT = (
    "You grade an assistant's answer against a reference answer.\n\n"
    "Question:\n{prompt}\n\nReference answer:\n{reference}\n\nAssistant's answer:\n{answer}\n\n"
    "How well does the assistant's answer match the reference in meaning and correctness? Reply with a "
    "single number from 0 (wrong) to 10 (fully correct) and nothing else."
)


class JudgeSpec(Section):
    """An LLM judge: an OpenAI-compatible chat-completions endpoint that scores each answer against the
    reference (0 to 10). Its API key comes from the environment (KUBETUNE_JUDGE_API_KEY)."""

    url: str = Field(min_length=1, max_length=URI_MAX, pattern=r"^https?://[^\s@]+$",
                     examples=["https://api.openai.com/v1"])
    """Base URL of the endpoint (the client appends /chat/completions)."""
    model: str = Field(min_length=1, max_length=NAME_MAX)
    """Model the endpoint serves, e.g. gpt-4o-mini."""
    prompt: str = Field(default=DEFAULT_JUDGE_PROMPT, max_length=8192)
    """Judging prompt; {prompt}, {reference} and {answer} are replaced. The reply must be a number 0-10."""
    timeout_seconds: int = Field(default=30, ge=1, le=600)
    """Time limit of one request."""
    max_retries: int = Field(default=2, ge=0, le=10)
    """Retries of a failed request (the openai client's backoff)."""

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str) -> str:
        missing = [k for k in ("{reference}", "{answer}") if k not in v]
        if missing:
            raise ValueError(f"must contain {' and '.join(missing)}")
        return v


class GateRule(Section):
    """One condition the evaluated model must meet to be promotable."""

    metric: EvalMetric
    """A metric listed in evaluation.metrics."""
    min: float | None = None
    """The tuned model's value must be at least this."""
    max: float | None = None
    """The tuned model's value must be at most this (perplexity: lower is better)."""
    min_improvement: float | None = None
    """Tuned minus base must be at least this (for perplexity: base minus tuned); needs compareBase."""

    @model_validator(mode="after")
    def _bounded(self) -> GateRule:
        if self.min is None and self.max is None and self.min_improvement is None:
            raise rules.GATE_RULE_BOUND.error()
        return self


class GateSpec(Section):
    """The promotion gate: the FineTuneJob's Promotable condition says whether every rule holds."""

    rules: list[GateRule] = Field(min_length=1, max_length=16)
    """Rules such as {metric: bleu, min: 20} or {metric: exactMatch, minImprovement: 0.05}."""
    fail_job: bool = False
    """A failed gate makes the phase Failed (reason EvaluationGateFailed) instead of Succeeded."""


def default_metrics() -> list[EvalMetric]:
    return [m for m in rules.DEFAULT_EVAL_METRICS]


class EvaluationSpec(Section):
    """What the trained model is measured on after training, on the validation data: the validation
    loss's perplexity and, on greedy answers to the validation prompts, BLEU, ROUGE-L, exact match and
    an LLM judge; by default the backbone alone is measured too, for comparison."""

    metrics: list[EvalMetric] = Field(default_factory=default_metrics, min_length=1, max_length=5)
    """Any of perplexity, bleu (sacrebleu, 0-100), rouge (ROUGE-L F1, 0-1), exactMatch (0-1), judge (0-10);
    the first is the headline `kubectl get` shows."""
    max_samples: int = Field(default=64, ge=1, le=2000)
    """Validation samples the answers are generated for (the first ones); they are written to
    predictions.jsonl whatever the metrics."""
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    """Longest answer generated; generation stops earlier at the end-of-sequence token."""
    batch_size: int = Field(default=8, ge=1, le=512)
    """Prompts generated together (left-padded, with the KV cache)."""
    compare_base: bool = True
    """Also measure the backbone alone (the adapter disabled; no second copy of the model is loaded)."""
    judge: JudgeSpec | None = None
    """The judge endpoint, for the judge metric."""
    gate: GateSpec | None = None
    """Rules the tuned model must meet to be promotable."""

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each metric may be listed once")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationSpec:
        if "judge" in self.metrics and self.judge is None:
            raise rules.JUDGE_NEEDS_ENDPOINT.error()
        if self.gate is not None:
            if any(r.metric not in self.metrics for r in self.gate.rules):
                raise rules.GATE_METRIC_LISTED.error()
            if not self.compare_base and any(r.min_improvement is not None for r in self.gate.rules):
                raise rules.GATE_IMPROVEMENT_NEEDS_BASE.error()
        return self

    @property
    def text_metrics(self) -> list[str]:
        """The metrics scored on generated answers."""
        return [m for m in self.metrics if m in TEXT_METRICS]


class PreferenceSpec(Section):
    """Parameters of the preference methods (training.method dpo, ipo, orpo or simpo)."""

    beta: float = Field(default=0.1, gt=0, le=100)
    """How strongly the policy may move from the reference (dpo: the sigmoid's scale; ipo: the
    regularisation tau; simpo: the reward scale, 2.0-2.5 in the SimPO paper). Not used by orpo."""
    label_smoothing: float | None = Field(default=None, ge=0, lt=0.5)
    """dpo only (conservative DPO): the assumed fraction of pairs whose labels are flipped (default 0)."""
    simpo_gamma: float | None = Field(default=None, ge=0, le=100)
    """simpo only: the target reward margin gamma (default 0.5)."""
    orpo_lambda: float | None = Field(default=None, gt=0, le=100)
    """orpo only: the weight lambda of the odds-ratio term added to the chosen answers' loss
    (default 0.1)."""

    @property
    def smoothing(self) -> float:
        return self.label_smoothing or 0.0

    @property
    def gamma(self) -> float:
        return 0.5 if self.simpo_gamma is None else self.simpo_gamma

    @property
    def lam(self) -> float:
        return 0.1 if self.orpo_lambda is None else self.orpo_lambda


class RunSections(Section):
    """The sections that define a training run: shared by TrainerConfig and the FineTuneJob spec."""

    model: ModelSpec
    """The backbone to fine-tune."""
    dataset: DatasetSpec
    """The instruction data."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Hyperparameters."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """LoRA adapters."""
    quantization: Quantization = "none"
    """Base weights: none (bf16/fp16/fp32), int8 (8-bit LoRA) or int4 (nf4 QLoRA). int8/int4 need LoRA."""
    output: OutputSpec
    """Where the adapter and reports go; the run's own path is appended."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """S3 endpoint (credentials come from the environment)."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """How the trained model is measured after training, and the promotion gate."""
    preference: PreferenceSpec | None = None
    """Parameters of the preference methods (training.method dpo, ipo, orpo, simpo); defaults when unset."""

    @model_validator(mode="after")
    def _cross_section_rules(self) -> RunSections:
        check_quantization(self.quantization, self.lora)
        check_preference(self.training.method, self.preference, self.dataset)
        return self

    @property
    def preference_tuning(self) -> bool:
        """training.method is one of the preference methods."""
        return self.training.method in PREFERENCE_METHODS

    @property
    def preference_spec(self) -> PreferenceSpec:
        """spec.preference, or its defaults."""
        return self.preference or PreferenceSpec()


class TrainerConfig(RunSections):
    """A complete trainer run: what `python -m kubetune_trainer --config FILE` reads.

    Credentials are never part of it: they come from the environment (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, HF_TOKEN).
    """

    run_name: str = Field(default="run", min_length=1, max_length=NAME_MAX, pattern=r"^[A-Za-z0-9._/-]+$")
    """Appended to output.location; a FineTuneJob uses <namespace>/<name>."""
    distribution: DistributionSpec = Field(default_factory=DistributionSpec)
    """How the processes of a run under torchrun share the work (a FineTuneJob's resources.distribution)."""

    @model_validator(mode="after")
    def _strategy_rules(self) -> TrainerConfig:
        check_strategy(self.distribution.strategy, self, "distribution.strategy")
        return self


def check_quantization(quantization: str, lora: LoraSpec) -> None:
    """Cross-section rules (rules.py; the CRD checks the same at apply time)."""
    if quantization != "none" and not lora.enabled:
        raise rules.QUANTIZATION_NEEDS_LORA.error()


def check_preference(method: str, preference: PreferenceSpec | None, dataset: DatasetSpec) -> None:
    """What the preference section may say for the method (rules.py; the CRD checks the same)."""
    if preference is not None and method == "sft":
        raise rules.PREFERENCE_NEEDS_METHOD.error()
    if preference is not None and preference.label_smoothing and method != "dpo":
        raise rules.LABEL_SMOOTHING_DPO.error()
    if preference is not None and preference.simpo_gamma is not None and method != "simpo":
        raise rules.SIMPO_GAMMA_SIMPO.error()
    if preference is not None and preference.orpo_lambda is not None and method != "orpo":
        raise rules.ORPO_LAMBDA_ORPO.error()
    if dataset.messages_column is not None and method != "sft":
        raise rules.MESSAGES_ONLY_SFT.error()


def check_strategy(strategy: str, run: RunSections, field: str) -> None:
    """What the fsdp strategy cannot shard (rules.py; the CRD checks the same at apply time);
    ``field`` names the strategy as the caller's document spells it."""
    if strategy != "fsdp":
        return
    if run.quantization == "int8":
        raise rules.FSDP_NOT_INT8.error(field)
    if run.training.optimizer in BITSANDBYTES_OPTIMIZERS:
        raise rules.FSDP_NOT_BITSANDBYTES_OPTIMIZER.error(field)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainerConfig:
    """Read a YAML or JSON config file, apply ``section.field=value`` overrides, validate."""
    import yaml

    text = Path(path).read_text()
    data: Any = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        apply_override(data, item)
    return TrainerConfig.model_validate(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (numbers, bools, lists)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected section.field=value")
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)
