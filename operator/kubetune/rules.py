"""The FineTuneJob's rules, each declared once (see kubetune_contract/rules.py for the form).

The run's own rules come from kubetune_contract.rules; this module adds the rules of a FineTuneJob
(resources, env, sources, output, name) and ``ALL`` lists both, in the order the CRD holds them.
crd.py generates the CRD's x-kubernetes-validations from ``ALL``; api.py raises the same messages;
tests/unit/test_rules.py evaluates every case in the API server's CEL environment and with the
pydantic models. A new rule goes here (or in kubetune_contract.rules if the trainer checks it too), with
its cases.
"""

from __future__ import annotations

import json

from kubetune_contract.rules import RUN_RULES, Case, Rule, strategy

# Pod hostnames of a run over several nodes are <name>-trainer-<index> (at most 63 characters).
MAX_MULTI_NODE_NAME = 52

# Environment variables the operator sets in the training pod. A FineTuneJob cannot set them:
# overriding KUBETUNE_REPORT_URL/TOKEN or AWS_* would send the job's credentials elsewhere.
RESERVED_ENV_PREFIXES: tuple[str, ...] = ("KUBETUNE_", "AWS_")
RESERVED_ENV_NAMES: tuple[str, ...] = ("HF_HOME", "HOME", "TMPDIR", "PYTHONUNBUFFERED")

# Variables no FineTuneJob may set, even where a preset's limits.allowedEnv lists them (a preset's
# own defaults may: the platform team chooses those). Each would step around a guarantee:
DENIED_ENV_NAMES: tuple[str, ...] = (
    # devices: the pod would see GPUs outside its limit, Kueue's quota and other tenants' allocations
    "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    # the dynamic loader, shells and native plugins: code of the job's choice in the trainer image
    "PATH", "BASH_ENV", "ENV", "GCONV_PATH", "GLIBC_TUNABLES", "BNB_CUDA_VERSION",
    "NCCL_NET_PLUGIN", "NCCL_TUNER_PLUGIN", "NCCL_PROFILER_PLUGIN",
    # endpoints, proxies and certificates: downloads from elsewhere than the preset allows, a
    # poisoned shared cache
    "HF_ENDPOINT", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
    "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "S3_ENDPOINT",
    "LOCALDOMAIN", "RES_OPTIONS", "HOSTALIASES",
    # the launcher's rendezvous: the processes of the job would join another group
    "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    "NODE_RANK",
)
DENIED_ENV_PREFIXES: tuple[str, ...] = ("LD_", "PYTHON", "NVIDIA_", "TORCHELASTIC_", "PET_")

SOURCE_SCHEMES = ("s3://", "hf://", "pvc://")


def reserved_env_name(name: str) -> bool:
    """Whether the operator owns this environment variable of the training pod."""
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)


def reserved_env_message(name: str) -> str:
    return (f"{name} is reserved: the operator sets {', '.join(RESERVED_ENV_NAMES)} and every "
            f"{'*, '.join(RESERVED_ENV_PREFIXES)}* variable of the training pod")


def denied_env_name(name: str) -> bool:
    """Whether a FineTuneJob may not set this variable (device, loader, interpreter, endpoint)."""
    return name in DENIED_ENV_NAMES or name.startswith(DENIED_ENV_PREFIXES)


def denied_env_message(name: str) -> str:
    return (f"{name} cannot be set by a FineTuneJob: device, loader, interpreter, endpoint and launcher "
            f"variables ({'*, '.join(DENIED_ENV_PREFIXES)}*, CUDA_VISIBLE_DEVICES, HF_ENDPOINT, proxies...) "
            "would step around the pod's GPU limit, the image or the preset's limits; see docs/operations.md")


def source_problem(source: str) -> str | None:
    """Why a FineTuneJob may not read `source`, or None. In a pod, file:// and plain paths would name
    the pod's own files (/proc/self/environ holds its Secrets), and '..' would leave a claim."""
    if not source.startswith(SOURCE_SCHEMES):
        return f"{source}: {SOURCE.message}"
    if source.startswith("pvc://") and ".." in source.split("://", 1)[1].split("/"):
        return f"{source}: {SOURCE.message}"
    return None


def _env_names_cel(prefixes: tuple[str, ...], names: tuple[str, ...]) -> str:
    starts = " || ".join(f"self.name.startsWith('{p}')" for p in prefixes)
    listed = ", ".join(f"'{n}'" for n in names)
    return f"!({starts} || self.name in [{listed}])"


def env(name: str, **value: object) -> dict[str, object]:
    return {"env": [{"name": name, **(value or {"value": "x"})}]}


PROCESSES_PER_NODE_ON_CPUS = Rule(
    name="processes-per-node-on-cpus",
    at=("spec",),
    # resources has no API-server defaults (a preset may fill it): an unset field passes here and
    # the operator checks the effective spec.
    cel="self.?resources.?gpus.orValue(0) == 0 || self.?resources.?distribution.?processesPerNode.orValue(1) == 1",
    message="resources.distribution.processesPerNode is for CPU-only jobs (resources.gpus: 0); with GPUs the "
            "trainer runs one process per GPU",
    field=".resources.distribution.processesPerNode",
    cases=(
        Case({"resources": {"gpus": 1, "distribution": {"processesPerNode": 2}}}, ok=False),
        Case({"resources": {"gpus": 0, "distribution": {"processesPerNode": 2}}}, ok=True),
        Case({"resources": {"distribution": {"processesPerNode": 2}}}, ok=True, operator=False,
             why="gpus is unset: a preset may make it 0 (the default is 1)"),
    ),
)
FSDP_NEEDS_PROCESSES = Rule(
    name="fsdp-needs-two-processes",
    at=("spec",),
    # One process in all: gpus 1, or gpus 0 with processesPerNode 1, on one node. Only values the
    # job sets count; the operator checks the effective spec (a preset may add GPUs).
    cel="!(self.?resources.?distribution.?strategy.orValue('ddp') == 'fsdp' && "
        "self.?resources.?distribution.?nodes.orValue(1) == 1 && "
        "(self.?resources.?gpus.orValue(-1) == 1 || (self.?resources.?gpus.orValue(-1) == 0 && "
        "self.?resources.?distribution.?processesPerNode.orValue(0) == 1)))",
    message="resources.distribution.strategy fsdp needs more than one training process (resources.gpus 2 or "
            "more, processesPerNode 2 or more on CPUs, or nodes 2 or more): it shards the model across them; "
            "or use strategy ddp",
    field=".resources.distribution.strategy",
    cases=(
        Case({"resources": {"gpus": 1, "distribution": {"strategy": "fsdp"}}}, ok=False),
        Case({"resources": {"gpus": 0, "distribution": {"strategy": "fsdp", "processesPerNode": 1}}}, ok=False),
        Case({"resources": {"gpus": 1, "distribution": {"strategy": "fsdp", "nodes": 2}}}, ok=True),
        Case({"resources": {"gpus": 0, "distribution": {"strategy": "fsdp", "processesPerNode": 2}}}, ok=True),
        Case(strategy("fsdp"), ok=True),
        Case({"resources": {"distribution": {"strategy": "fsdp"}}}, ok=True, operator=False,
             why="gpus is unset: a preset may give the job several (the default is 1)"),
    ),
)
OUTPUT_IN_S3 = Rule(
    name="output-in-s3",
    at=("spec",),
    cel="self.output.location.startsWith('s3://')",
    message="output.location must be s3://bucket/prefix for a FineTuneJob (a local directory only works for "
            "standalone trainer runs)",
    field=".output.location",
    cases=(
        Case({"output": {"location": "/tmp/out"}}, ok=False),
        Case({"output": {"location": "file:///tmp/out"}}, ok=False),
        Case({"output": {"location": "s3:/runs"}}, ok=False),
        Case({"output": {"location": "s3://runs/team"}}, ok=True),
    ),
)
SOURCE = Rule(
    name="sources-in-the-cluster",
    at=("spec.model.source", "spec.model.tokenizer", "spec.dataset.train", "spec.dataset.validation"),
    cel=r"self.matches('^(s3|hf)://') || (self.matches('^pvc://') && !self.matches('(^|/)[.][.](/|$)'))",
    message="a FineTuneJob reads s3://, hf:// or pvc://claim/path sources (no '..'); file:// and local paths "
            "are for standalone trainer runs",
    cases=(
        Case({"dataset": {"train": "file:///proc/self/environ"}}, ok=False),
        Case({"dataset": {"train": "/data/train.jsonl"}}, ok=False),
        Case({"model": {"source": "pvc://models/../secrets/x"}}, ok=False),
        Case({"model": {"tokenizer": "pvc://../x"}}, ok=False),
        Case({"dataset": {"validation": "pvc://data/a/.."}}, ok=False),
        Case({"model": {"source": "pvc://models/qwen..v2"}}, ok=True),
        Case({"model": {"source": "hf://Qwen/Qwen2.5-0.5B"}, "dataset": {"train": "pvc://data/train.jsonl"}}, ok=True),
    ),
)
MULTI_NODE_NAME = Rule(
    name="multi-node-name",
    at=("",),
    cel=f"self.spec.?resources.?distribution.?nodes.orValue(1) <= 1 || "
        f"size(self.metadata.name) <= {MAX_MULTI_NODE_NAME}",
    message=f"metadata.name: a job over several nodes (resources.distribution.nodes > 1) may have at most "
            f"{MAX_MULTI_NODE_NAME} characters, as its pods' hostnames are <name>-trainer-<index> (at most 63)",
    cases=(
        Case({"resources": {"gpus": 1, "distribution": {"nodes": 2}}}, ok=False, name="n" * 53),
        Case({"resources": {"gpus": 1, "distribution": {"nodes": 64}}}, ok=True, name="n" * 52),
        Case({"resources": {"gpus": 1}}, ok=True, name="n" * 63),
    ),
)
RESERVED_ENV = Rule(
    name="reserved-env",
    at=("spec.env[]",),
    cel=_env_names_cel(RESERVED_ENV_PREFIXES, RESERVED_ENV_NAMES),
    message="reserved: the operator sets this variable of the training pod",
    message_expression=f"self.name + {json.dumps(reserved_env_message(''))}",
    field=".name",
    reason="FieldValueForbidden",
    cases=(
        *(Case(env(n), ok=False) for n in ("KUBETUNE_REPORT_URL", "AWS_SECRET_ACCESS_KEY", "HOME", "TMPDIR")),
        Case(env("HF_TOKEN"), ok=True),
        Case(env("MY_HOME"), ok=True),
    ),
)
DENIED_ENV = Rule(
    name="denied-env",
    at=("spec.env[]",),
    cel=_env_names_cel(DENIED_ENV_PREFIXES, DENIED_ENV_NAMES),
    message="cannot be set by a FineTuneJob",
    message_expression=f"self.name + {json.dumps(denied_env_message(''))}",
    field=".name",
    reason="FieldValueForbidden",
    cases=(
        *(Case(env(n), ok=False) for n in ("LD_PRELOAD", "PYTHONPATH", "NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES",
                                           "HTTPS_PROXY", "https_proxy", "MASTER_ADDR", "PET_RDZV_ENDPOINT")),
        Case(env("WANDB_PROJECT"), ok=True),
        Case(env("MY_PYTHONPATH"), ok=True),
    ),
)
ONE_ENV_SOURCE = Rule(
    name="one-env-source",
    at=("spec.env[]",),
    cel="!has(self.valueFrom) || has(self.valueFrom.secretKeyRef) != has(self.valueFrom.configMapKeyRef)",
    message="valueFrom: set exactly one of secretKeyRef and configMapKeyRef",
    field=".valueFrom",
    reason=None,
    cases=(
        Case(env("TOKEN", valueFrom={}), ok=False),
        Case(env("TOKEN", valueFrom={"secretKeyRef": {"name": "s", "key": "k"},
                                     "configMapKeyRef": {"name": "c", "key": "k"}}), ok=False),
        Case(env("TOKEN", valueFrom={"secretKeyRef": {"name": "s", "key": "k"}}), ok=True),
        Case(env("TOKEN", valueFrom={"configMapKeyRef": {"name": "c", "key": "k"}}), ok=True),
    ),
)

JOB_RULES: tuple[Rule, ...] = (
    PROCESSES_PER_NODE_ON_CPUS, FSDP_NEEDS_PROCESSES, OUTPUT_IN_S3, SOURCE, MULTI_NODE_NAME,
    RESERVED_ENV, DENIED_ENV, ONE_ENV_SOURCE,
)
ALL: tuple[Rule, ...] = (*RUN_RULES, *JOB_RULES)
"""Every rule the CRD of a FineTuneJob holds (besides the schema's own bounds and immutability)."""

PRESET_RULES: dict[str, tuple[Rule, ...]] = {
    # A preset's defaults are checked as a job's sections are; its env may set denied variables
    # (the platform team chooses them), not the operator's own.
    "spec.defaults.training": tuple(r for r in RUN_RULES if r.at == ("spec.training",)),
    "spec.defaults.env[]": (RESERVED_ENV, ONE_ENV_SOURCE),
}
"""The rules a preset's CRD holds, by place."""
