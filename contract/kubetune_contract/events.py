"""What the trainer tells the operator: progress reports and the final summary (pydantic only).

One schema on both sides, next to the config contract: the trainer builds its events from these
models; the operator validates what arrives with the same models (report endpoint, termination
message), and the FineTuneJob status reuses `Progress`, `Metrics` and `Artifacts` as they are.
Field names are the camelCase of the status (`trainLoss`, `tokensPerSecond`, ...).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, ConfigDict, Field

from .config import Section


class Incoming(Section):
    """A message from a trainer: unknown fields are ignored (an older or newer trainer)."""

    model_config = ConfigDict(extra="ignore")


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


class ProgressReport(Metrics):
    """One progress event: pushed to the operator, printed, and appended to metrics.jsonl."""

    type: Literal["progress"] = "progress"
    step: int = Field(ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = Field(default=None, ge=0)
    eta_seconds: float | None = Field(default=None, ge=0)

    def progress(self, updated_at: str) -> Progress:
        """status.progress for this report."""
        percent = min(100, int(100 * self.step / self.total_steps)) if self.total_steps else None
        return Progress(step=self.step, total_steps=self.total_steps or None, percent=percent,
                        epoch=round(self.epoch, 4) if self.epoch is not None else None,
                        eta_seconds=int(self.eta_seconds) if self.eta_seconds is not None else None,
                        updated_at=updated_at)

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
        return out


def event_json(report: ProgressReport) -> dict[str, Any]:
    """A progress report as the trainer prints, records (metrics.jsonl) and pushes it: type and step
    first, for people reading the log."""
    values = report.model_dump(by_alias=True)
    return {"type": values.pop("type"), "step": values.pop("step"), **values}


def rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats to 6 significant decimals, as status shows them."""
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}
