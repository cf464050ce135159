"""The FineTuneJob API (kubetune.io/v1alpha1): spec and status models, the single source of truth.

The CRD schema, the chart's CRD copy and docs/api.md are generated from these models
(`kubetune crd`). Training sections are the trainer's own models (kubetune_contract.config), so a
section means the same thing in a FineTuneJob and in a standalone trainer config; status.progress,
status.metrics and status.artifacts are the trainer's own event models (kubetune_contract.events).
This module imports no kopf, kubernetes client or torch.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from kubetune import rules
from kubetune_contract.config import (
    NAME_MAX,
    EvaluationSpec,
    JudgeSpec,
    OciSpec,
    OutputSpec,
    RunSections,
    Section,
    StorageSpec,
    check_strategy,
)
from kubetune_contract.config import DistributionSpec as TrainerDistributionSpec
from kubetune_contract.estimate import parse_quantity
from kubetune_contract.events import Artifacts, DatasetStats, Evaluation, Metrics, Progress

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubetune", "ml"]



class Phase(StrEnum):
    """The phase of a FineTuneJob (status.phase): the one list of them."""

    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    PREEMPTED = "Preempted"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})
"""Phases a job does not leave."""
RECONCILING = frozenset({Phase.PENDING, Phase.QUEUED, Phase.RUNNING, Phase.PREEMPTED})
"""Phases of a job on its way (condition Reconciling true)."""

# Spec fields that define the training run. They cannot change after creation (CEL
# `self == oldSelf`): a running job would otherwise no longer match its spec.
IMMUTABLE_FIELDS = ("model", "dataset", "training", "lora", "quantization", "output", "storage", "preset")

Json = dict[str, Any]
"""A free-form Kubernetes object (kept as-is: x-kubernetes-preserve-unknown-fields)."""


class SecretRef(Section):
    """A Secret in the FineTuneJob's namespace holding S3 credentials."""

    name: str = Field(min_length=1, max_length=NAME_MAX)
    """Secret name."""
    access_key_key: str = Field(default="AWS_ACCESS_KEY_ID", max_length=NAME_MAX)
    """Key of the access key id in the Secret."""
    secret_key_key: str = Field(default="AWS_SECRET_ACCESS_KEY", max_length=NAME_MAX)
    """Key of the secret access key in the Secret."""


class JobStorageSpec(StorageSpec):
    """S3-compatible object store for s3:// sources and outputs; credentials from a Secret."""

    secret_ref: SecretRef | None = None
    """Secret with the credentials; they reach the pod only as secretKeyRef environment variables."""


MAX_NODES = 64


class DistributionSpec(TrainerDistributionSpec):
    """How many training processes run (one per GPU of each pod, on one or several pods) and how
    they share the work (strategy)."""

    nodes: int = Field(default=1, ge=1, le=MAX_NODES)
    """Pods (nodes) of the run. Above 1: an Indexed Job of this many pods and a headless Service;
    torchrun rendezvouses at pod 0, and a failed pod restarts the whole group from its newest
    checkpoint. The FineTuneJob's name may then have at most 52 characters (pod hostnames)."""
    processes_per_node: int = Field(default=1, ge=1, le=64)
    """Training processes of a CPU-only job (resources.gpus 0; gloo backend). With GPUs there is one
    process per GPU and this stays 1."""


class ResourcesSpec(Section):
    """What the training pod requests."""

    gpus: int = Field(default=1, ge=0, le=64)
    """GPUs per node (resource limits of gpuResourceName). 0 runs on CPU."""
    gpu_resource_name: str | None = Field(default=None, min_length=1, max_length=NAME_MAX)
    """Extended resource name of the GPU; the operator's default (nvidia.com/gpu) when unset."""
    cpu: str | None = Field(default=None, max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    """CPU request and limit, e.g. "8" or "500m"."""
    memory: str | None = Field(default=None, max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?)?$")
    """Memory request and limit, e.g. "64Gi"."""
    gpu_memory: str | None = Field(default=None, max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?)?$")
    """Memory of one GPU, e.g. "80Gi". When set, the operator estimates the run's peak GPU memory
    before creating the Job and fails the job (reason WontFit) if it cannot fit; see docs/operations.md."""
    shared_memory: str = Field(default="8Gi", max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?)?$")
    """Size of /dev/shm (a memory-backed emptyDir) for data loader workers."""
    distribution: DistributionSpec = Field(default_factory=DistributionSpec)
    """Processes and the data-parallel strategy (ddp or fsdp)."""

    @field_validator("gpu_memory")
    @classmethod
    def _positive_gpu_memory(cls, v: str | None) -> str | None:
        if v is not None:
            parse_quantity(v)
        return v


class SchedulingSpec(Section):
    """Where and when the training pod runs."""

    node_selector: dict[str, str] | None = None
    """Node labels the pod requires."""
    tolerations: list[Json] | None = Field(default=None, max_length=64)
    """Pod tolerations (core/v1 Toleration)."""
    affinity: Json | None = None
    """Pod affinity (core/v1 Affinity)."""
    priority_class_name: str | None = Field(default=None, max_length=NAME_MAX)
    """PriorityClass of the pod."""
    queue_name: str | None = Field(default=None, max_length=63)
    """Kueue LocalQueue: the Job is created suspended with the kueue.x-k8s.io/queue-name label."""
    workload_priority_class_name: str | None = Field(default=None, max_length=NAME_MAX)
    """Kueue WorkloadPriorityClass of the job (the Job's kueue.x-k8s.io/priority-class label); takes
    effect with queueName. It orders the queue, and a ClusterQueue with preemption (e.g. withinClusterQueue:
    LowerPriority) evicts a running lower-priority job for it: that job checkpoints, shows phase
    Preempted, waits in its queue again and resumes from its checkpoint."""
    scheduler_name: str | None = Field(default=None, max_length=NAME_MAX)
    """Scheduler of the pod (default scheduler when unset)."""


class KeySelector(Section):
    """A key of a Secret or ConfigMap in the FineTuneJob's namespace."""

    name: str = Field(min_length=1, max_length=NAME_MAX)
    """Secret or ConfigMap name."""
    key: str = Field(min_length=1, max_length=NAME_MAX)
    """Key in it."""
    optional: bool | None = None
    """Start the pod even if the object or key is missing."""


class EnvVarSource(Section):
    """Where the value of a variable comes from: one key of a Secret or of a ConfigMap."""

    secret_key_ref: KeySelector | None = None
    """A key of a Secret (e.g. an HF token); a preset's limits.allowedSecrets can bound which."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap."""

    @model_validator(mode="after")
    def _one(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise rules.ONE_ENV_SOURCE.error()
        return self


class EnvVar(Section):
    """An extra environment variable of the trainer (core/v1 EnvVar, valueFrom a Secret or ConfigMap key).

    Names the operator sets (KUBETUNE_*, AWS_*, HF_HOME, HOME, TMPDIR, PYTHONUNBUFFERED) are rejected;
    a FineTuneJob also may not set device, loader, interpreter or endpoint variables (docs/operations.md).
    """

    name: str = Field(min_length=1, max_length=NAME_MAX)
    """Variable name; not one the operator sets (KUBETUNE_*, AWS_*, HF_HOME, HOME, TMPDIR, PYTHONUNBUFFERED)."""

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if rules.reserved_env_name(name):
            raise ValueError(rules.reserved_env_message(name))
        return name
    value: str | None = None
    """Literal value."""
    value_from: EnvVarSource | None = None
    """Source of the value: {secretKeyRef: {name, key}} (e.g. an HF token) or {configMapKeyRef: {name, key}}."""


class LocalObjectReference(Section):
    """A reference to an object in the same namespace."""

    name: str = Field(min_length=1, max_length=NAME_MAX)
    """Object name."""


class CacheVolumeSpec(Section):
    """A PersistentVolumeClaim that caches downloaded models and datasets between runs."""

    claim_name: str = Field(min_length=1, max_length=NAME_MAX)
    """PVC name in the FineTuneJob's namespace."""


PresetKind = Literal["ClusterFineTunePreset", "FineTunePreset"]


class JudgeSecretRef(Section):
    """The Secret key holding the judge endpoint's API key."""

    name: str = Field(min_length=1, max_length=NAME_MAX)
    """Secret name, in the FineTuneJob's namespace."""
    key: str = Field(default="apiKey", min_length=1, max_length=NAME_MAX)
    """Key of the API key in the Secret."""


class JobJudgeSpec(JudgeSpec):
    """The judge endpoint; its API key comes from a Secret (KUBETUNE_JUDGE_API_KEY in the pod)."""

    secret_ref: JudgeSecretRef | None = None
    """Secret with the endpoint's API key; none for an endpoint without authentication."""


class JobEvaluationSpec(EvaluationSpec):
    """How the trained model is measured after training, and the promotion gate (docs/evaluation.md)."""

    judge: JobJudgeSpec | None = None
    """The judge endpoint, for the judge metric."""


class JobOciSpec(OciSpec):
    """The OCI registry to push to; its credentials come from a kubernetes.io/dockerconfigjson Secret."""

    secret_ref: LocalObjectReference | None = None
    """Secret of type kubernetes.io/dockerconfigjson with the registry's credentials (its
    .dockerconfigjson key); none for a registry without authentication."""


class JobOutputSpec(OutputSpec):
    """Where the adapter, checkpoints and reports go; optionally an OCI registry too."""

    oci: JobOciSpec | None = None
    """Also push the adapter, model card, evaluation and manifest to an OCI registry as one artifact;
    its digest goes to status.artifacts.ociDigest (docs/artifacts.md#oci-artifacts)."""


class PresetRef(Section):
    """The preset whose defaults and limits apply to a FineTuneJob."""

    kind: PresetKind = "ClusterFineTunePreset"
    """ClusterFineTunePreset (cluster-wide) or FineTunePreset (in the job's namespace)."""
    name: str = Field(min_length=1, max_length=NAME_MAX)
    """Preset name."""


class FineTuneJobSpec(RunSections):
    """Desired state of a FineTuneJob: what to train, with what, and where it runs.

    The training sections (model … storage) are the trainer's own; the output path gets
    <namespace>/<name>/<first 8 characters of the UID> appended.
    """

    output: JobOutputSpec
    """Where the adapter and reports go; the run's own path is appended."""
    storage: JobStorageSpec = Field(default_factory=JobStorageSpec)
    """S3 endpoint and credentials."""
    evaluation: JobEvaluationSpec = Field(default_factory=JobEvaluationSpec)
    """How the trained model is measured after training (tuned vs backbone) and the promotion gate."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """GPUs, CPU and memory."""
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    """Node selection, priority and queueing."""
    image: str | None = Field(default=None, max_length=1024)
    """Trainer image; the operator's default trainer image when unset."""
    image_pull_secrets: list[LocalObjectReference] | None = Field(default=None, max_length=16)
    """Secrets for pulling the trainer image."""
    service_account_name: str | None = Field(default=None, max_length=NAME_MAX)
    """ServiceAccount of the training pod. Only then is a service-account token mounted in the pod."""
    env: list[EnvVar] | None = Field(default=None, max_length=128)
    """Extra environment variables of the trainer."""
    cache_volume: CacheVolumeSpec | None = None
    """PVC that caches downloads."""
    suspend: bool = False
    """Suspend the job: running pods are stopped; false resumes (from the last checkpoint)."""
    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Retries of a failed pod (invalid input is never retried). Over several nodes it counts
    restarts of the whole group."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Time limit of the whole run, in seconds."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the Job and its pods this long after the end; the FineTuneJob and its status stay."""
    preset: PresetRef | None = None
    """Preset whose defaults fill the fields this spec leaves unset and whose limits bound it; the
    namespace's kubetune.io/default-preset annotation when unset. Fixed at creation."""

    @model_validator(mode="after")
    def _processes(self) -> FineTuneJobSpec:
        if self.resources.gpus and self.resources.distribution.processes_per_node != 1:
            raise rules.PROCESSES_PER_NODE_ON_CPUS.error()
        return self

    @model_validator(mode="after")
    def _strategy(self) -> FineTuneJobSpec:
        check_strategy(self.resources.distribution.strategy, self, "resources.distribution.strategy")
        if self.resources.distribution.strategy == "fsdp" and self.processes() == 1:
            raise rules.FSDP_NEEDS_PROCESSES.error()
        return self

    def processes(self) -> int:
        """Training processes of the whole run: one per GPU, or processesPerNode on CPUs, on every node."""
        per_node = self.resources.gpus or self.resources.distribution.processes_per_node
        return per_node * self.resources.distribution.nodes

    @model_validator(mode="after")
    def _sources_in_the_cluster(self, info: ValidationInfo) -> FineTuneJobSpec:
        if (info.context or {}).get(LOCAL_SOURCES):
            return self  # `kubetune estimate` on this machine reads a local backbone's config.json
        for field, value in (("model.source", self.model.source), ("model.tokenizer", self.model.tokenizer),
                             ("dataset.train", self.dataset.train), ("dataset.validation", self.dataset.validation)):
            problem = rules.source_problem(value) if value else None
            if problem:
                raise ValueError(f"{field}: {problem}")
        return self

    @model_validator(mode="after")
    def _output_in_s3(self) -> FineTuneJobSpec:
        if not self.output.location.startswith("s3://"):
            raise rules.OUTPUT_IN_S3.error()
        return self


LOCAL_SOURCES = "local-sources"  # validation context: local paths allowed (a manifest read on this machine)


class Condition(Section):
    """A Kubernetes API convention condition."""

    type: str
    """Condition type: Ready, Reconciling, Stalled, Promotable (evaluation.gate)."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str
    """CamelCase reason."""
    message: str = ""
    """Human-readable details."""
    last_transition_time: str
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """The spec generation the condition was computed for."""


class AppliedPreset(Section):
    """The preset a FineTuneJob's Job was made with."""

    kind: PresetKind
    """ClusterFineTunePreset or FineTunePreset."""
    name: str
    """Preset name."""
    generation: int
    """metadata.generation of the preset whose defaults were applied; later edits of the preset do
    not change the job."""


class FineTuneJobStatus(Section):
    """Observed state of a FineTuneJob; written by the operator only."""

    phase: Phase | None = None
    """Pending, Queued, Running, Preempted, Succeeded, Failed or Suspended."""
    reason: str | None = None
    """Why the job is in this phase (CamelCase)."""
    message: str | None = None
    """What happened and what to do."""
    conditions: list[Condition] | None = None
    """Ready, Reconciling and Stalled (API conventions); Promotable with evaluation.gate."""
    observed_generation: int | None = None
    """The spec generation this status describes."""
    start_time: str | None = None
    """When training first started."""
    completion_time: str | None = None
    """When the job succeeded or failed."""
    cleanup_time: str | None = None
    """When the Job and its pods were removed after the end (ttlSecondsAfterFinished)."""
    job_name: str | None = None
    """The batch/v1 Job that runs the trainer."""
    attempts: int | None = None
    """Pods started so far (1 + retries)."""
    stall_restarts: int | None = Field(default=None, ge=0)
    """Times the operator replaced the pods of this run because it stalled (training.stallAction
    restart); at most backoffLimit, then a stalled run is left as it is."""
    progress: Progress | None = None
    """Training progress."""
    metrics: Metrics | None = None
    """Latest metrics."""
    artifacts: Artifacts | None = None
    """Results."""
    dataset: DatasetStats | None = None
    """The training data as the trainer counted it before the model loaded, and the time estimate."""
    evaluation: Evaluation | None = None
    """The evaluation after training: each metric tuned vs base, and the promotion gate's verdict."""
    preset: AppliedPreset | None = None
    """The preset whose defaults were applied."""


def name_problem(name: str, spec: FineTuneJobSpec) -> str | None:
    """What is wrong with a FineTuneJob's name for its spec (the CRD's metadata rule), or None."""
    nodes = spec.resources.distribution.nodes
    if nodes > 1 and len(name) > rules.MAX_MULTI_NODE_NAME:
        return f"{rules.MULTI_NODE_NAME.message}; this one has {len(name)} (nodes {nodes})"
    return None


class FineTuneJob(Section):
    """A fine-tuning run of a large language model: LoRA, 8-bit or 4-bit QLoRA on a GPU pod."""

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: Json = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
