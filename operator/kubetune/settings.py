"""Operator settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kubetune import __version__

DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{__version__}"


@dataclass(frozen=True)
class Settings:
    """Everything the operator can be configured with.

    Environment variables (all optional):

    - ``KUBETUNE_TRAINER_IMAGE``: trainer image when a FineTuneJob sets no ``spec.image``.
    - ``KUBETUNE_NAMESPACES``: comma-separated namespaces to watch; all namespaces when empty.
    - ``KUBETUNE_S3_ENDPOINT`` / ``KUBETUNE_S3_REGION`` / ``KUBETUNE_S3_INSECURE``: storage defaults
      for FineTuneJobs that set no ``spec.storage.endpoint``.
    - ``KUBETUNE_S3_SECRET``: default credentials Secret name (in the job's namespace).
    - ``KUBETUNE_GPU_RESOURCE_NAME``: GPU resource of FineTuneJobs that set none (nvidia.com/gpu).
    - ``KUBETUNE_DEFAULT_NODE_SELECTOR``: JSON object added to every training pod's nodeSelector.
    - ``KUBETUNE_RESYNC_SECONDS``: how often active jobs are re-checked in full (safety net).
    - ``KUBETUNE_REPORT_URL``: base URL at which training pods reach the operator's report
      endpoint, e.g. ``http://kubetune.kubetune-system.svc:8081``; no progress pushes when unset
      (the final summary still arrives through the termination message).
    - ``KUBETUNE_REPORT_KEY_FILE`` (or ``KUBETUNE_REPORT_KEY``, the value itself): secret key from
      which each job's report token is derived (HMAC of the job's UID); the chart mounts it from a
      Secret. When neither is set, a random key is made at start-up, and after a restart running
      jobs can no longer push progress (their final summary still arrives through the termination
      message).
    - ``KUBETUNE_REPORT_LISTEN``: ``host:port`` the report endpoint and /metrics listen on
      (default ``0.0.0.0:8081``; empty disables the server).
    - ``KUBETUNE_STATUS_INTERVAL``: at most one progress status write per job per this many seconds.
    - ``KUBETUNE_REPORT_RATE`` / ``KUBETUNE_REPORT_BURST``: per-job report rate limit.
    - ``KUBETUNE_TERMINATION_GRACE_SECONDS``: termination grace of training pods (default 300): time
      to finish a step and upload a checkpoint after SIGTERM; raise it for large adapters or full
      fine-tunes on a slow object store.
    - ``KUBETUNE_API_TIMEOUT``: seconds before any Kubernetes API request is abandoned (default 30).
    - ``KUBETUNE_STALL_SECONDS``: /healthz on the report port fails once a reconcile has run this
      long (default 300): with every API call bounded, only a wedged operator gets there.
    - ``KUBETUNE_RESTRICT_IMAGES_AND_SERVICE_ACCOUNTS``: ``true`` (the chart's default) fails a
      FineTuneJob that sets ``spec.image`` or ``spec.serviceAccountName`` unless its preset's limits
      list allowed ones (reason PolicyViolation; the chart's admission policy rejects it at apply).
    - ``KUBETUNE_LOG_LEVEL``: DEBUG, INFO (default) or WARNING.
    - ``KUBETUNE_LIVENESS_ENDPOINT``: e.g. ``http://0.0.0.0:8080/healthz``; off when unset.
    - ``KUBETUNE_TRAINER_COMMAND``: JSON list replacing the trainer command. A TEST DOUBLE hook
      only: the e2e tests run a small stand-in trainer with it; never set it in production.
    """

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    namespaces: tuple[str, ...] = ()
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_insecure: bool = False
    s3_secret: str | None = None
    gpu_resource_name: str = "nvidia.com/gpu"
    default_node_selector: dict[str, str] = field(default_factory=dict)
    resync_seconds: float = 30.0
    trainer_command: tuple[str, ...] = ("python", "-m", "kubetune_trainer")
    # Several processes per pod: torchrun that keeps the failed worker's exit code (the Job's
    # podFailurePolicy reads it), running the trainer module in each process.
    launcher_command: tuple[str, ...] = ("python", "-m", "kubetune_trainer.launch")
    liveness_endpoint: str | None = None
    log_level: str = "INFO"
    report_url: str | None = None
    report_listen: str | None = "0.0.0.0:8081"
    status_interval: float = 5.0
    report_rate: float = 2.0
    report_burst: float = 20.0
    report_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    report_key_generated: bool = True
    api_timeout: float = 30.0
    termination_grace_seconds: int = 300
    stall_seconds: float = 300.0
    restrict_images_and_service_accounts: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from environment variables (os.environ by default)."""
        env = os.environ if env is None else env
        command = env.get("KUBETUNE_TRAINER_COMMAND")
        key_file = env.get("KUBETUNE_REPORT_KEY_FILE")
        key = Path(key_file).read_text().strip() if key_file else env.get("KUBETUNE_REPORT_KEY") or ""
        return cls(
            report_key=key.encode() if key else secrets.token_bytes(32),
            report_key_generated=not key,
            trainer_image=env.get("KUBETUNE_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE,
            namespaces=tuple(n.strip() for n in env.get("KUBETUNE_NAMESPACES", "").split(",") if n.strip()),
            s3_endpoint=env.get("KUBETUNE_S3_ENDPOINT") or None,
            s3_region=env.get("KUBETUNE_S3_REGION") or None,
            s3_insecure=env.get("KUBETUNE_S3_INSECURE", "").lower() in ("1", "true", "yes"),
            s3_secret=env.get("KUBETUNE_S3_SECRET") or None,
            gpu_resource_name=env.get("KUBETUNE_GPU_RESOURCE_NAME") or "nvidia.com/gpu",
            default_node_selector=json.loads(env.get("KUBETUNE_DEFAULT_NODE_SELECTOR") or "{}"),
            resync_seconds=float(env.get("KUBETUNE_RESYNC_SECONDS") or 30),
            trainer_command=tuple(json.loads(command)) if command else cls.trainer_command,
            liveness_endpoint=env.get("KUBETUNE_LIVENESS_ENDPOINT") or None,
            log_level=(env.get("KUBETUNE_LOG_LEVEL") or "INFO").upper(),
            report_url=(env.get("KUBETUNE_REPORT_URL") or "").rstrip("/") or None,
            report_listen=env.get("KUBETUNE_REPORT_LISTEN", "0.0.0.0:8081") or None,
            status_interval=float(env.get("KUBETUNE_STATUS_INTERVAL") or 5),
            report_rate=float(env.get("KUBETUNE_REPORT_RATE") or 2),
            report_burst=float(env.get("KUBETUNE_REPORT_BURST") or 20),
            api_timeout=float(env.get("KUBETUNE_API_TIMEOUT") or 30),
            termination_grace_seconds=int(env.get("KUBETUNE_TERMINATION_GRACE_SECONDS") or 300),
            stall_seconds=float(env.get("KUBETUNE_STALL_SECONDS") or 300),
            restrict_images_and_service_accounts=env.get("KUBETUNE_RESTRICT_IMAGES_AND_SERVICE_ACCOUNTS", "")
            .lower() in ("1", "true", "yes"),
        )
