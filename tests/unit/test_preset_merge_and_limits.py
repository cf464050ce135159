"""Presets: the effective spec (job over preset defaults) and the operator's limit checks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune import crd, presets
from kubetune.api import FineTuneJobSpec
from kubetune.presets import PresetLimits

JOB: dict[str, Any] = {
    "model": {"source": "s3://models/tiny/"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"location": "s3://runs/team-a/"},
}
PRESET: dict[str, Any] = {
    "metadata": {"name": "gpu-small", "generation": 3},
    "spec": {
        "defaults": {
            "image": "registry.example/trainer:1.2",
            "resources": {"gpus": 2, "memory": "64Gi"},
            "scheduling": {"queueName": "team-a", "tolerations": [{"key": "gpu", "operator": "Exists"}]},
            "storage": {"endpoint": "minio.storage:9000", "secretRef": {"name": "s3"}},
            "training": {"learningRate": 1e-4, "epochs": 2},
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "LOG", "value": "info"}],
        },
        "limits": {"maxGpusPerNode": 4},
    },
}


def effective(job: dict[str, Any], preset: dict[str, Any] = PRESET) -> dict[str, Any]:
    return presets.effective_spec(job, presets.preset_defaults(preset))


def test_preset_defaults_fill_what_the_job_leaves_unset() -> None:
    spec = FineTuneJobSpec.model_validate(effective(JOB))
    assert spec.image == "registry.example/trainer:1.2"
    assert spec.resources.gpus == 2 and spec.resources.memory == "64Gi"
    assert spec.resources.shared_memory == "8Gi"  # the built-in default below the preset's
    assert spec.scheduling.queue_name == "team-a"
    assert spec.storage.endpoint == "minio.storage:9000" and spec.storage.secret_ref is not None
    assert spec.training.learning_rate == 1e-4 and spec.training.epochs == 2


def test_the_job_wins_field_by_field() -> None:
    job = {**JOB, "resources": {"gpus": 1}, "training": {"learningRate": 3e-4},
           "env": [{"name": "LOG", "value": "debug"}]}
    spec = FineTuneJobSpec.model_validate(effective(job))
    assert spec.resources.gpus == 1 and spec.resources.memory == "64Gi"
    assert spec.training.learning_rate == 3e-4 and spec.training.epochs == 2
    assert [(e.name, e.value) for e in spec.env or []] == [("HF_HUB_OFFLINE", "1"), ("LOG", "debug")]


def test_a_job_that_sets_max_steps_drops_the_preset_epochs() -> None:
    spec = FineTuneJobSpec.model_validate(effective({**JOB, "training": {"maxSteps": 50}}))
    assert spec.training.max_steps == 50 and spec.training.epochs is None
    assert spec.training.learning_rate == 1e-4


def test_a_job_with_an_integer_batch_size_drops_the_preset_global_batch() -> None:
    preset = copy.deepcopy(PRESET)
    preset["spec"]["defaults"]["training"] = {"batchSize": "auto", "globalBatchSize": 64}
    spec = FineTuneJobSpec.model_validate(effective({**JOB, "training": {"batchSize": 8}}, preset))
    assert spec.training.batch_size == 8 and spec.training.global_batch_size is None
    auto = FineTuneJobSpec.model_validate(effective(JOB, preset))
    assert auto.training.batch_size == "auto" and auto.training.global_batch(4) == 64


def test_lists_other_than_env_are_replaced() -> None:
    job = {**JOB, "scheduling": {"tolerations": [{"key": "spot", "operator": "Exists"}]}}
    spec = FineTuneJobSpec.model_validate(effective(job))
    assert spec.scheduling.tolerations == [{"key": "spot", "operator": "Exists"}]
    assert spec.scheduling.queue_name == "team-a"


def test_the_merge_does_not_change_its_inputs() -> None:
    defaults = presets.preset_defaults(PRESET)
    before = repr(defaults)
    presets.effective_spec({**JOB, "resources": {"cpu": "4"}}, defaults)
    assert repr(defaults) == before


def test_preset_defaults_are_what_the_preset_says_and_nothing_more() -> None:
    assert presets.preset_defaults({"spec": {"defaults": {"resources": {"cpu": "8"}}}}) == {"resources": {"cpu": "8"}}
    assert presets.preset_defaults({"spec": {}}) == {}


def test_an_invalid_preset_default_is_refused() -> None:
    with pytest.raises(ValidationError, match="gpus"):
        presets.preset_defaults({"spec": {"defaults": {"resources": {"gpus": -1}}}})


@pytest.mark.parametrize(("spec", "ref"), [
    ({"preset": {"name": "a"}}, ("ClusterFineTunePreset", "a")),
    ({"preset": {"kind": "FineTunePreset", "name": "b"}}, ("FineTunePreset", "b")),
])
def test_preset_ref_of_the_job(spec: dict[str, Any], ref: tuple[str, str]) -> None:
    found = presets.preset_ref(spec, {"metadata": {"annotations": {presets.DEFAULT_PRESET_ANNOTATION: "other"}}})
    assert found is not None and (found.kind, found.name) == ref


@pytest.mark.parametrize(("value", "ref"), [
    ("gpu-small", ("ClusterFineTunePreset", "gpu-small")),
    ("FineTunePreset/team", ("FineTunePreset", "team")),
    ("ClusterFineTunePreset/x", ("ClusterFineTunePreset", "x")),
])
def test_namespace_default_preset(value: str, ref: tuple[str, str]) -> None:
    found = presets.preset_ref({}, {"metadata": {"annotations": {presets.DEFAULT_PRESET_ANNOTATION: value}}})
    assert found is not None and (found.kind, found.name) == ref


def test_no_preset_and_a_bad_annotation() -> None:
    assert presets.preset_ref({}, {"metadata": {}}) is None
    with pytest.raises(ValueError, match="unknown preset kind"):
        presets.preset_ref({}, {"metadata": {"annotations": {presets.DEFAULT_PRESET_ANNOTATION: "Pod/x"}}})


LIMITS = PresetLimits.model_validate({
    "allowedModelPrefixes": ["s3://models/", "hf://Qwen/"],
    "allowedOutputPrefixes": ["s3://runs/team-a/"],
    "allowedImages": ["registry.example/trainer:"],
    "allowedServiceAccounts": ["trainer"],
    "allowedPvcs": ["hf-cache"],
    "maxGpusPerNode": 2,
    "maxNodes": 1,
    "allowedQuantizations": ["int4", "int8"],
    "maxSteps": 1000,
    "maxEpochs": 3,
})
BASE = {**JOB, "quantization": "int4", "resources": {"gpus": 1}, "training": {"maxSteps": 100}}


def check(job: dict[str, Any], limits: PresetLimits | None = LIMITS, restrict: bool = True) -> list[str]:
    spec = FineTuneJobSpec.model_validate(job)
    return presets.violations(spec, job, limits, preset="ClusterFineTunePreset/gpu-small",
                              restrict_images_and_accounts=restrict)


def test_a_job_within_the_limits_passes() -> None:
    job = {**BASE, "image": "registry.example/trainer:1.3", "serviceAccountName": "trainer",
           "cacheVolume": {"claimName": "hf-cache"}, "training": {"maxSteps": 1000}}
    assert check(job) == []


@pytest.mark.parametrize(("change", "words"), [
    ({"model": {"source": "hf://meta-llama/Llama-3.1-8B"}}, ["spec.model.source", "allowedModelPrefixes",
                                                             "s3://models/, hf://Qwen/"]),
    ({"model": {"source": "s3://models/x/", "tokenizer": "hf://other/tok"}}, ["spec.model.tokenizer"]),
    ({"output": {"location": "s3://runs/team-b/"}}, ["spec.output.location", "allowedOutputPrefixes",
                                                      "s3://runs/team-a/"]),
    ({"resources": {"gpus": 4}}, ["spec.resources.gpus", "4 is more than limits.maxGpusPerNode 2"]),
    ({"image": "evil.example/trainer:1"}, ["spec.image", "allowedImages"]),
    ({"serviceAccountName": "admin"}, ["spec.serviceAccountName", "allowedServiceAccounts", "trainer"]),
    ({"cacheVolume": {"claimName": "other"}}, ["spec.cacheVolume.claimName", "PVC other", "allowedPvcs"]),
    ({"dataset": {"train": "pvc://data/train.jsonl"}}, ["spec.pvc:// source", "PVC data"]),
    ({"quantization": "none", "resources": {"gpus": 1}}, ["spec.quantization", "none is not in",
                                                           "allowedQuantizations"]),
    ({"training": {"maxSteps": 5000}}, ["spec.training.maxSteps", "5000 is more than limits.maxSteps 1000"]),
], ids=["model", "tokenizer", "output", "gpus", "image", "service-account", "pvc", "pvc-source", "quantization",
        "max-steps"])
def test_each_limit_names_the_field_and_the_limit(change: dict[str, Any], words: list[str]) -> None:
    found = check({**BASE, **change})
    assert len(found) == 1, found
    for word in words:
        assert word in found[0], found[0]
    assert "ClusterFineTunePreset/gpu-small" in found[0]


def test_max_epochs() -> None:
    found = check({**BASE, "training": {"epochs": 10}}, LIMITS.model_copy(update={"max_steps": None}))
    assert found == ["spec.training.epochs: 10 is more than limits.maxEpochs 3 of ClusterFineTunePreset/gpu-small"]


@pytest.mark.parametrize("training", [{"epochs": 1}, {}], ids=["epochs", "neither: one epoch"])
def test_a_step_limit_refuses_a_job_that_trains_by_epochs(training: dict[str, Any]) -> None:
    # An epoch of a large data set can be any number of steps: maxSteps alone would bound nothing.
    found = check({**BASE, "training": training}, LIMITS.model_copy(update={"max_epochs": None}))
    assert found == ["spec.training.maxSteps: required by limits.maxSteps 1000 of ClusterFineTunePreset/gpu-small "
                     "(a job that trains by epochs has no bound on its steps)"]


def test_a_preset_default_max_steps_bounds_a_job_that_sets_neither() -> None:
    preset = {"spec": {"defaults": {"training": {"maxSteps": 500}}, "limits": {"maxSteps": 1000}}}
    job = {**BASE, "training": {}}
    spec = FineTuneJobSpec.model_validate(presets.effective_spec(job, presets.preset_defaults(preset)))
    assert presets.violations(spec, job, PresetLimits(max_steps=1000), preset="p",
                              restrict_images_and_accounts=False) == []


def test_max_nodes() -> None:
    spec = FineTuneJobSpec.model_validate(BASE)
    limits = LIMITS.model_copy(update={"max_nodes": 1})
    assert presets.violations(spec, BASE, limits, preset=None, restrict_images_and_accounts=False) == []


def test_images_and_service_accounts_need_a_preset_that_allows_them() -> None:
    job = {**JOB, "image": "registry.example/trainer:1.2", "serviceAccountName": "trainer"}
    found = check(job, limits=None)
    assert [f.split(":")[0] for f in found] == ["spec.image", "spec.serviceAccountName"]
    assert check(job, limits=None, restrict=False) == []
    assert len(check(job, limits=PresetLimits(), restrict=True)) == 2


def test_a_preset_default_image_is_not_a_user_choice() -> None:
    job = presets.effective_spec(JOB, presets.preset_defaults(PRESET))
    spec = FineTuneJobSpec.model_validate(job)
    assert presets.violations(spec, JOB, None, preset="ClusterFineTunePreset/gpu-small",
                              restrict_images_and_accounts=True) == []


def test_preset_crds_are_generated_with_printer_columns_and_no_defaults() -> None:
    for kind in (presets.KIND, presets.CLUSTER_KIND):
        doc = crd.build_preset_crd(kind)
        assert doc["spec"]["scope"] == ("Cluster" if kind == presets.CLUSTER_KIND else "Namespaced")
        version = doc["spec"]["versions"][0]
        assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Max-GPUs", "Queue", "Age"}
        assert "default" not in keys(version["schema"])


def test_fields_a_preset_may_default_have_no_api_server_default() -> None:
    spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for name in presets.DEFAULTABLE_FIELDS:
        assert "default" not in keys(spec["properties"][name]), name


def keys(node: Any) -> set[str]:
    """Every key of every object in a schema."""
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in keys(v)}
    return set()


def violations_of(job: dict[str, Any], limits: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    spec = FineTuneJobSpec.model_validate(presets.effective_spec(job, defaults or {}))
    return presets.violations(spec, job, PresetLimits.model_validate(limits), preset="ClusterFineTunePreset/p",
                              restrict_images_and_accounts=False, defaults=defaults)


@pytest.mark.parametrize(("job", "limits", "defaults", "words"), [
    # a prefix limit means nothing on a store of the job's choice
    ({"storage": {"endpoint": "evil.example:9000"}}, {"allowedModelPrefixes": ["s3://models/"]}, None,
     "spec.storage.endpoint: ClusterFineTunePreset/p limits model or output prefixes"),
    ({"storage": {"endpoint": "evil.example:9000"}}, {"allowedStorageEndpoints": ["minio.storage:9000"]}, None,
     "spec.storage.endpoint: evil.example:9000 is not in limits.allowedStorageEndpoints"),
    ({"model": {"source": "s3://models/tiny/", "trustRemoteCode": True}}, {"allowTrustRemoteCode": False}, None,
     "spec.model.trustRemoteCode: ClusterFineTunePreset/p allows no remote code"),
    ({"scheduling": {"priorityClassName": "system-cluster-critical"}}, {"allowedPriorityClasses": ["batch-low"]},
     None, "spec.scheduling.priorityClassName: system-cluster-critical is not in limits.allowedPriorityClasses"),
    ({"scheduling": {"workloadPriorityClassName": "urgent"}}, {"allowedWorkloadPriorityClasses": ["normal"]},
     None, "spec.scheduling.workloadPriorityClassName: urgent is not in"),
    ({"scheduling": {"tolerations": [{"operator": "Exists"}]}}, {"allowedTolerationKeys": ["gpu"]}, None,
     "spec.scheduling.tolerations[0]: key (none: every taint) is not in limits.allowedTolerationKeys"),
    ({"scheduling": {"tolerations": [{"key": "team-b", "operator": "Exists"}]}}, {"allowedTolerationKeys": ["gpu"]},
     None, "key team-b is not in"),
    ({"scheduling": {"nodeSelector": {"pool": "team-b"}}}, {"allowedNodeLabels": ["pool=team-a", "zone"]}, None,
     "spec.scheduling.nodeSelector: pool=team-b is not in limits.allowedNodeLabels"),
    ({"scheduling": {"affinity": {"nodeAffinity": {}}}}, {"allowedNodeLabels": ["zone"]}, None,
     "spec.scheduling.affinity: ClusterFineTunePreset/p limits node labels"),
    ({"env": [{"name": "DEBUG", "value": "1"}]}, {"allowedEnv": ["WANDB_*", "HF_TOKEN"]}, None,
     "spec.env: DEBUG is not in limits.allowedEnv"),
    ({"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "team-b-token", "key": "t"}}}]},
     {"allowedSecrets": ["hf-token"]}, None,
     "spec.env[HF_TOKEN].valueFrom.secretKeyRef: Secret team-b-token is not in limits.allowedSecrets"),
    ({"storage": {"secretRef": {"name": "team-b-s3"}}}, {"allowedSecrets": ["s3"]}, None,
     "spec.storage.secretRef: Secret team-b-s3 is not in"),
    ({"imagePullSecrets": [{"name": "other"}]}, {"allowedSecrets": ["s3"]}, None,
     "spec.imagePullSecrets: Secret other"),
    ({"storage": {"endpoint": ""}}, {"allowedModelPrefixes": ["s3://models/"]},
     {"storage": {"endpoint": "minio.storage:9000"}}, "spec.storage.endpoint: ClusterFineTunePreset/p limits"),
    ({"scheduling": {"affinity": {}}}, {"allowedNodeLabels": ["zone"]}, None, "spec.scheduling.affinity"),
], ids=["endpoint-pinned", "endpoint-allowlist", "trust-remote-code", "priority-class", "workload-priority",
        "toleration-without-key", "toleration-key", "node-label", "affinity", "env", "env-secret", "storage-secret",
        "pull-secret", "empty-endpoint", "empty-affinity"])
def test_each_choice_limit_names_the_field(job: dict[str, Any], limits: dict[str, Any],
                                          defaults: dict[str, Any] | None, words: str) -> None:
    found = violations_of({**BASE, **job}, limits, defaults)
    assert len(found) == 1 and words in found[0], found


@pytest.mark.parametrize(("job", "limits", "defaults"), [
    ({"storage": {"endpoint": "minio.storage:9000"}}, {"allowedModelPrefixes": ["s3://models/"]},
     {"storage": {"endpoint": "minio.storage:9000"}}),  # the preset's own endpoint
    ({}, {"allowedModelPrefixes": ["s3://models/"]}, {"storage": {"endpoint": "minio.storage:9000"}}),
    ({"storage": {"endpoint": "minio.storage:9000"}}, {"allowedStorageEndpoints": ["minio.storage:9000"]}, None),
    ({"scheduling": {"tolerations": [{"key": "gpu", "operator": "Exists"}], "nodeSelector": {"pool": "team-a",
                                                                                            "zone": "b"}}},
     {"allowedTolerationKeys": ["gpu"], "allowedNodeLabels": ["pool=team-a", "zone"]}, None),
    ({"env": [{"name": "WANDB_PROJECT", "value": "x"}, {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "hf-token", "key": "t"}}}]}, {"allowedEnv": ["WANDB_*", "HF_TOKEN"], "allowedSecrets": ["hf-token"]},
     None),
    ({}, {"allowedTolerationKeys": [], "allowedNodeLabels": [], "allowedEnv": [], "allowedSecrets": []},
     {"scheduling": {"tolerations": [{"operator": "Exists"}], "nodeSelector": {"pool": "x"}},
      "env": [{"name": "HF_ENDPOINT", "value": "http://mirror"}], "storage": {"secretRef": {"name": "s3"}}}),
    ({"scheduling": {"tolerations": [{"operator": "Exists"}]}}, {"allowedTolerationKeys": [""]}, None),
    ({}, {"allowedImages": ["registry.example/team:"], "allowedServiceAccounts": ["team"]},
     {"image": "registry.example/platform:1", "serviceAccountName": "platform"}),
], ids=["preset-endpoint", "default-endpoint", "listed-endpoint", "listed-scheduling", "listed-env",
        "the-presets-own-defaults", "keyless-toleration-listed", "the-presets-own-image"])
def test_what_the_limits_allow_passes(job: dict[str, Any], limits: dict[str, Any],
                                      defaults: dict[str, Any] | None) -> None:
    assert violations_of({**BASE, **job}, limits, defaults) == []


@pytest.mark.parametrize("name", ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "HF_ENDPOINT", "PYTHONPATH",
                                  "PYTHONSTARTUP", "LD_PRELOAD", "LD_LIBRARY_PATH", "HTTPS_PROXY", "https_proxy",
                                  "PATH", "BASH_ENV", "MASTER_ADDR", "PET_RDZV_ENDPOINT", "NCCL_NET_PLUGIN",
                                  "S3_ENDPOINT", "RES_OPTIONS", "HOSTALIASES"])
def test_device_loader_interpreter_and_endpoint_variables_are_refused_without_any_preset(name: str) -> None:
    job = {**BASE, "env": [{"name": name, "value": "x"}]}
    spec = FineTuneJobSpec.model_validate(job)  # valid as a model: a preset's defaults may set them
    found = presets.violations(spec, job, None, preset=None, restrict_images_and_accounts=False)
    assert len(found) == 1 and found[0].startswith(f"spec.env: {name} cannot be set by a FineTuneJob"), found
    # a preset cannot allow them either
    listed = presets.violations(spec, job, PresetLimits(allowed_env=[name]), preset="p",
                                restrict_images_and_accounts=False)
    assert len(listed) == 1 and "cannot be set by a FineTuneJob" in listed[0]


@pytest.mark.parametrize("value_from", [{"fieldRef": {"fieldPath": "metadata.name"}}, {},
                                        {"secretKeyRef": {"name": "a", "key": "b"},
                                         "configMapKeyRef": {"name": "c", "key": "d"}}])
def test_value_from_is_one_secret_or_config_map_key(value_from: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=r"valueFrom|fieldRef|extra"):
        FineTuneJobSpec.model_validate({**BASE, "env": [{"name": "X", "valueFrom": value_from}]})


@pytest.mark.parametrize(("selector", "labels", "selected"), [
    (None, {}, True),
    ({}, {}, True),
    ({"matchLabels": {"team": "a"}}, {"team": "a", "x": "y"}, True),
    ({"matchLabels": {"team": "a"}}, {"team": "b"}, False),
    ({"matchLabels": {"team": "a"}}, {}, False),
    ({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]}, {"team": "b"}, True),
    ({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]}, {}, False),
    ({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}, {"team": "a"}, False),
    ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"gpu": ""}, True),
    ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {"gpu": ""}, False),
])
def test_a_cluster_preset_namespace_selector(selector: dict[str, Any] | None, labels: dict[str, str],
                                             selected: bool) -> None:
    preset = {"kind": presets.CLUSTER_KIND, "spec": {} if selector is None else {"namespaceSelector": selector}}
    assert presets.selects(preset, {"metadata": {"labels": labels}}) is selected
    # a namespaced FineTunePreset applies in its own namespace only: it has no selector
    assert presets.selects({**preset, "kind": presets.KIND}, {"metadata": {"labels": labels}}) is True


def test_preset_required_label() -> None:
    assert presets.preset_required({"metadata": {"labels": {presets.PRESET_REQUIRED_LABEL: "true"}}})
    assert not presets.preset_required({"metadata": {"labels": {presets.PRESET_REQUIRED_LABEL: "false"}}})
    assert not presets.preset_required(None)


def test_only_the_cluster_preset_crd_has_a_namespace_selector() -> None:
    def spec_of(kind: str) -> dict[str, Any]:
        schema = crd.build_preset_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        return dict(schema["properties"]["spec"]["properties"])
    assert "namespaceSelector" in spec_of(presets.CLUSTER_KIND)
    assert "namespaceSelector" not in spec_of(presets.KIND)


@pytest.mark.parametrize("cleared", ["", None])
def test_a_presets_queue_cannot_be_cleared(cleared: str | None) -> None:
    # Leaving the queue would create the Job unsuspended, outside Kueue's quota.
    spec = FineTuneJobSpec.model_validate(effective({**JOB, "scheduling": {"queueName": cleared}}))
    assert spec.scheduling.queue_name == "team-a"
    other = FineTuneJobSpec.model_validate(effective({**JOB, "scheduling": {"queueName": "team-a-low"}}))
    assert other.scheduling.queue_name == "team-a-low"


def test_allowed_queues() -> None:
    limits = {"allowedQueues": ["team-a", "team-a-low"]}
    assert violations_of({**BASE, "scheduling": {"queueName": "team-a-low"}}, limits) == []
    found = violations_of({**BASE, "scheduling": {"queueName": "team-b"}}, limits)
    assert found == ["spec.scheduling.queueName: team-b is not in limits.allowedQueues of ClusterFineTunePreset/p "
                     "(team-a, team-a-low)"]
    assert "(none) is not in limits.allowedQueues" in violations_of(BASE, limits)[0]
