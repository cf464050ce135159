"""Operator settings, read once from the environment (``KUBETUNE_<FIELD>``; the Helm chart sets them).

Each setting is declared once, here: its type, its default and its description (the field's
docstring). pydantic-settings reads the environment; docs/operations.md's table of settings is
generated from this model (``kubetune crd``). An empty variable means the default, except
``KUBETUNE_REPORT_LISTEN``, which an empty value turns off.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubetune import __version__

DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{__version__}"
ENV_PREFIX = "KUBETUNE_"


class Settings(BaseSettings):
    """Everything the operator can be configured with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore",
                                      use_attribute_docstrings=True)

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """Trainer image when a FineTuneJob sets no spec.image."""
    namespaces: Annotated[tuple[str, ...], NoDecode] = ()
    """Comma-separated namespaces to watch; all namespaces when empty."""
    s3_endpoint: str | None = None
    """Storage default for FineTuneJobs that set no spec.storage.endpoint (AWS S3 when unset)."""
    s3_region: str | None = None
    """Storage default: the bucket region."""
    s3_insecure: bool = False
    """Storage default: plain HTTP (a local MinIO)."""
    s3_secret: str | None = None
    """Default credentials Secret (in the job's namespace)."""
    gpu_resource_name: str = "nvidia.com/gpu"
    """GPU resource of FineTuneJobs that set no resources.gpuResourceName."""
    default_node_selector: dict[str, str] = Field(default_factory=dict)
    """JSON object of labels added to every training pod's nodeSelector."""
    resync_seconds: float = 30.0
    """How often active jobs (and finished ones until their TTL clean-up is done) are re-checked in full."""
    trainer_command: tuple[str, ...] = ("python", "-m", "kubetune_trainer")
    """JSON list replacing the trainer command. A TEST DOUBLE hook for the e2e tests only: never set
    it in production."""
    launcher_command: tuple[str, ...] = ("python", "-m", "kubetune_trainer.launch")
    """Several processes per pod: torchrun that keeps the failed worker's exit code (the Job's
    podFailurePolicy reads it), running the trainer module in each process."""
    liveness_endpoint: str | None = None
    """e.g. http://0.0.0.0:8080/healthz; off when unset."""
    log_level: str = "INFO"
    """DEBUG, INFO or WARNING."""
    report_url: str | None = None
    """Base URL at which training pods reach the report endpoint (e.g.
    http://kubetune.kubetune-system.svc:8081); no progress pushes when unset (the final summary still
    arrives through the termination message)."""
    report_listen: str | None = "0.0.0.0:8081"
    """host:port of the report endpoint and /metrics; empty turns the server off."""
    status_interval: float = 5.0
    """At most one progress status write per job per this many seconds."""
    report_rate: float = 2.0
    """Reports per second per job."""
    report_burst: float = 20.0
    """Reports a job may send at once above the rate."""
    report_key_file: Path | None = None
    """File holding the secret key each job's report token is derived from (HMAC of the job's UID);
    the chart mounts its <release>-report-key Secret. KUBETUNE_REPORT_KEY holds the value itself.
    Unset: a random key per start, and after a restart running jobs can no longer push progress."""
    report_key: bytes = Field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    """The key itself (from KUBETUNE_REPORT_KEY_FILE or KUBETUNE_REPORT_KEY, else random)."""
    report_key_generated: bool = Field(default=True, exclude=True)
    """Whether the key was made at start-up (no file or value given)."""
    api_timeout: float = 30.0
    """Seconds before any Kubernetes API request is abandoned (and retried)."""
    termination_grace_seconds: int = 300
    """Training pods' termination grace: one step plus one checkpoint upload after SIGTERM; raise it
    for large adapters or full fine-tunes on a slow object store."""
    stall_seconds: float = 300.0
    """/healthz on the report port fails once a reconcile has run this long."""
    restrict_images_and_service_accounts: bool = False
    """Fail a job (PolicyViolation) that sets spec.image or spec.serviceAccountName its preset does not
    allow; the chart sets true (and its admission policy refuses such a job at apply)."""

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        """An empty variable means the default (KUBETUNE_REPORT_LISTEN: off); the key comes from its
        file or value."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v != "" or k == "report_listen"}
        if data.get("report_listen") == "":
            data["report_listen"] = None
        key_file = data.pop("report_key_file", None)
        key = Path(key_file).read_text().strip() if key_file else data.get("report_key")
        if key:
            data["report_key"] = key.encode() if isinstance(key, str) else key
            data["report_key_generated"] = False
        return data

    @field_validator("namespaces", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(n.strip() for n in value.split(",") if n.strip())
        return value

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("report_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") or None if value else None


DOCS = Path("docs/operations.md")
DOCS_BEGIN = "<!-- settings: generated by `kubetune crd` from operator/kubetune/settings.py -->"
DOCS_END = "<!-- /settings -->"


def docs_with_table(text: str) -> str:
    """docs/operations.md with its settings table (between DOCS_BEGIN and DOCS_END) made anew."""
    before, begin, rest = text.partition(DOCS_BEGIN)
    _, end, after = rest.partition(DOCS_END)
    if not begin or not end:
        raise ValueError(f"{DOCS}: no {DOCS_BEGIN} ... {DOCS_END} block for the settings table")
    return f"{before}{DOCS_BEGIN}\n{markdown_table()}\n{DOCS_END}{after}"


def markdown_table() -> str:
    """docs/operations.md's table of settings, from the model."""
    rows = ["| variable | default | |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if name in ("report_key", "report_key_generated", "launcher_command"):
            continue  # set through another variable, or not a setting
        default = field.get_default(call_default_factory=False)
        if field.default_factory is not None:
            shown = "`{}`"
        elif default is None or default == ():
            shown = "all" if default == () else "none"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        elif isinstance(default, tuple):
            shown = f"`{' '.join(default)}`"
        else:
            shown = f"`{default:g}`" if isinstance(default, float) else f"`{default}`"
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {text} |")
    return "\n".join(rows)
