"""What the trainer tells the operator: progress reports and the final summary (pydantic only).

One schema on both sides, next to the config contract: the trainer builds its events from these
models; the operator validates what arrives with the same models (report endpoint, termination
message), and the FineTuneJob status reuses `Progress`, `Metrics` and `Artifacts` as they are.
Field names are the camelCase of the status (`trainLoss`, `tokensPerSecond`, ...).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import AliasChoices, ConfigDict, Field

from .config import GateSpec, Section

UNAVAILABLE_MAX = 200
"""Longest reason a metric was not computed (status stays bounded)."""


class Incoming(Section):
    """A message from a trainer: unknown fields are ignored (an older or newer trainer)."""

    model_config = ConfigDict(extra="ignore")


class Rewards(Incoming):
    """The implicit rewards of a preference method over a set of pairs (training.method dpo, ipo,
    orpo, simpo): beta x the policy's log-probability of an answer, less the reference's (dpo, ipo);
    beta x its mean log-probability per token (simpo), lambda x the same (orpo)."""

    chosen: float | None = None
    """Mean reward of the chosen answers."""
    rejected: float | None = None
    """Mean reward of the rejected answers."""
    margin: float | None = None
    """Mean of chosen minus rejected."""
    accuracy: float | None = Field(default=None, ge=0, le=1)
    """Fraction of pairs whose chosen answer has the higher reward (preference accuracy)."""
    loss: float | None = None
    """Mean loss of the method per pair."""
    pairs: int | None = Field(default=None, ge=0)
    """Pairs these means are over."""


class Metrics(Incoming):
    """Latest training metrics."""

    train_loss: float | None = Field(default=None, validation_alias=AliasChoices("trainLoss", "train_loss", "loss"))
    """Training loss per target token (recent average)."""
    eval_loss: float | None = None
    """Validation loss per target token."""
    perplexity: float | None = Field(default=None, ge=0)
    """exp(evalLoss)."""
    learning_rate: float | None = Field(default=None, ge=0)
    """Current learning rate."""
    tokens_per_second: float | None = Field(default=None, ge=0)
    """Training throughput."""
    peak_memory_bytes: int | None = Field(default=None, ge=0)
    """Peak accelerator (or host) memory of the trainer."""
    rewards: Rewards | None = None
    """Preference methods: the rewards of the training pairs since the last report."""
    eval_rewards: Rewards | None = None
    """Preference methods: the rewards of the validation pairs (at the last evaluation)."""


Activity = Literal["preparing", "training", "evaluating", "checkpointing", "publishing"]


class Progress(Incoming):
    """Training progress."""

    step: int | None = Field(default=None, ge=0)
    """Optimizer steps done."""
    total_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps planned."""
    epoch: float | None = Field(default=None, ge=0)
    """Epochs done (fractional)."""
    percent: int | None = Field(default=None, ge=0, le=100)
    """step / totalSteps in percent."""
    eta_seconds: int | None = Field(default=None, ge=0)
    """Estimated seconds left."""
    updated_at: str | None = None
    """Time of the last progress report (RFC 3339)."""
    activity: Activity | None = None
    """What the trainer was doing at its last report: preparing (data, model download and load),
    training, evaluating, checkpointing or publishing. Only a stop while training is a stall."""


def now() -> str:
    """The time as Kubernetes writes it in status (RFC 3339, seconds, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


SHA256 = r"^[0-9a-f]{64}$"


class DataLineage(Incoming):
    """One data file a run read."""

    role: Literal["train", "validation"]
    """dataset.train or dataset.validation."""
    uri: str | None = Field(default=None, max_length=2048)
    """The file as the spec names it (left out of status when the summary is too long)."""
    bytes: int = Field(ge=0)
    """Its size."""
    sha256: str = Field(pattern=SHA256)
    """Its sha256."""


class Lineage(Incoming):
    """What made the artifacts: backbone, data, config, image, version and times. The same inputs
    give the same lineage, times apart (docs/artifacts.md)."""

    model_source: str | None = Field(default=None, max_length=2048)
    """model.source."""
    model_revision: str | None = Field(default=None, max_length=256)
    """The revision the hub resolved (its commit) for hf:// sources; else model.revision."""
    model_sha256: str | None = Field(default=None, pattern=SHA256)
    """s3://, pvc:// and local sources: sha256 of the weight files' list ("<sha256>  <path>" lines,
    sorted by path), so equal weights give equal digests wherever they are stored."""
    data: list[DataLineage] = Field(default_factory=list, max_length=2)
    """Every data file read, with its sha256."""
    config_sha256: str | None = Field(default=None, pattern=SHA256)
    """sha256 of the effective trainer config (trainer_config.json without runName and output:
    where a run's results go does not change what it trains)."""
    image: str | None = Field(default=None, max_length=1024)
    """The trainer image as the Job names it."""
    image_id: str | None = Field(default=None, max_length=1024, alias="imageID")
    """The image the node ran, by digest (the pod's imageID); status only: the operator reads it."""
    version: str | None = Field(default=None, max_length=64)
    """KubeTune version of the trainer."""
    started_at: str | None = None
    """When the attempt that published the artifacts started (RFC 3339)."""
    finished_at: str | None = None
    """When its outputs were complete, before the upload (RFC 3339)."""


class Artifacts(Incoming):
    """Where the results are."""

    location: str | None = None
    """Run directory, e.g. s3://bucket/prefix/<namespace>/<name>/<uid prefix>/."""
    adapter: str | None = None
    """The trained adapter (safetensors) and tokenizer."""
    merged: str | None = None
    """The merged model, when output.mergeAdapter."""
    manifest: str | None = None
    """manifest.json: every file with size and sha256; written last."""
    total_bytes: int | None = None
    """Total size of the artifacts."""
    files: int | None = None
    """Number of files."""
    merge_check: str | None = Field(default=None, max_length=256)
    """output.mergeAdapter: how the merged model's greedy answers compare with base + adapter."""
    lineage: Lineage | None = None
    """What made the artifacts (also in manifest.json and the model card)."""
    manifest_sha256: str | None = Field(default=None, pattern=SHA256)
    """sha256 of manifest.json as published: pins every file of the run (kubetune pull checks it)."""
    oci_digest: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    """output.oci: digest of the pushed artifact's manifest."""
    oci_reference: str | None = Field(default=None, max_length=2200)
    """output.oci: the artifact by digest (repository@sha256:…), to pull or deploy."""


class DatasetStats(Incoming):
    """The training data as the trainer sees it, before the model loads: how much, how long, how it
    will take."""

    samples: int | None = Field(default=None, ge=0)
    """Training samples used (after samples with no answer token left were dropped)."""
    validation_samples: int | None = Field(default=None, ge=0)
    """Validation samples."""
    tokens_p50: int | None = Field(default=None, ge=0)
    """Median tokens per training sample (template applied, before truncation)."""
    tokens_p95: int | None = Field(default=None, ge=0)
    """95th percentile of tokens per training sample."""
    tokens_max: int | None = Field(default=None, ge=0)
    """Longest training sample, in tokens."""
    truncated: int | None = Field(default=None, ge=0)
    """Training samples longer than dataset.maxLength, cut to it."""
    dropped: int | None = Field(default=None, ge=0)
    """Training samples dropped: no answer token left after truncation."""
    skipped: int | None = Field(default=None, ge=0)
    """Preference rows skipped: the chosen and rejected answers are equal, or one is empty."""
    epoch_tokens: int | None = Field(default=None, ge=0)
    """Tokens in one pass over the training data (after truncation)."""
    total_tokens: int | None = Field(default=None, ge=0)
    """Tokens the whole run trains on (epoch tokens x epochs)."""
    steps_per_epoch: int | None = Field(default=None, ge=0)
    """Optimizer steps per pass over the data."""
    total_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps of the run."""
    estimated_seconds: float | None = Field(default=None, ge=0)
    """Estimated training time, from the tokens/s of the first steps."""
    gpu_hours: float | None = Field(default=None, ge=0)
    """Estimated GPU-hours (estimatedSeconds x GPUs / 3600); 0 on CPUs."""


class MetricResult(Incoming):
    """One evaluation metric: the tuned model's value, the backbone's, and the difference."""

    tuned: float | None = None
    """The fine-tuned model's value."""
    base: float | None = None
    """The backbone's value (evaluation.compareBase)."""
    delta: float | None = None
    """tuned - base."""
    samples: int | None = Field(default=None, ge=0)
    """Validation samples it was computed on."""
    unavailable: str | None = Field(default=None, max_length=UNAVAILABLE_MAX)
    """Why it was not computed (the judge did not answer, ...); the run still succeeds."""


class EvaluationMetrics(Incoming):
    """The evaluated metrics, each tuned vs base."""

    perplexity: MetricResult | None = None
    """exp(validation loss per answer token); lower is better."""
    bleu: MetricResult | None = None
    """Corpus BLEU of the greedy answers (sacrebleu, effective order, 0-100)."""
    rouge: MetricResult | None = None
    """Mean ROUGE-L F1 of the greedy answers (rouge-score, 0-1)."""
    exact_match: MetricResult | None = None
    """Fraction of greedy answers equal to the reference (whitespace trimmed, 0-1)."""
    judge: MetricResult | None = None
    """Mean score the LLM judge gave the answers (0-10)."""

    def get(self, metric: str) -> MetricResult | None:
        """The result of a metric by its API name (exactMatch, ...)."""
        for name, info in type(self).model_fields.items():
            if info.alias == metric or name == metric:
                value: MetricResult | None = getattr(self, name)
                return value
        return None


class GateResult(Incoming):
    """Whether the tuned model meets the promotion gate."""

    passed: bool
    """Every rule holds."""
    message: str = Field(default="", max_length=1024)
    """The rules that failed, with the measured values (or that every rule holds)."""


class Evaluation(Incoming):
    """status.evaluation: the evaluated metrics and the headline shown by `kubectl get`."""

    metrics: EvaluationMetrics = Field(default_factory=EvaluationMetrics)
    """Per metric: tuned, base, delta."""
    headline: str | None = Field(default=None, max_length=128)
    """The first metric listed, e.g. "bleu 41.2 (base 12.5)"."""
    gate: GateResult | None = None
    """The promotion gate's verdict (evaluation.gate)."""
    seconds: float | None = Field(default=None, ge=0)
    """Wall time of the evaluation (answers of both models, metrics, the judge)."""


def check_gate(gate: GateSpec, metrics: EvaluationMetrics) -> GateResult:
    """The verdict of the promotion gate on the evaluated metrics; a rule on a metric that is
    unavailable fails. For perplexity (lower is better) minImprovement is base - tuned."""
    failures = []
    for rule in gate.rules:
        result = metrics.get(rule.metric)
        tuned = result.tuned if result else None
        if tuned is None:
            why = result.unavailable if result and result.unavailable else "not computed"
            failures.append(f"{rule.metric} is unavailable ({why})")
            continue
        if rule.min is not None and tuned < rule.min:
            failures.append(f"{rule.metric} {tuned:.4g} < min {rule.min:g}")
        if rule.max is not None and tuned > rule.max:
            failures.append(f"{rule.metric} {tuned:.4g} > max {rule.max:g}")
        if rule.min_improvement is not None:
            base = result.base if result else None
            if base is None:
                failures.append(f"{rule.metric}: the backbone's value is unavailable")
                continue
            gain = base - tuned if rule.metric == "perplexity" else tuned - base
            if gain < rule.min_improvement:
                failures.append(f"{rule.metric} improved by {gain:.4g} (tuned {tuned:.4g}, base {base:.4g}) "
                                f"< minImprovement {rule.min_improvement:g}")
    if failures:
        return GateResult(passed=False, message=("gate failed: " + "; ".join(failures))[:1024])
    return GateResult(passed=True, message=f"every gate rule holds ({len(gate.rules)})")


def headline(metrics: EvaluationMetrics, order: list[str]) -> str | None:
    """The first listed metric that has a value, as `kubectl get` shows it."""
    for metric in order:
        result = metrics.get(metric)
        if result and result.tuned is not None:
            base = f" (base {result.base:.4g})" if result.base is not None else ""
            return f"{metric} {result.tuned:.4g}{base}"
    return None


class ProgressReport(Metrics):
    """One progress event: pushed to the operator, printed, and appended to metrics.jsonl."""

    type: Literal["progress", "activity"] = "progress"
    """progress: a report of steps and metrics (also in metrics.jsonl); activity: only what the run is
    doing now, at the current step (a change of activity, or a heartbeat while steps advance)."""
    step: int = Field(ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = Field(default=None, ge=0)
    eta_seconds: float | None = Field(default=None, ge=0)
    dataset: DatasetStats | None = None
    activity: Activity | None = None
    sent_at: float | None = Field(default=None, ge=0)
    """When the trainer emitted it (Unix seconds): the operator measures the report lag."""

    def progress(self, updated_at: str) -> Progress:
        """status.progress for this report."""
        percent = min(100, int(100 * self.step / self.total_steps)) if self.total_steps else None
        return Progress(step=self.step, total_steps=self.total_steps or None, percent=percent,
                        epoch=round(self.epoch, 4) if self.epoch is not None else None,
                        eta_seconds=int(self.eta_seconds) if self.eta_seconds is not None else None,
                        updated_at=updated_at, activity=self.activity)

    def metrics(self) -> Metrics:
        """status.metrics for this report (the fields it carries)."""
        return Metrics.model_validate({k: getattr(self, k) for k in Metrics.model_fields})


class Summary(Incoming):
    """The trainer's last word: on stdout, and as the pod's termination message (≤ 4 KiB), so the
    final status is complete even when every progress push was lost."""

    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = Field(default=None, ge=0)
    metrics: Metrics = Field(default_factory=Metrics)
    artifacts: Artifacts = Field(default_factory=Artifacts)
    evaluation: Evaluation | None = None
    dataset: DatasetStats | None = None
    error: str | None = None
    exit_code: int | None = None

    def status_fields(self) -> dict[str, Any]:
        """status.progress, status.metrics and status.artifacts from a successful run's summary."""
        out: dict[str, Any] = {}
        if self.step is not None:
            progress = Progress(step=self.step, total_steps=self.total_steps, epoch=self.epoch, percent=100,
                                eta_seconds=0)
            out["progress"] = progress.model_dump(by_alias=True, exclude_none=True)
        metrics = rounded(self.metrics.model_dump(by_alias=True, exclude_none=True))
        if metrics:
            out["metrics"] = metrics
        artifacts = self.artifacts.model_dump(by_alias=True, exclude_none=True)
        if artifacts:
            out["artifacts"] = artifacts
        if self.evaluation is not None:
            out["evaluation"] = self.evaluation.model_dump(by_alias=True, exclude_none=True)
        if self.dataset is not None:
            out["dataset"] = self.dataset.model_dump(by_alias=True, exclude_none=True)
        return out


def event_json(report: ProgressReport) -> dict[str, Any]:
    """A progress report as the trainer prints, records (metrics.jsonl) and pushes it: type and step
    first, for people reading the log."""
    unset = {name for name in ("dataset", "rewards", "eval_rewards") if getattr(report, name) is None}
    values = report.model_dump(by_alias=True, exclude=unset or None)
    if report.dataset is not None:
        values["dataset"] = report.dataset.model_dump(by_alias=True, exclude_none=True)
    return {"type": values.pop("type"), "step": values.pop("step"), **values}


def rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats to 6 significant decimals, as status shows them."""
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}
