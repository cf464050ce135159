"""The generated CRD on a real API server: accepted, documented, and enforcing its rules at apply."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.support.helpers import wait_for
from tests.support.jobs import finetunejob

pytestmark = pytest.mark.e2e


def apply(cluster: Any, namespace: str, manifest: dict[str, Any]) -> Any:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)


def test_explain_shows_the_field_docs(cluster: Any, crd: None) -> None:
    # The API server publishes a new CRD's OpenAPI schema a moment after it is Established.
    wait_for(lambda: "int8/int4 need LoRA" in cluster.kubectl("explain", "ftj.spec.quantization", check=False).stdout,
             timeout=60, message="kubectl explain to show the field docs")
    out = cluster.kubectl("explain", "ftj.spec.lora").stdout
    assert "Low-rank adapters" in out or "LoRA adapters" in out
    assert "targetModules" in out
    out = cluster.kubectl("explain", "ftj.spec.preference").stdout
    assert "simpoGamma" in out and "orpoLambda" in out and "labelSmoothing" in out
    method = " ".join(cluster.kubectl("explain", "ftj.spec.training.method").stdout.split())  # as one line
    assert "dpo, ipo, orpo, simpo: preference tuning" in method and "simpo" in method.split("DESCRIPTION")[0]


def test_defaults_are_filled_in_by_the_api_server(cluster: Any, crd: None, namespace: str) -> None:
    assert apply(cluster, namespace, finetunejob("defaults")).returncode == 0
    spec = cluster.get("ftj", "defaults", "-n", namespace)["spec"]
    assert spec["lora"]["targetModules"] == ["all-linear"] and spec["quantization"] == "none"
    assert spec["dataset"]["maskPrompt"] is True


@pytest.mark.parametrize(("spec", "words"), [
    ({"quantization": "int3"}, ["spec.quantization", "Unsupported value"]),
    ({"training": {"batchSize": 0}}, ["spec.training.batchSize", "must be an integer from 1 to 4096 or \"auto\""]),
    ({"training": {"batchSize": "big"}}, ["spec.training.batchSize", "must be an integer from 1 to 4096"]),
    ({"training": {"batchSize": "auto"}}, ["spec.training.globalBatchSize", "needs training.globalBatchSize"]),
    ({"training": {"batchSize": 8, "globalBatchSize": 64}},
     ["spec.training.globalBatchSize", "only for training.batchSize auto"]),
    ({"training": {"gradientCheckpointing": "sometimes"}},
     ["spec.training.gradientCheckpointing", "Unsupported value"]),
    ({"training": {"memoryFraction": 0.99}}, ["spec.training.memoryFraction"]),
    ({"resources": {"gpus": -1}}, ["spec.resources.gpus"]),
    ({"quantization": "int4", "lora": {"enabled": False}},
     ["spec.lora.enabled", "quantization int8/int4 requires lora.enabled=true"]),
    ({"training": {"epochs": 1, "maxSteps": 5}}, ["spec.training", "not both"]),
    ({"output": {"location": "/tmp/out"}}, ["spec.output.location", "s3://"]),
    ({"lora": {"targetModules": ["all-linear", "q_proj"]}}, ["spec.lora.targetModules", "all-linear"]),
    ({"env": [{"name": "HF_TOKEN", "value": "x"}, {"name": "KUBETUNE_REPORT_URL", "value": "http://evil"}]},
     ["spec.env[1].name", "KUBETUNE_REPORT_URL is reserved"]),
    ({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]},
     ["spec.env[0].name", "AWS_SECRET_ACCESS_KEY is reserved"]),
    ({"dataset": {"train": "file:///proc/self/environ", "format": "csv"}},
     ["spec.dataset.train", "a FineTuneJob reads s3://, hf:// or pvc://claim/path sources"]),
    ({"model": {"source": "pvc://models/../../proc/self"}}, ["spec.model.source", "(no '..')"]),
    ({"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]},
     ["spec.env[0].name", "NVIDIA_VISIBLE_DEVICES cannot be set by a FineTuneJob"]),
    ({"env": [{"name": "LD_PRELOAD", "value": "/scratch/x.so"}]}, ["spec.env[0].name", "LD_PRELOAD cannot be set"]),
    ({"env": [{"name": "PYTHONPATH", "value": "/scratch"}]}, ["spec.env[0].name", "PYTHONPATH cannot be set"]),
    ({"env": [{"name": "HF_ENDPOINT", "value": "http://evil"}]}, ["spec.env[0].name", "HF_ENDPOINT cannot be set"]),
    ({"env": [{"name": "CUDA_VISIBLE_DEVICES", "value": "0,1"}]}, ["CUDA_VISIBLE_DEVICES cannot be set"]),
    ({"env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
     ["unknown field", "fieldRef"]),
    ({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "a", "key": "b"},
                                          "configMapKeyRef": {"name": "c", "key": "d"}}}]},
     ["spec.env[0].valueFrom", "exactly one of secretKeyRef and configMapKeyRef"]),
    ({"resources": {"gpus": 2, "sharedMemory": "64Mi", "distribution": {"processesPerNode": 2}}},
     ["spec.resources.distribution.processesPerNode", "for CPU-only jobs"]),
    ({"quantization": "int8",
      "resources": {"gpus": 0, "sharedMemory": "64Mi", "distribution": {"processesPerNode": 2, "strategy": "fsdp"}}},
     ["spec.resources.distribution.strategy", "fsdp is not supported with quantization int8"]),
    ({"training": {"maxSteps": 10, "optimizer": "adamw_8bit"},
      "resources": {"gpus": 0, "sharedMemory": "64Mi", "distribution": {"processesPerNode": 2, "strategy": "fsdp"}}},
     ["spec.resources.distribution.strategy", "fsdp is not supported with the bitsandbytes optimizers"]),
    ({"resources": {"gpus": 0, "sharedMemory": "64Mi", "distribution": {"processesPerNode": 1, "strategy": "fsdp"}}},
     ["spec.resources.distribution.strategy", "fsdp needs more than one training process"]),
    ({"resources": {"gpus": 1, "sharedMemory": "64Mi", "distribution": {"strategy": "fsdp"}}},
     ["spec.resources.distribution.strategy", "fsdp needs more than one training process"]),
    ({"evaluation": {"metrics": ["bleu", "accuracy"]}}, ["spec.evaluation.metrics[1]", "Unsupported value"]),
    ({"evaluation": {"metrics": ["judge"]}}, ["spec.evaluation.judge", "set evaluation.judge"]),
    ({"evaluation": {"metrics": ["judge"], "judge": {"model": "grader"}}}, ["spec.evaluation.judge.url", "Required"]),
    ({"evaluation": {"metrics": ["perplexity"], "gate": {"rules": [{"metric": "bleu", "min": 20}]}}},
     ["spec.evaluation.gate.rules", "must be listed in evaluation.metrics"]),
    ({"evaluation": {"gate": {"rules": [{"metric": "bleu"}]}}},
     ["spec.evaluation.gate.rules[0]", "needs min, max or minImprovement"]),
    ({"evaluation": {"maxSamples": 5000}}, ["spec.evaluation.maxSamples", "less than or equal to 2000"]),
    ({"training": {"method": "kto"}}, ["spec.training.method", "Unsupported value"]),
    ({"training": {"method": "dpo"}, "preference": {"beta": 0}}, ["spec.preference.beta", "greater than 0"]),
    ({"training": {"method": "sft"}, "preference": {"beta": 0.2}},
     ["spec.preference", "preference is for training.method dpo, ipo, orpo or simpo"]),
    ({"training": {"method": "ipo"}, "preference": {"simpoGamma": 1}},
     ["spec.preference.simpoGamma", "simpoGamma is for training.method simpo"]),
    ({"training": {"method": "dpo", "packing": True}}, ["spec.training.packing", "packing is for training.method sft"]),
], ids=["enum", "minimum", "batch-size-word", "cel-auto-without-global-batch", "cel-global-batch-without-auto",
        "checkpointing-word", "memory-fraction", "negative-gpus", "cel-int4-without-lora", "cel-epochs-and-steps",
        "cel-s3-output", "cel-targets", "cel-reserved-report-url", "cel-reserved-aws", "cel-file-source",
        "cel-pvc-dotdot", "cel-denied-nvidia-devices",
        "cel-denied-ld-preload", "cel-denied-pythonpath", "cel-denied-hf-endpoint", "cel-denied-cuda-devices",
        "value-from-field-ref", "cel-value-from-both", "cel-processes-with-gpus",
        "cel-fsdp-int8", "cel-fsdp-8bit-optimizer", "cel-fsdp-one-cpu-process", "cel-fsdp-one-gpu",
        "evaluation-unknown-metric", "cel-judge-without-endpoint", "judge-without-url", "cel-gate-unlisted-metric",
        "cel-gate-rule-without-bound", "evaluation-max-samples", "unknown-method", "preference-beta-zero",
        "cel-preference-on-sft", "cel-simpo-gamma-on-ipo", "cel-packing-pairs"])
def test_invalid_finetunejob_is_rejected_at_apply(cluster: Any, crd: None, namespace: str,
                                                  spec: dict[str, Any], words: list[str]) -> None:
    result = apply(cluster, namespace, finetunejob("invalid", **spec))
    assert result.returncode != 0
    for word in words:
        assert word in result.stderr, result.stderr


def test_training_sections_are_immutable(cluster: Any, crd: None, namespace: str) -> None:
    assert apply(cluster, namespace, finetunejob("fixed")).returncode == 0
    result = cluster.kubectl("patch", "ftj", "fixed", "-n", namespace, "--type=merge",
                             "-p", '{"spec":{"model":{"source":"s3://models/other/"}}}', check=False)
    assert result.returncode != 0 and "model is immutable after creation" in result.stderr
    result = cluster.kubectl("patch", "ftj", "fixed", "-n", namespace, "--type=merge",
                             "-p", '{"spec":{"suspend":true}}', check=False)
    assert result.returncode == 0, result.stderr


def test_a_job_over_several_nodes_has_a_name_its_pod_hostnames_can_carry(cluster: Any, crd: None,
                                                                         namespace: str) -> None:
    two_nodes = {"resources": {"gpus": 1, "distribution": {"nodes": 2}}}
    result = apply(cluster, namespace, finetunejob("n" * 53, **two_nodes))
    assert result.returncode != 0 and "metadata.name" in result.stderr and "at most 52" in result.stderr, result.stderr
    assert apply(cluster, namespace, finetunejob("n" * 52, **two_nodes)).returncode == 0
    assert apply(cluster, namespace, finetunejob("o" * 60)).returncode == 0  # one node: any valid name
    result = apply(cluster, namespace, finetunejob("many", resources={"gpus": 1, "distribution": {"nodes": 65}}))
    assert result.returncode != 0 and "spec.resources.distribution.nodes" in result.stderr, result.stderr
