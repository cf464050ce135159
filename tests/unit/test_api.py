"""The FineTuneJob API models, the trainer contract and the generated CRD."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune import api, crd, presets, render, rules
from kubetune.settings import Settings
from kubetune_contract.config import TrainerConfig
from kubetune_contract.rules import QUANTIZATION_NEEDS_LORA

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

VALID_SPEC: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"location": "s3://runs/"},
}


def finetunejobs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "FineTuneJob"]


def test_examples_exist() -> None:
    assert any(finetunejobs(p) for p in EXAMPLES), "examples/ holds no FineTuneJob"


# Examples of other tools (GitOps, a Secret, serving) that hold no KubeTune object.
NOT_KUBETUNE = {"argocd-application.yaml", "flux-kustomization.yaml", "s3-secret.yaml", "serving-vllm.yaml",
                "serving-kserve.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses_and_keeps_its_presets_limits(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    ours = [d for d in docs if d.get("apiVersion") == f"{api.GROUP}/{api.VERSION}"]
    assert bool(ours) != (path.name in NOT_KUBETUNE), f"{path.name}: {len(ours)} KubeTune objects"
    found = {(d["kind"], d["metadata"]["name"]): d for d in ours if d["kind"] in presets.PLURALS}
    for preset in found.values():
        presets.FineTunePreset.model_validate(preset)
        if preset["kind"] == presets.KIND:
            assert "namespaceSelector" not in preset["spec"], "only a ClusterFineTunePreset has one"
    for doc in finetunejobs(path):
        job = api.FineTuneJob.model_validate(doc)
        ref = job.spec.preset
        if ref is None:
            continue
        preset = found[(ref.kind, ref.name)]  # an example names a preset it defines
        raw = doc["spec"]
        effective = api.FineTuneJobSpec.model_validate(
            presets.effective_spec(raw, presets.preset_defaults(preset)))
        limits = presets.FineTunePresetSpec.model_validate(preset["spec"]).limits
        assert presets.violations(effective, raw, limits, preset=f"{ref.kind}/{ref.name}",
                                  restrict_images_and_accounts=True,
                                  defaults=presets.preset_defaults(preset)) == []


def test_defaults_make_a_lora_run() -> None:
    spec = api.FineTuneJobSpec.model_validate(VALID_SPEC)
    assert spec.lora.enabled and spec.lora.target_modules == ["all-linear"]
    assert spec.quantization == "none" and spec.resources.gpus == 1
    assert spec.training.epochs is None and spec.training.max_steps is None


def with_change(path: str, value: Any) -> dict[str, Any]:
    """VALID_SPEC with one dotted path set (value None deletes it)."""
    spec = copy.deepcopy(VALID_SPEC)
    node = spec
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return spec


INVALID = [
    # (change, value, field named in the error, words in the message)
    ("model.source", None, "model.source", "Field required"),
    ("model.source", "ftp://host/model", "model.source", "unknown scheme"),
    ("model.source", "s3://", "model.source", "names no bucket"),
    ("model.tokenizer", "gs://bucket/tok", "model.tokenizer", "unknown scheme"),
    ("dataset.train", "http://example.com/x.csv", "dataset.train", "unknown scheme"),
    ("dataset.format", "xlsx", "dataset.format", "'auto', 'jsonl', 'csv' or 'parquet'"),
    ("dataset.validationSplit", 0.7, "dataset.validationSplit", "less than or equal to 0.5"),
    ("dataset.validationSplit", 0, "dataset.validationSplit", "greater than 0"),
    ("dataset.maxLength", "long", "dataset.maxLength", "valid integer"),
    ("dataset.promptFormat", "Q: {question}", "dataset.promptFormat", "{prompt}"),
    ("training.learningRate", -1, "training.learningRate", "greater than 0"),
    ("training.batchSize", 0, "training.batchSize", "greater than or equal to 1"),
    ("training.epochs", "three", "training.epochs", "valid number"),
    ("training.optimizer", "lion", "training.optimizer", "adamw"),
    ("training", {"epochs": 1, "maxSteps": 10}, "training", "not both"),
    ("training.batchSize", "big", "training.batchSize", "'auto'"),
    ("training", {"batchSize": "auto"}, "training", "training.globalBatchSize"),
    ("training", {"batchSize": 8, "globalBatchSize": 64}, "training", "training.globalBatchSize is only for"),
    ("training.globalBatchSize", 0, "training.globalBatchSize", "greater than or equal to 1"),
    ("training.gradientCheckpointing", "sometimes", "training.gradientCheckpointing", "'auto'"),
    ("training.memoryFraction", 0.99, "training.memoryFraction", "less than or equal to 0.95"),
    ("training.autoFit", True, "training.autoFit", "Extra inputs are not permitted"),
    ("lora.r", 0, "lora.r", "greater than or equal to 1"),
    ("lora.targetModules", ["all-linear", "q_proj"], "lora.targetModules", "all-linear"),
    ("quantization", "int3", "quantization", "'none', 'int8' or 'int4'"),
    ("resources.gpus", -1, "resources.gpus", "greater than or equal to 0"),
    ("resources.memory", "lots", "resources.memory", "pattern"),
    ("output.location", "/tmp/out", "output.location", "s3://"),
    ("output.keepCheckpoints", 0, "output.keepCheckpoints", "greater than or equal to 1"),
    ("backoffLimit", -2, "backoffLimit", "greater than or equal to 0"),
    ("unknownField", 1, "unknownField", "Extra inputs are not permitted"),
    ("training.seed", 1.5, "training.seed", "valid integer"),
]


@pytest.mark.parametrize(("path", "value", "field", "words"), INVALID, ids=[f"{c[0]}={c[1]}" for c in INVALID])
def test_invalid_spec_names_the_field(path: str, value: Any, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        api.FineTuneJobSpec.model_validate(with_change(path, value))
    # The error sits at the field (or, for a rule across fields, names it in its message).
    # A field that is an integer or "auto" reports the error of each alternative below it.
    errors = info.value.errors()
    assert any(".".join(map(str, e["loc"])) == field or ".".join(map(str, e["loc"][:-1])) == field
               or (not e["loc"] and field in e["msg"]) for e in errors), errors
    assert words in str(info.value)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantization_requires_lora(quantization: str) -> None:
    spec = {**VALID_SPEC, "quantization": quantization, "lora": {"enabled": False}}
    with pytest.raises(ValidationError, match=re.escape(QUANTIZATION_NEEDS_LORA.message)):
        api.FineTuneJobSpec.model_validate(spec)


@pytest.mark.parametrize("name", ["KUBETUNE_REPORT_URL", "KUBETUNE_REPORT_TOKEN", "AWS_SECRET_ACCESS_KEY",
                                  "AWS_ENDPOINT_URL", "HOME", "HF_HOME", "TMPDIR", "PYTHONUNBUFFERED"])
def test_reserved_env_names_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        api.FineTuneJobSpec.model_validate({**VALID_SPEC, "env": [{"name": name, "value": "x"}]})
    assert info.value.errors()[0]["loc"] == ("env", 0, "name")
    assert f"{name} is reserved" in str(info.value)


def test_other_env_names_are_accepted() -> None:
    spec = api.FineTuneJobSpec.model_validate({**VALID_SPEC, "env": [{"name": "HF_TOKEN", "value": "x"},
                                                                     {"name": "NCCL_DEBUG", "value": "WARN"}]})
    assert [e.name for e in spec.env or []] == ["HF_TOKEN", "NCCL_DEBUG"]


def test_processes_per_node_is_for_cpu_only_jobs() -> None:
    spec = {**VALID_SPEC, "resources": {"gpus": 2, "distribution": {"processesPerNode": 2}}}
    with pytest.raises(ValidationError, match="processesPerNode is for CPU-only jobs"):
        api.FineTuneJobSpec.model_validate(spec)
    cpu = api.FineTuneJobSpec.model_validate({**VALID_SPEC, "resources": {"gpus": 0,
                                                                         "distribution": {"processesPerNode": 2}}})
    assert cpu.resources.distribution.processes_per_node == 2


FSDP = {"distribution": {"strategy": "fsdp"}}


@pytest.mark.parametrize(("resources", "processes"), [
    ({"gpus": 2}, 2), ({"gpus": 8}, 8), ({"gpus": 0, "distribution": {"processesPerNode": 2}}, 2),
    ({"gpus": 1, "distribution": {"nodes": 2}}, 2), ({"gpus": 4, "distribution": {"nodes": 3}}, 12),
])
def test_fsdp_is_accepted_with_several_processes(resources: dict[str, Any], processes: int) -> None:
    resources = copy.deepcopy(resources)
    resources.setdefault("distribution", {}).update(FSDP["distribution"])
    spec = api.FineTuneJobSpec.model_validate({**VALID_SPEC, "resources": resources, "quantization": "int4"})
    assert spec.resources.distribution.strategy == "fsdp" and spec.processes() == processes


def test_the_strategy_defaults_to_ddp() -> None:
    assert api.FineTuneJobSpec.model_validate(VALID_SPEC).resources.distribution.strategy == "ddp"


@pytest.mark.parametrize("resources", [
    {}, {"gpus": 1}, {"gpus": 0}, {"gpus": 0, "distribution": {"processesPerNode": 1}},
], ids=["default-one-gpu", "one-gpu", "cpu-default-processes", "cpu-one-process"])
def test_fsdp_with_one_process_is_rejected_naming_the_field(resources: dict[str, Any]) -> None:
    resources = copy.deepcopy(resources)
    resources.setdefault("distribution", {}).update(FSDP["distribution"])
    with pytest.raises(ValidationError, match=re.escape(rules.FSDP_NEEDS_PROCESSES.message)):
        api.FineTuneJobSpec.model_validate({**VALID_SPEC, "resources": resources})


def test_fsdp_with_int8_is_rejected_naming_the_field() -> None:
    spec = {**VALID_SPEC, "quantization": "int8", "resources": {"gpus": 2, **FSDP}}
    with pytest.raises(ValidationError, match=r"resources\.distribution\.strategy fsdp is not supported with "
                                              r"quantization int8: bitsandbytes cannot shard 8-bit weights"):
        api.FineTuneJobSpec.model_validate(spec)
    config = {**VALID_SPEC, "quantization": "int8", **FSDP}
    with pytest.raises(ValidationError,
                       match=r"Value error, distribution\.strategy fsdp is not supported with quantization int8"):
        TrainerConfig.model_validate(config)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_fsdp_with_a_bitsandbytes_optimizer_is_rejected_naming_the_field(optimizer: str) -> None:
    spec = {**VALID_SPEC, "training": {"optimizer": optimizer}, "resources": {"gpus": 2, **FSDP}}
    with pytest.raises(ValidationError, match=r"resources\.distribution\.strategy fsdp is not supported with "
                                              rf"the bitsandbytes optimizers \(training\.optimizer .*{optimizer}"):
        api.FineTuneJobSpec.model_validate(spec)
    with pytest.raises(ValidationError, match=r"Value error, distribution\.strategy fsdp is not supported with "
                                              r"the bitsandbytes optimizers"):
        TrainerConfig.model_validate({**VALID_SPEC, "training": {"optimizer": optimizer}, **FSDP})


def test_the_trainer_config_carries_the_strategy() -> None:
    spec = api.FineTuneJobSpec.model_validate({**VALID_SPEC, "resources": {"gpus": 4, **FSDP}})
    owner = {"metadata": {"name": "j", "namespace": "ns", "uid": "12345678-abcd"}}
    rendered = yaml.safe_load(render.render_config_map(owner, spec, Settings())["data"]["config.yaml"])
    assert rendered["distribution"] == {"strategy": "fsdp"}  # resources itself stays out of the config
    assert TrainerConfig.model_validate(rendered).distribution.strategy == "fsdp"


def test_int4_runs_may_merge_their_adapter() -> None:
    """The merge loads the backbone unquantized (docs/artifacts.md), so int4 merges like int8."""
    spec = api.FineTuneJobSpec.model_validate(with_change("output.mergeAdapter", True) | {"quantization": "int4"})
    assert spec.output.merge_adapter and spec.output.merge_precision == "auto"


def test_trainer_config_accepts_a_local_output_directory() -> None:
    config = TrainerConfig.model_validate(with_change("output.location", "/tmp/out"))
    assert config.output.location == "/tmp/out"


def test_the_trainer_reads_the_spec_sections_unchanged() -> None:
    spec = api.FineTuneJobSpec.model_validate({
        **VALID_SPEC, "training": {"maxSteps": 7, "learningRate": 0.001}, "lora": {"r": 4},
        "quantization": "int8", "dataset": {"train": "s3://data/t.csv", "maxLength": 256}})
    owner = {"metadata": {"name": "j", "namespace": "ns", "uid": "12345678-abcd"}}
    rendered = yaml.safe_load(render.render_config_map(owner, spec, Settings())["data"]["config.yaml"])
    config = TrainerConfig.model_validate(rendered)  # what the trainer parses in the pod
    for section in ("model", "dataset", "training", "lora", "quantization"):
        assert getattr(config, section) == getattr(spec, section), section
    # output.oci's secretRef is the operator's (the credentials travel as a secretKeyRef variable)
    assert config.output.model_dump() == spec.output.model_dump()


# --- the generated CRD -------------------------------------------------------------------------

def schema_nodes(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.get("properties", {}).items():
            found += schema_nodes(value, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                found += schema_nodes(node[key], f"{path}[{key}]")
    return found


def openapi_schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


INT_OR_STRING = {".spec.training.batchSize"}
"""Fields that are an integer or "auto": x-kubernetes-int-or-string, the one anyOf a structural schema allows."""
BOOL_OR_KEYWORD = {".spec.training.gradientCheckpointing"}
"""Fields that are a boolean or "auto": no structural type, an enum of the three values."""


def test_schema_is_structural() -> None:
    text = json.dumps(openapi_schema())
    for forbidden in ('"$ref"', '"$defs"', '"allOf"', '"oneOf"', '"title"'):
        assert forbidden not in text
    for path, node in schema_nodes(openapi_schema()):
        if path in INT_OR_STRING:
            assert node["x-kubernetes-int-or-string"] is True and "type" not in node
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        if path in BOOL_OR_KEYWORD:
            assert node["enum"] == [True, False, "auto"] and "type" not in node, path
            continue
        assert "anyOf" not in node, path
        assert "type" in node, f"{path or '<root>'} has no type"
        assert node.get("default", "") is not None, f"{path} has default: null"
        if node["type"] == "object" and "properties" in node:
            assert "additionalProperties" not in node, path


def test_schema_preserves_unknown_fields_only_for_free_form_objects() -> None:
    preserved = {p for p, n in schema_nodes(openapi_schema()) if n.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved == {
        ".spec.scheduling.affinity",
        ".spec.scheduling.tolerations[items]",
        *BOOL_OR_KEYWORD,
    }


def test_schema_documents_every_field() -> None:
    spec = openapi_schema()["properties"]["spec"]
    undocumented = [p for p, n in schema_nodes(spec) if p and "[" not in p.split(".")[-1] and not n.get("description")]
    assert undocumented == []


def test_training_sections_are_immutable() -> None:
    props = openapi_schema()["properties"]["spec"]["properties"]
    for name in api.IMMUTABLE_FIELDS:
        assert {"rule": "self == oldSelf", "message": f"{name} is immutable after creation"} in props[name][
            "x-kubernetes-validations"
        ]
    assert "x-kubernetes-validations" not in props["suspend"]


def test_printer_columns() -> None:
    columns = crd.build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == ["Phase", "Progress", "Loss", "Eval", "Age"]
    assert [c["name"] for c in columns if c.get("priority") == 1] == ["Model", "Artifacts"]


def test_generated_files_have_not_drifted() -> None:
    assert crd.drift(ROOT) == [], "generated files differ from the models: run `make crd`"


def test_crd_check_names_the_stale_file(tmp_path: Path) -> None:
    crd.write(tmp_path)
    (tmp_path / "docs/api.md").write_text("edited by hand\n")
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "crd", "--check", "--root", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1
    assert "docs/api.md" in result.stderr and "crds/" not in result.stderr


@pytest.mark.parametrize("module", ["kubetune.api", "kubetune_contract.config", "kubetune.crd"])
def test_api_modules_import_no_heavy_dependencies(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "heavy = sorted(m for m in ('torch', 'kopf', 'kubernetes', 'transformers') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


@pytest.mark.parametrize(("field", "value"), [
    ("dataset.train", "file:///proc/self/environ"),
    ("dataset.train", "/proc/self/environ"),
    ("dataset.validation", "data/val.jsonl"),
    ("model.source", "file:///models/tiny"),
    ("model.tokenizer", "pvc://models/../../proc/self"),
    ("dataset.train", "pvc://data/.."),
])
def test_a_finetunejob_reads_only_cluster_sources(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=f"{field}: {re.escape(value)}: a FineTuneJob reads s3://"):
        api.FineTuneJobSpec.model_validate(with_change(field, value))


def test_cluster_sources_are_accepted() -> None:
    for field, value in (("dataset.train", "pvc://data/a..b/train.jsonl"), ("model.source", "s3://m/tiny/"),
                         ("model.tokenizer", "hf://Qwen/Qwen2.5-0.5B")):
        api.FineTuneJobSpec.model_validate(with_change(field, value))


@pytest.mark.parametrize(("oci", "field"), [
    ({"repository": "Registry.Example/Team"}, "repository"),
    ({"repository": "registry.example"}, "repository"),
    ({"repository": "registry.example/a", "tag": "-bad"}, "tag"),
    ({"repository": "registry.example/a", "secretRef": {}}, "secretRef.name"),
])
def test_output_oci_is_checked_at_apply(oci: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=rf"output\.oci\.{field}"):
        api.FineTuneJobSpec.model_validate(with_change("output.oci", oci))
