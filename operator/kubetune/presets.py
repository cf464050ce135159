"""FineTunePreset and ClusterFineTunePreset (kubetune.io/v1alpha1): defaults and limits for FineTuneJobs.

A preset holds defaults for FineTuneJob spec sections and limits on what a job may ask for. The
effective spec of a job is the job's own spec over its preset's defaults (`effective_spec`); the
limits are enforced at apply time by the chart's ValidatingAdmissionPolicies and checked again by
the operator on the effective spec (`violations`) before it creates the Job.

The CRD schemas are generated from these models like FineTuneJob's (`kubetune crd`). This module
imports no kopf, kubernetes client or torch.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field

from kubetune import rules
from kubetune.api import (
    GROUP,
    CacheVolumeSpec,
    EnvVar,
    FineTuneJobSpec,
    JobStorageSpec,
    LocalObjectReference,
    PresetKind,
    PresetRef,
    ResourcesSpec,
    SchedulingSpec,
)
from kubetune.render import required_claims
from kubetune_contract.config import NAME_MAX, Quantization, Section, TrainingSpec

Json = dict[str, Any]

KIND = "FineTunePreset"
CLUSTER_KIND = "ClusterFineTunePreset"
PLURALS = {KIND: "finetunepresets", CLUSTER_KIND: "clusterfinetunepresets"}
SHORT_NAMES = {KIND: ["ftp"], CLUSTER_KIND: ["cftp"]}
PRESET_REQUIRED_LABEL = f"{GROUP}/preset-required"
"""Namespace label: "true" refuses FineTuneJobs that use no preset (neither spec.preset nor the
namespace's default-preset annotation)."""
DEFAULT_PRESET_ANNOTATION = f"{GROUP}/default-preset"
"""Namespace annotation naming the preset of FineTuneJobs that name none: `<name>` for a
ClusterFineTunePreset, `FineTunePreset/<name>` for a FineTunePreset in the job's namespace."""

# Spec fields of a FineTuneJob a preset may default (camelCase, as in the API).
DEFAULTABLE_FIELDS = ("image", "imagePullSecrets", "serviceAccountName", "env", "resources", "scheduling",
                      "storage", "cacheVolume", "training", "activeDeadlineSeconds")


class PresetDefaults(Section):
    """Defaults for the FineTuneJob spec: a field the job leaves unset takes the preset's value.

    Sections merge field by field (the job wins), env merges by name, other lists are replaced.
    training.epochs and training.maxSteps are alternatives: a job that sets one drops the
    preset's other; a job that sets an integer training.batchSize drops the preset's
    globalBatchSize (which is only for batchSize auto).
    """

    image: str | None = Field(default=None, max_length=1024)
    """Trainer image."""
    image_pull_secrets: list[LocalObjectReference] | None = Field(default=None, max_length=16)
    """Secrets for pulling the trainer image."""
    service_account_name: str | None = Field(default=None, max_length=NAME_MAX)
    """ServiceAccount of the training pod."""
    env: list[EnvVar] | None = Field(default=None, max_length=128)
    """Extra environment variables of the trainer (a job's variable of the same name wins)."""
    resources: ResourcesSpec | None = None
    """GPUs, CPU and memory."""
    scheduling: SchedulingSpec | None = None
    """Node selection, tolerations, priority and queue (queueName)."""
    storage: JobStorageSpec | None = None
    """S3 endpoint and credentials Secret."""
    cache_volume: CacheVolumeSpec | None = None
    """PVC that caches downloads."""
    training: TrainingSpec | None = None
    """Training hyperparameters."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Time limit of the whole run, in seconds."""


class LabelSelectorRequirement(Section):
    """A label selector requirement (metav1.LabelSelectorRequirement)."""

    key: str = Field(min_length=1, max_length=317)
    """Label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """In, NotIn, Exists or DoesNotExist."""
    values: list[str] | None = Field(default=None, max_length=64)
    """Values for In and NotIn."""


class LabelSelector(Section):
    """A label selector (metav1.LabelSelector): every matchLabels pair and every requirement hold."""

    match_labels: dict[str, str] | None = None
    """Labels that must be present with these values."""
    match_expressions: list[LabelSelectorRequirement] | None = Field(default=None, max_length=32)
    """Requirements on labels."""

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in (self.match_labels or {}).items()):
            return False
        for req in self.match_expressions or []:
            present, value, values = req.key in labels, labels.get(req.key), req.values or []
            if not {"In": present and value in values, "NotIn": not present or value not in values,
                    "Exists": present, "DoesNotExist": not present}[req.operator]:
                return False
        return True


class PresetLimits(Section):
    """What a FineTuneJob using this preset may ask for; an unset limit allows anything.

    Checked on the effective spec (the job over the preset's defaults).
    """

    allowed_model_prefixes: list[str] | None = Field(default=None, max_length=64)
    """model.source (and model.tokenizer) must start with one of these, e.g. s3://models/ or hf://Qwen/."""
    allowed_output_prefixes: list[str] | None = Field(default=None, max_length=64)
    """output.location must start with one of these, e.g. s3://runs/team-a/."""
    allowed_oci_repositories: list[str] | None = Field(default=None, max_length=64)
    """output.oci.repository must start with one of these, e.g. ghcr.io/acme/ (an empty list: no job
    may push to a registry)."""
    allowed_images: list[str] | None = Field(default=None, max_length=64)
    """A spec.image the job sets must start with one of these (end an entry with ':' or '@' to pin a
    repository). Where the chart restricts images (the default), a job may set spec.image only
    when its preset lists it here."""
    allowed_service_accounts: list[str] | None = Field(default=None, max_length=64)
    """A spec.serviceAccountName the job sets must be one of these. Where the chart restricts service
    accounts (the default), a job may set one only when its preset lists it here."""
    allowed_pvcs: list[str] | None = Field(default=None, max_length=64)
    """PersistentVolumeClaims the job may mount (cacheVolume.claimName and pvc:// sources)."""
    max_gpus_per_node: int | None = Field(default=None, ge=0, le=64)
    """At most this many resources.gpus."""
    max_nodes: int | None = Field(default=None, ge=1)
    """At most this many resources.distribution.nodes."""
    allowed_quantizations: list[Quantization] | None = Field(default=None, max_length=3)
    """quantization must be one of these."""
    max_steps: int | None = Field(default=None, ge=1)
    """training.maxSteps at most this. The job must then train by steps: one that trains by epochs
    (training.epochs, or neither field: one epoch) has no bound on its steps and is refused."""
    max_epochs: float | None = Field(default=None, gt=0)
    """training.epochs at most this."""
    allowed_storage_endpoints: list[str] | None = Field(default=None, max_length=64)
    """storage.endpoint (host[:port]) a job sets must be one of these. Unset while allowedModelPrefixes or
    allowedOutputPrefixes is set: a job may not choose its own endpoint (other than the preset's
    default), since s3:// prefixes only mean something on a known store."""
    allow_trust_remote_code: bool | None = None
    """false: model.trustRemoteCode must stay false (no Python code from the backbone's repository)."""
    allowed_priority_classes: list[str] | None = Field(default=None, max_length=64)
    """scheduling.priorityClassName a job sets must be one of these."""
    allowed_workload_priority_classes: list[str] | None = Field(default=None, max_length=64)
    """scheduling.workloadPriorityClassName (Kueue) a job sets must be one of these."""
    allowed_toleration_keys: list[str] | None = Field(default=None, max_length=64)
    """Each toleration a job sets must name one of these keys (a toleration without a key tolerates
    every taint and is refused)."""
    allowed_node_labels: list[str] | None = Field(default=None, max_length=64)
    """Each scheduling.nodeSelector entry a job sets must be listed as `key` (any value) or `key=value`;
    a job may then not set scheduling.affinity."""
    allowed_env: list[str] | None = Field(default=None, max_length=128)
    """Environment variables a job may set (spec.env names; an entry ending in `*` is a prefix, e.g.
    `WANDB_*`). The variables no job may set (docs/operations.md) stay refused even if listed."""
    allowed_queues: list[str] | None = Field(default=None, max_length=64)
    """scheduling.queueName (Kueue LocalQueue) must be one of these: a job without a queue is refused."""
    allowed_secrets: list[str] | None = Field(default=None, max_length=64)
    """Secrets a job may reference: spec.env secretKeyRef, storage.secretRef, evaluation.judge.secretRef,
    output.oci.secretRef and imagePullSecrets."""


class FineTunePresetSpec(Section):
    """Defaults and limits for the FineTuneJobs that use this preset."""

    description: str | None = Field(default=None, max_length=1024)
    """What the preset is for, shown to users."""
    namespace_selector: LabelSelector | None = None
    """ClusterFineTunePreset only: the namespaces whose FineTuneJobs may use this preset (a
    metav1.LabelSelector on the namespace's labels); unset: every namespace. An empty selector
    ({}) also selects every namespace."""
    defaults: PresetDefaults | None = None
    """Values of fields a FineTuneJob leaves unset."""
    limits: PresetLimits | None = None
    """What a FineTuneJob may ask for."""


class FineTunePreset(Section):
    """Defaults and limits for FineTuneJobs of one namespace (or, as ClusterFineTunePreset, of all)."""

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: PresetKind = "FineTunePreset"
    metadata: Json = Field(default_factory=dict)
    spec: FineTunePresetSpec = Field(default_factory=FineTunePresetSpec)


def parse_ref(value: str) -> PresetRef:
    """A namespace's default-preset annotation: `<name>` or `<Kind>/<name>`."""
    kind, _sep, name = value.strip().rpartition("/")
    if kind not in ("", KIND, CLUSTER_KIND):
        raise ValueError(f"{DEFAULT_PRESET_ANNOTATION}: unknown preset kind {kind!r}; "
                         f"use <name> or FineTunePreset/<name>")
    return PresetRef.model_validate({"kind": kind or CLUSTER_KIND, "name": name})


def preset_ref(spec: Json, namespace: Json | None) -> PresetRef | None:
    """The preset of a FineTuneJob: spec.preset, else its namespace's default-preset annotation."""
    if spec.get("preset"):
        return PresetRef.model_validate(spec["preset"])
    value = (((namespace or {}).get("metadata") or {}).get("annotations") or {}).get(DEFAULT_PRESET_ANNOTATION)
    return parse_ref(value) if value and value.strip() else None


def preset_defaults(preset: Json) -> Json:
    """The defaults a preset sets, as written (validated; nothing filled in)."""
    spec = FineTunePresetSpec.model_validate(preset.get("spec") or {})
    if spec.defaults is None:
        return {}
    result: Json = spec.defaults.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return result


def merge(defaults: Json, job: Json) -> Json:
    """The job's spec over a preset's defaults: objects merge key by key, the job wins."""
    merged = copy.deepcopy(defaults)
    for key, value in job.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def effective_spec(job: Json, defaults: Json) -> Json:
    """The spec that runs: the FineTuneJob's spec over its preset's defaults."""
    base = copy.deepcopy(defaults)
    training = job.get("training") or {}
    if ("epochs" in training or "maxSteps" in training) and "training" in base:
        for key in ("epochs", "maxSteps"):
            base["training"].pop(key, None)
    if training.get("batchSize", "auto") != "auto" and "training" in base:
        base["training"].pop("globalBatchSize", None)  # only for batchSize auto
    spec = merge(base, {k: v for k, v in job.items() if k != "env"})
    queue = (base.get("scheduling") or {}).get("queueName")
    if queue and not (spec.get("scheduling") or {}).get("queueName"):
        spec["scheduling"]["queueName"] = queue  # a preset's queue cannot be cleared ("" or null)
    if "env" in base or "env" in job:
        own = {e["name"] for e in job.get("env") or []}
        spec["env"] = [e for e in base.get("env") or [] if e["name"] not in own] + list(job.get("env") or [])
    return spec


def _prefixed(value: str, prefixes: list[str]) -> bool:
    return any(value.startswith(prefix) for prefix in prefixes)


def _listed(values: list[str]) -> str:
    return ", ".join(values) if values else "(none)"


def violations(spec: FineTuneJobSpec, job: Json, limits: PresetLimits | None, *, preset: str | None,
               restrict_images_and_accounts: bool, defaults: Json | None = None) -> list[str]:
    """Each way the effective spec breaks the preset's limits, naming the field and the limit.

    `job` is the FineTuneJob's own spec (for spec.image and spec.serviceAccountName: a preset's
    own default is not a user's choice). `preset` is "Kind/name", or None for a job without one.
    """
    found: list[str] = [f"spec.env: {rules.denied_env_message(str(var.get('name')))}"
                        for var in job.get("env") or [] if rules.denied_env_name(str(var.get("name")))]
    where = preset or "no preset"
    defaults = defaults or {}
    for field, allowed, what, limit in (
            ("image", limits and limits.allowed_images, "image", "allowedImages"),
            ("serviceAccountName", limits and limits.allowed_service_accounts, "service account",
             "allowedServiceAccounts")):
        if restrict_images_and_accounts and job.get(field) and not allowed:
            found.append(f"spec.{field}: a FineTuneJob without a preset cannot choose its {what}" if preset is None
                         else f"spec.{field}: {preset} allows no user-chosen {what} (limits.{limit} is empty)")
    if limits is None:
        return found
    if limits.allowed_model_prefixes is not None:
        for field, value in (("model.source", spec.model.source), ("model.tokenizer", spec.model.tokenizer)):
            if value and not _prefixed(value, limits.allowed_model_prefixes):
                found.append(f"spec.{field}: {value} is not under limits.allowedModelPrefixes of {where} "
                             f"({_listed(limits.allowed_model_prefixes)})")
    if limits.allowed_output_prefixes is not None and not _prefixed(spec.output.location,
                                                                    limits.allowed_output_prefixes):
        found.append(f"spec.output.location: {spec.output.location} is not under limits.allowedOutputPrefixes "
                     f"of {where} ({_listed(limits.allowed_output_prefixes)})")
    oci = spec.output.oci
    if limits.allowed_oci_repositories is not None and oci is not None and not _prefixed(
            oci.repository, limits.allowed_oci_repositories):
        found.append(f"spec.output.oci.repository: {oci.repository} is not under limits.allowedOciRepositories "
                     f"of {where} ({_listed(limits.allowed_oci_repositories)})")
    image, account = job.get("image"), job.get("serviceAccountName")  # the job's own: a default is the platform's
    if limits.allowed_images and image and not _prefixed(image, limits.allowed_images):
        found.append(f"spec.image: {image} is not in limits.allowedImages of {where} "
                     f"({_listed(limits.allowed_images)})")
    accounts = limits.allowed_service_accounts
    if accounts and account and account not in accounts:
        found.append(f"spec.serviceAccountName: {account} is not in "
                     f"limits.allowedServiceAccounts of {where} ({_listed(accounts)})")
    if limits.allowed_pvcs is not None:
        claims = set(required_claims(spec))
        for claim in sorted(claims - set(limits.allowed_pvcs)):
            field = ("cacheVolume.claimName" if spec.cache_volume and spec.cache_volume.claim_name == claim
                     else "pvc:// source")
            found.append(f"spec.{field}: PVC {claim} is not in limits.allowedPvcs of {where} "
                         f"({_listed(limits.allowed_pvcs)})")
    if limits.max_gpus_per_node is not None and spec.resources.gpus > limits.max_gpus_per_node:
        found.append(f"spec.resources.gpus: {spec.resources.gpus} is more than limits.maxGpusPerNode "
                     f"{limits.max_gpus_per_node} of {where}")
    nodes = spec.resources.distribution.nodes
    if limits.max_nodes is not None and nodes > limits.max_nodes:
        found.append(f"spec.resources.distribution.nodes: {nodes} is more than limits.maxNodes "
                     f"{limits.max_nodes} of {where}")
    if limits.allowed_quantizations is not None and spec.quantization not in limits.allowed_quantizations:
        found.append(f"spec.quantization: {spec.quantization} is not in limits.allowedQuantizations of {where} "
                     f"({_listed(list(limits.allowed_quantizations))})")
    steps = spec.training.max_steps
    if limits.max_steps is not None and steps is not None and steps > limits.max_steps:
        found.append(f"spec.training.maxSteps: {steps} is more than limits.maxSteps {limits.max_steps} of {where}")
    if limits.max_steps is not None and steps is None:
        found.append(f"spec.training.maxSteps: required by limits.maxSteps {limits.max_steps} of {where} "
                     "(a job that trains by epochs has no bound on its steps)")
    epochs = spec.training.epochs
    if limits.max_epochs is not None and epochs is not None and epochs > limits.max_epochs:
        found.append(f"spec.training.epochs: {epochs:g} is more than limits.maxEpochs {limits.max_epochs:g} "
                     f"of {where}")
    queue = spec.scheduling.queue_name
    if limits.allowed_queues is not None and queue not in limits.allowed_queues:
        found.append(f"spec.scheduling.queueName: {queue or '(none)'} is not in limits.allowedQueues of {where} "
                     f"({_listed(limits.allowed_queues)})")
    found += _choice_violations(job, limits, where, defaults)
    if limits.allow_trust_remote_code is False and spec.model.trust_remote_code:
        found.append(f"spec.model.trustRemoteCode: {where} allows no remote code (limits.allowTrustRemoteCode false)")
    return found


def _choice_violations(job: Json, limits: PresetLimits, where: str, defaults: Json) -> list[str]:
    """Limits on what the job's own spec chooses (the preset's defaults are the platform's choice)."""
    found: list[str] = []
    endpoint = (job.get("storage") or {}).get("endpoint")
    default_endpoint = (defaults.get("storage") or {}).get("endpoint")
    if endpoint is not None and limits.allowed_storage_endpoints is not None:
        if endpoint not in limits.allowed_storage_endpoints:
            found.append(f"spec.storage.endpoint: {endpoint} is not in limits.allowedStorageEndpoints of {where} "
                         f"({_listed(limits.allowed_storage_endpoints)})")
    elif endpoint is not None and endpoint != default_endpoint and (limits.allowed_model_prefixes is not None
                                                        or limits.allowed_output_prefixes is not None):
        found.append(f"spec.storage.endpoint: {where} limits model or output prefixes, so a job may not choose "
                     "its own store (limits.allowedStorageEndpoints is unset)")
    scheduling = job.get("scheduling") or {}
    for field, allowed, limit in (
            ("priorityClassName", limits.allowed_priority_classes, "allowedPriorityClasses"),
            ("workloadPriorityClassName", limits.allowed_workload_priority_classes, "allowedWorkloadPriorityClasses")):
        value = scheduling.get(field)
        if value is not None and allowed is not None and value not in allowed:
            found.append(f"spec.scheduling.{field}: {value} is not in limits.{limit} of {where} ({_listed(allowed)})")
    if limits.allowed_toleration_keys is not None:
        for i, toleration in enumerate(scheduling.get("tolerations") or []):
            key = (toleration.get("key") if isinstance(toleration, dict) else None) or ""
            if key not in limits.allowed_toleration_keys:
                found.append(f"spec.scheduling.tolerations[{i}]: key {key or '(none: every taint)'} is not in "
                             f"limits.allowedTolerationKeys of {where} ({_listed(limits.allowed_toleration_keys)})")
    if limits.allowed_node_labels is not None:
        for key, value in (scheduling.get("nodeSelector") or {}).items():
            if key not in limits.allowed_node_labels and f"{key}={value}" not in limits.allowed_node_labels:
                found.append(f"spec.scheduling.nodeSelector: {key}={value} is not in limits.allowedNodeLabels of "
                             f"{where} ({_listed(limits.allowed_node_labels)})")
        if scheduling.get("affinity") is not None:
            found.append(f"spec.scheduling.affinity: {where} limits node labels (limits.allowedNodeLabels), so a job "
                         "may not set its own affinity")
    if limits.allowed_env is not None:
        for var in job.get("env") or []:
            name = str(var.get("name"))
            if not any(name == a or (a.endswith("*") and name.startswith(a[:-1])) for a in limits.allowed_env):
                found.append(f"spec.env: {name} is not in limits.allowedEnv of {where} ({_listed(limits.allowed_env)})")
    if limits.allowed_secrets is not None:
        for field, secret in secret_references(job):
            if secret not in limits.allowed_secrets:
                found.append(f"spec.{field}: Secret {secret} is not in limits.allowedSecrets of {where} "
                             f"({_listed(limits.allowed_secrets)})")
    return found


def secret_references(job: Json) -> list[tuple[str, str]]:
    """(field, Secret name) of every Secret a FineTuneJob's own spec refers to."""
    found = [(f"env[{var.get('name')}].valueFrom.secretKeyRef", str(ref["name"]))
             for var in job.get("env") or []
             if isinstance(ref := ((var.get("valueFrom") or {}).get("secretKeyRef")), dict) and ref.get("name")]
    storage_secret = ((job.get("storage") or {}).get("secretRef") or {}).get("name")
    if storage_secret:
        found.append(("storage.secretRef", str(storage_secret)))
    judge_secret = ((((job.get("evaluation") or {}).get("judge") or {}).get("secretRef")) or {}).get("name")
    if judge_secret:
        found.append(("evaluation.judge.secretRef", str(judge_secret)))
    registry_secret = ((((job.get("output") or {}).get("oci") or {}).get("secretRef")) or {}).get("name")
    if registry_secret:
        found.append(("output.oci.secretRef", str(registry_secret)))
    found += [("imagePullSecrets", str(ref["name"])) for ref in job.get("imagePullSecrets") or [] if ref.get("name")]
    return found


def selects(preset: Json, namespace: Json | None) -> bool:
    """Whether a ClusterFineTunePreset's spec.namespaceSelector admits a namespace."""
    spec = FineTunePresetSpec.model_validate(preset.get("spec") or {})
    if preset.get("kind") != CLUSTER_KIND or spec.namespace_selector is None:
        return True
    labels = (((namespace or {}).get("metadata") or {}).get("labels") or {})
    return spec.namespace_selector.matches(labels)


def preset_required(namespace: Json | None) -> bool:
    """The namespace's kubetune.io/preset-required label is "true"."""
    return ((((namespace or {}).get("metadata") or {}).get("labels") or {}).get(PRESET_REQUIRED_LABEL) == "true")



