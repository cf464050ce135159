"""Pure functions: (FineTuneJob, settings) → the trainer config and the child objects.

Nothing here talks to the API server; handlers create what these functions return.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import yaml

from kubetune import api, kueue, rules
from kubetune.settings import Settings
from kubetune_contract.config import (
    EXIT_INVALID_INPUT,
    EXIT_OUT_OF_MEMORY,
    EXIT_REGISTRY_UNAVAILABLE,
    EXIT_STORE_UNAVAILABLE,
    JUDGE_API_KEY_ENV,
    PVC_MOUNT_ROOT,
    REGISTRY_AUTH_ENV,
    DistributionSpec,
    EvaluationSpec,
    OutputSpec,
    StorageSpec,
    TrainerConfig,
)

Json = dict[str, Any]

CONTAINER = "trainer"
CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "config.yaml"
CACHE_DIR = "/var/cache/kubetune"
SCRATCH_DIR = "/var/tmp/kubetune"
TERMINATION_LOG = "/dev/termination-log"
JOB_LABEL = "kubetune.io/job"
CONFIG_HASH_ANNOTATION = "kubetune.io/config-hash"
SPEC_HASH_ANNOTATION = "kubetune.io/spec-hash"  # the spec the Job was made from (see spec_hash)
GENERATION_ANNOTATION = "kubetune.io/generation"
# The preset applied at creation ({kind, name, generation}) and its defaults, as JSON: the job's
# effective spec is frozen with the Job, so later edits of the preset never change it.
PRESET_ANNOTATION = "kubetune.io/preset"
PRESET_DEFAULTS_ANNOTATION = "kubetune.io/preset-defaults"
# Spec fields the operator applies to a Job that exists; an edit of any other field is not applied.
LIVE_FIELDS = ("suspend", "ttlSecondsAfterFinished")
OWNER_ANNOTATION = "kubetune.io/finetunejob"  # full FineTuneJob name (labels cap at 63 characters)
MANAGED_BY = "kubetune-operator"
MAX_NAME = 63  # Job names become pod label values: at most 63 characters.
RENDEZVOUS_PORT = 29400  # torchrun's rendezvous store, on pod 0 of a run over several nodes


def child_name(name: str, suffix: str) -> str:
    """Deterministic child name `<name>-<suffix>`, shortened with a hash when too long."""
    full = f"{name}-{suffix}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - len(suffix) - 10].rstrip('-.')}-{digest}-{suffix}"


def label_value(name: str) -> str:
    """A label value for a FineTuneJob name (names may be longer than 63 characters)."""
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:50].rstrip('-.')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def job_name(name: str) -> str:
    return child_name(name, "trainer")


def config_map_name(name: str) -> str:
    return child_name(name, "config")


def report_secret_name(name: str, uid: str) -> str:
    """The report Secret's name carries the UID: a Secret of that name can only be this job's
    (the operator may create Secrets but never read them, so it could not check an owner)."""
    return child_name(name, f"report-{uid[:8]}")


REPORT_TOKEN_KEY = "token"


def report_token(key: bytes, uid: str) -> str:
    """A FineTuneJob's report token: HMAC-SHA256 of its UID under the operator's report key.

    The operator can check a token without reading any Secret, and a job re-created under the
    same name (a new UID) gets a different one."""
    digest = hmac.new(key, f"kubetune.io/report/{uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def render_report_secret(owner: Json, token: str) -> Json:
    """The per-job Secret with the token the trainer presents to the report endpoint (the pod
    reads it through a secretKeyRef; the operator only creates it)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": child_metadata(owner, report_secret_name(owner["metadata"]["name"], owner["metadata"]["uid"])),
        "stringData": {REPORT_TOKEN_KEY: token},
    }


def labels(name: str) -> dict[str, str]:
    """Labels of every child; kubetune.io/job finds them again."""
    return {
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/instance": label_value(name),
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        JOB_LABEL: label_value(name),
    }


def owner_reference(owner: Json) -> Json:
    """The controller owner reference to a FineTuneJob (GC deletes children with it)."""
    meta = owner["metadata"]
    return {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(owner: Json, name: str) -> Json:
    meta = owner["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"]),
        "ownerReferences": [owner_reference(owner)],
    }


def storage_secret(spec: api.FineTuneJobSpec, settings: Settings) -> api.SecretRef | None:
    """The Secret with S3 credentials: the job's own, else the operator's default."""
    if spec.storage.secret_ref is not None:
        return spec.storage.secret_ref
    return api.SecretRef(name=settings.s3_secret) if settings.s3_secret else None


def run_name(owner: Json) -> str:
    """<namespace>/<name>/<first 8 of the UID>: retries of a job share it (and resume from its
    checkpoints); a new FineTuneJob of the same name gets a fresh one and never overwrites it."""
    meta = owner["metadata"]
    return f"{meta['namespace']}/{meta['name']}/{meta['uid'][:8]}"


def trainer_config(owner: Json, spec: api.FineTuneJobSpec, settings: Settings) -> TrainerConfig:
    """The trainer's config for this job: the spec's sections, storage defaults, the run name and
    the distribution strategy."""
    return TrainerConfig(
        run_name=run_name(owner),
        model=spec.model,
        dataset=spec.dataset,
        training=spec.training,
        lora=spec.lora,
        quantization=spec.quantization,
        # The registry's credentials reach the trainer as an environment variable; the tag defaults
        # to the job's name.
        output=OutputSpec.model_validate(output_for_trainer(owner, spec)),
        storage=effective_storage(spec, settings),
        distribution=DistributionSpec(strategy=spec.resources.distribution.strategy),
        # The judge's API key reaches the trainer as an environment variable, never in its config.
        evaluation=EvaluationSpec.model_validate(
            spec.evaluation.model_dump(exclude={"judge": {"secret_ref"}}, exclude_none=True)),
        preference=spec.preference,
    )


def output_for_trainer(owner: Json, spec: api.FineTuneJobSpec) -> Json:
    """spec.output without the registry's Secret, with output.oci.tag defaulted to the job's name."""
    output = spec.output.model_dump(exclude={"oci": {"secret_ref"}}, exclude_none=True)
    if spec.output.oci is not None and spec.output.oci.tag is None:
        output["oci"]["tag"] = owner["metadata"]["name"]
    return output


def effective_storage(spec: api.FineTuneJobSpec, settings: Settings) -> StorageSpec:
    """The job's storage section with the operator's defaults filled in (no credentials)."""
    storage = spec.storage
    return StorageSpec(
        endpoint=storage.endpoint or settings.s3_endpoint,
        region=storage.region or settings.s3_region,
        insecure=storage.insecure or (storage.endpoint is None and settings.s3_insecure),
    )


def render_config_map(owner: Json, spec: api.FineTuneJobSpec, settings: Settings) -> Json:
    """ConfigMap with the trainer config. It holds no secrets: credentials travel as env refs."""
    config = trainer_config(owner, spec, settings).model_dump(mode="json", by_alias=True, exclude_none=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(owner, config_map_name(owner["metadata"]["name"])),
        "data": {CONFIG_FILE: yaml.safe_dump(config, sort_keys=False)},
    }


def spec_hash(owner: Json) -> str:
    """Hash of the FineTuneJob's spec without the fields applied to a running Job (LIVE_FIELDS)."""
    fixed = {k: v for k, v in (owner.get("spec") or {}).items() if k not in LIVE_FIELDS}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config_map: Json) -> str:
    return hashlib.sha256(json.dumps(config_map["data"], sort_keys=True).encode()).hexdigest()[:16]


def pvc_claims(spec: api.FineTuneJobSpec) -> list[str]:
    """Claims named by pvc:// sources, in a stable order."""
    sources = [spec.model.source, spec.model.tokenizer, spec.dataset.train, spec.dataset.validation]
    claims = {s.split("://", 1)[1].split("/", 1)[0] for s in sources if s and s.startswith("pvc://")}
    return sorted(claims)


def required_claims(spec: api.FineTuneJobSpec) -> list[str]:
    """PVCs the pod mounts: the cache volume and pvc:// sources."""
    claims = set(pvc_claims(spec))
    if spec.cache_volume:
        claims.add(spec.cache_volume.claim_name)
    return sorted(claims)


def _env(owner: Json, spec: api.FineTuneJobSpec, settings: Settings) -> list[Json]:
    """The job's own variables first, then the operator's: for a repeated name the last entry wins,
    so even a job that slipped past validation cannot redirect reports or credentials."""
    meta = owner["metadata"]
    env: list[Json] = [extra.model_dump(mode="json", by_alias=True, exclude_none=True)
                       for extra in spec.env or [] if not rules.reserved_env_name(extra.name)]
    env += [
        {"name": "KUBETUNE_JOB_NAMESPACE", "value": meta["namespace"]},
        {"name": "KUBETUNE_JOB_NAME", "value": meta["name"]},
        {"name": "KUBETUNE_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "KUBETUNE_CACHE_DIR", "value": CACHE_DIR},
        {"name": "KUBETUNE_IMAGE", "value": spec.image or settings.trainer_image},  # the run's lineage
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.resources.gpus == 0:
        # With the NVIDIA container runtime, a pod without GPU limits would otherwise see every GPU
        # of the node when its image sets NVIDIA_VISIBLE_DEVICES=all (CUDA base images do).
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"})
    secret = storage_secret(spec, settings)
    if secret:
        for var, key in (("AWS_ACCESS_KEY_ID", secret.access_key_key),
                         ("AWS_SECRET_ACCESS_KEY", secret.secret_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
    judge = spec.evaluation.judge
    if judge is not None and judge.secret_ref is not None:
        env.append({"name": JUDGE_API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": judge.secret_ref.name, "key": judge.secret_ref.key}}})
    oci = spec.output.oci
    if oci is not None and oci.secret_ref is not None:
        env.append({"name": REGISTRY_AUTH_ENV, "valueFrom": {"secretKeyRef": {
            "name": oci.secret_ref.name, "key": ".dockerconfigjson"}}})
    if settings.report_url:
        env.append({"name": "KUBETUNE_REPORT_URL",
                    "value": f"{settings.report_url}/v1/reports/{meta['namespace']}/{meta['name']}"})
        env.append({"name": "KUBETUNE_REPORT_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": report_secret_name(meta["name"], meta["uid"]), "key": REPORT_TOKEN_KEY}}})
    return env


def _resources(spec: api.FineTuneJobSpec, settings: Settings) -> Json:
    res = spec.resources
    limits: Json = {}
    requests: Json = {}
    if res.gpus:
        limits[res.gpu_resource_name or settings.gpu_resource_name] = str(res.gpus)
    if res.cpu:
        limits["cpu"] = requests["cpu"] = res.cpu
    if res.memory:
        limits["memory"] = requests["memory"] = res.memory
    out: Json = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def _volumes(owner: Json, spec: api.FineTuneJobSpec) -> tuple[list[Json], list[Json]]:
    """(volumes, volumeMounts) of the training pod."""
    volumes: list[Json] = [
        {"name": "config", "configMap": {"name": config_map_name(owner["metadata"]["name"])}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
        {"name": "scratch", "emptyDir": {}},
    ]
    # The root filesystem is read-only: the trainer writes to these volumes only (TMPDIR and HOME
    # point at the scratch volume).
    mounts: list[Json] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    if spec.cache_volume:
        volumes.append({"name": "cache", "persistentVolumeClaim": {"claimName": spec.cache_volume.claim_name}})
        mounts.append({"name": "cache", "mountPath": CACHE_DIR})
    else:
        volumes.append({"name": "cache", "emptyDir": {}})
        mounts.append({"name": "cache", "mountPath": CACHE_DIR})
    for index, claim in enumerate(pvc_claims(spec)):
        volumes.append({"name": f"source-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"source-{index}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
    return volumes, mounts


def processes_per_pod(spec: api.FineTuneJobSpec) -> int:
    """One training process per GPU; processesPerNode for CPU-only jobs."""
    return spec.resources.gpus or spec.resources.distribution.processes_per_node


def rendezvous_host(name: str) -> str:
    """Where the pods of a run over several nodes meet: pod index 0, by its name in the headless
    Service (an Indexed Job's pod i has hostname <job>-i, and the Service is its subdomain)."""
    job = job_name(name)
    return f"{job}-0.{job}"


def trainer_command(owner: Json, spec: api.FineTuneJobSpec, settings: Settings) -> list[str]:
    """The trainer itself for one process; the launcher (torchrun) for several.

    Over several pods, torchrun's static rendezvous: pod i is node rank i (its completion index)
    and pod 0 hosts the store, so rank 0 lives in pod 0 and the ranks of every pod are fixed.
    --max-restarts 0 hands every failure to the Job, which restarts the whole group.
    """
    processes, nodes = processes_per_pod(spec), spec.resources.distribution.nodes
    if processes == 1 and nodes == 1:
        return list(settings.trainer_command)
    if nodes == 1:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(nodes), "--node-rank", "$(JOB_COMPLETION_INDEX)",
                 "--master-addr", rendezvous_host(owner["metadata"]["name"]),
                 "--master-port", str(RENDEZVOUS_PORT), "--max-restarts", "0"]
    return [*settings.launcher_command, *where, "--nproc-per-node", str(processes), "-m", "kubetune_trainer"]


def render_pod_spec(owner: Json, spec: api.FineTuneJobSpec, settings: Settings) -> Json:
    """The training pod: restricted security, GPU limits, config and shared memory mounts."""
    volumes, mounts = _volumes(owner, spec)
    container: Json = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": trainer_command(owner, spec, settings),
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": _env(owner, spec, settings),
        "resources": _resources(spec, settings),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    sched = spec.scheduling
    pod: Json = {
        "restartPolicy": "Never",
        # On SIGTERM the trainer finishes its step and uploads a checkpoint before it exits: the
        # grace must cover one step and one checkpoint upload (KUBETUNE_TERMINATION_GRACE_SECONDS).
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,  # the trainer image's user
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        # The trainer never talks to the Kubernetes API: no token unless the job names an account.
        "automountServiceAccountToken": spec.service_account_name is not None,
    }
    node_selector = {**settings.default_node_selector, **(sched.node_selector or {})}
    optional = {
        "nodeSelector": node_selector or None,
        "tolerations": sched.tolerations,
        "affinity": sched.affinity,
        "priorityClassName": sched.priority_class_name,
        "schedulerName": sched.scheduler_name,
        "serviceAccountName": spec.service_account_name,
        "imagePullSecrets": [{"name": s.name} for s in spec.image_pull_secrets or []] or None,
    }
    pod.update({k: v for k, v in optional.items() if v is not None})
    if spec.resources.distribution.nodes > 1:
        pod["subdomain"] = job_name(owner["metadata"]["name"])  # the headless Service: <job>-<i>.<job>
    return pod


def render_service(owner: Json) -> Json:
    """The headless Service of a run over several nodes: DNS names for its pods (<job>-<i>.<job>),
    published before they are ready, since the rendezvous is what they are waiting for."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, job_name(name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: label_value(name)},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def render_network_policy(owner: Json) -> Json:
    """Training pods accept traffic only from pods of the same job (the rendezvous of a run over
    several pods); they serve nothing else. Egress stays open (object store, model hubs)."""
    name = owner["metadata"]["name"]
    same_job = {"matchLabels": {JOB_LABEL: label_value(name)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(owner, job_name(name)),
        "spec": {"podSelector": same_job, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": same_job}]}]},
    }


def scanner_notes(spec: api.FineTuneJobSpec) -> dict[str, str]:
    """Annotations that explain, to Kubernetes manifest scanners (checkov ids), what is deliberate."""
    notes = {
        "CKV_K8S_43": "the image is spec.image or the operator's trainer image: pin a digest there",
        "CKV_K8S_15": "versioned trainer images are immutable: the default pull policy applies",
        "CKV_K8S_35": "S3 credentials and the report token reach the trainer only as secretKeyRef variables",
    }
    if not spec.resources.cpu:
        notes["CKV_K8S_11"] = "no CPU limit unless resources.cpu is set: a limit throttles data loading"
    if not spec.resources.memory:
        notes["CKV_K8S_13"] = "no memory limit unless resources.memory is set: the backbone decides the size"
    return {f"checkov.io/skip{i}": f"{check}={why}" for i, (check, why) in enumerate(sorted(notes.items()), 1)}


def preset_annotations(applied: Json | None, defaults: Json) -> dict[str, str]:
    """The Job annotations that freeze the preset a job was made with (none without a preset)."""
    if applied is None:
        return {}
    return {PRESET_ANNOTATION: json.dumps(applied, sort_keys=True),
            PRESET_DEFAULTS_ANNOTATION: json.dumps(defaults, sort_keys=True)}


def frozen_preset(job: Json) -> tuple[Json | None, Json]:
    """The preset ({kind, name, generation}) and defaults a Job was made with; (None, {}) without one."""
    annotations = job["metadata"].get("annotations") or {}
    if PRESET_ANNOTATION not in annotations:
        return None, {}
    applied: Json = json.loads(annotations[PRESET_ANNOTATION])
    defaults: Json = json.loads(annotations.get(PRESET_DEFAULTS_ANNOTATION) or "{}")
    return applied, defaults


def render_job(owner: Json, spec: api.FineTuneJobSpec, settings: Settings, config_map: Json,
               preset: dict[str, str] | None = None) -> Json:
    """The batch/v1 Job that runs the trainer.

    Invalid input (trainer exit code 3) and out-of-memory (6) fail the Job at once; disruptions
    (preemption, node drain) and an object store that went away mid-run (5) do not count against
    backoffLimit; a Kueue queue creates it suspended for Kueue to admit (and un-suspend: see
    kubetune.kueue).
    """
    meta = child_metadata(owner, job_name(owner["metadata"]["name"]))
    queue = spec.scheduling.queue_name
    if queue:
        meta["labels"][kueue.QUEUE_LABEL] = queue
    if spec.scheduling.workload_priority_class_name:
        meta["labels"][kueue.PRIORITY_CLASS_LABEL] = spec.scheduling.workload_priority_class_name
    annotations = {CONFIG_HASH_ANNOTATION: config_hash(config_map), OWNER_ANNOTATION: owner["metadata"]["name"]}
    meta["annotations"] = {**annotations, SPEC_HASH_ANNOTATION: spec_hash(owner),
                           GENERATION_ANNOTATION: str(owner["metadata"].get("generation") or 1), **scanner_notes(spec),
                           **(preset or {})}
    nodes = spec.resources.distribution.nodes
    job_spec: Json = {
        "suspend": bool(spec.suspend or queue),
        # Over several nodes, one failure ends every pod of the group (their collectives fail) and
        # the Job replaces them all: backoffLimit counts group restarts.
        "backoffLimit": spec.backoff_limit * nodes,
        # One writer per run directory: a replacement pod starts only once the previous one has
        # fully terminated (it may still be uploading a checkpoint during its grace period).
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                    "values": [EXIT_INVALID_INPUT, EXIT_OUT_OF_MEMORY]},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                # The store (or output.oci's registry) went away mid-run: the next pod resumes from
                # its checkpoint, and the outage does not use up backoffLimit. The trainer exits so
                # only after the store or registry had answered, so a wrong endpoint still fails the job.
                {
                    "action": "Ignore",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                    "values": [EXIT_STORE_UNAVAILABLE, EXIT_REGISTRY_UNAVAILABLE]},
                },
            ]
        },
        "template": {
            "metadata": {"labels": dict(meta["labels"]), "annotations": annotations},
            "spec": render_pod_spec(owner, spec, settings),
        },
    }
    if nodes > 1:
        # Pod i has hostname <job>-i: pod 0 hosts the rendezvous; all pods must succeed.
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
