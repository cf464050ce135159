"""render.py: golden files for a minimal and a maximal FineTuneJob, and the rules behind them.

Refresh the golden files after an intended change with `KUBETUNE_UPDATE_GOLDEN=1 make unit`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api, render, rules
from kubetune.api import FineTuneJobSpec
from kubetune.settings import Settings

GOLDEN = Path(__file__).parent / "golden"
SETTINGS = Settings(trainer_image="registry.example/kubetune/trainer:1.0", s3_endpoint="minio.storage:9000",
                    s3_insecure=True, s3_secret="kubetune-s3")

MINIMAL: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"location": "s3://runs/"},
}
MAXIMAL: dict[str, Any] = {
    "model": {"source": "pvc://models/llama-3-8b", "revision": "main", "tokenizer": "pvc://models/tok"},
    "dataset": {"train": "pvc://data/train.parquet", "validation": "s3://data/val.parquet", "format": "parquet",
                "promptColumn": "instruction", "answerColumn": "output", "systemPrompt": "Be brief.",
                "template": "chat", "maxLength": 2048},
    "training": {"epochs": 3, "learningRate": 1e-4, "batchSize": 2, "gradientAccumulation": 8,
                 "optimizer": "paged_adamw_8bit", "precision": "bf16", "checkpointEverySteps": 200},
    "lora": {"r": 64, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]},
    "quantization": "int4",
    "output": {"location": "s3://runs/llama/", "keepCheckpoints": 3,
               "oci": {"repository": "registry.example.com/team/adapters", "secretRef": {"name": "registry"}}},
    "storage": {"endpoint": "s3.eu-west-1.amazonaws.com", "region": "eu-west-1",
                "secretRef": {"name": "aws-creds", "accessKeyKey": "id", "secretKeyKey": "key"}},
    "resources": {"gpus": 4, "gpuResourceName": "nvidia.com/gpu", "cpu": "16", "memory": "128Gi",
                  "sharedMemory": "32Gi"},
    "scheduling": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "affinity": {"nodeAffinity": {}}, "priorityClassName": "training",
                   "queueName": "team-a", "schedulerName": "default-scheduler"},
    "image": "registry.example/custom-trainer:2",
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccountName": "trainer",
    "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "NCCL_DEBUG", "value": "WARN"}],
    "cacheVolume": {"claimName": "hf-cache"},
    "evaluation": {"metrics": ["bleu", "judge"], "maxSamples": 128,
                   "judge": {"url": "https://judge.example/v1", "model": "grader",
                             "secretRef": {"name": "judge-creds", "key": "token"}},
                   "gate": {"rules": [{"metric": "bleu", "minImprovement": 2}], "failJob": True}},
    "suspend": False,
    "backoffLimit": 5,
    "activeDeadlineSeconds": 86400,
    "ttlSecondsAfterFinished": 3600,
}


def owner(name: str = "llama", namespace: str = "team-a") -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace, "uid": "0000-1111"}}


MULTI_NODE: dict[str, Any] = {**MINIMAL, "resources": {"gpus": 4, "distribution": {"nodes": 3}}}
PREFERENCE: dict[str, Any] = {
    **MINIMAL, "dataset": {"train": "s3://data/pairs.jsonl", "chosenColumn": "good", "rejectedColumn": "bad"},
    "training": {"method": "dpo"}, "preference": {"beta": 0.2, "labelSmoothing": 0.1},
}
CASES = {"minimal": MINIMAL, "maximal": MAXIMAL, "multinode": MULTI_NODE, "preference": PREFERENCE}


def rendered(spec: dict[str, Any]) -> dict[str, Any]:
    parsed = FineTuneJobSpec.model_validate(spec)
    config_map = render.render_config_map(owner(), parsed, SETTINGS)
    children = {"configMap": config_map, "job": render.render_job(owner(), parsed, SETTINGS, config_map)}
    if parsed.resources.distribution.nodes > 1:
        children["service"] = render.render_service(owner())
    return children


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden(case: str) -> None:
    actual = yaml.safe_dump(rendered(CASES[case]), sort_keys=True)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(actual)
    assert actual == path.read_text()


def pod(spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = rendered(spec)["job"]["spec"]["template"]["spec"]
    return result


def test_pod_is_restricted() -> None:
    container = pod(MINIMAL)["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod(MINIMAL)["securityContext"]["runAsNonRoot"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/var/tmp/kubetune", "/var/cache/kubetune", "/dev/shm"} <= writable


def test_service_account_token_is_mounted_only_for_a_named_account() -> None:
    assert pod(MINIMAL)["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod(MINIMAL)
    assert pod(MAXIMAL)["automountServiceAccountToken"] is True
    assert pod(MAXIMAL)["serviceAccountName"] == "trainer"


def test_every_variable_the_operator_sets_is_reserved() -> None:
    spec = FineTuneJobSpec.model_validate(MAXIMAL)
    env = render.render_pod_spec(owner(), spec, Settings(report_url="http://op:8081"))["containers"][0]["env"]
    own = [e["name"] for e in env if e["name"] not in {x["name"] for x in MAXIMAL["env"]}]
    assert "KUBETUNE_REPORT_TOKEN" in own and "AWS_SECRET_ACCESS_KEY" in own
    assert all(rules.reserved_env_name(name) for name in own), [n for n in own if not rules.reserved_env_name(n)]


def test_operator_variables_come_last_and_win_over_a_job_that_slipped_past_validation() -> None:
    # model_construct skips validation: what an older operator or a bypassed webhook might let in.
    spec = FineTuneJobSpec.model_validate(MAXIMAL)
    spec.env = [*(spec.env or []), api.EnvVar.model_construct(name="KUBETUNE_REPORT_URL", value="http://evil")]
    container = render.render_pod_spec(owner(), spec, Settings(report_url="http://op:8081"))["containers"][0]
    urls = [e.get("value") for e in container["env"] if e["name"] == "KUBETUNE_REPORT_URL"]
    assert urls == ["http://op:8081/v1/reports/team-a/llama"]
    names = [e["name"] for e in container["env"]]
    assert names.index("HF_TOKEN") < names.index("KUBETUNE_JOB_NAME")


def test_credentials_travel_only_as_secret_refs() -> None:
    objects = rendered(MAXIMAL)
    env = {e["name"]: e for e in objects["job"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID",
                                        "valueFrom": {"secretKeyRef": {"name": "aws-creds", "key": "id"}}}
    assert env["KUBETUNE_JUDGE_API_KEY"] == {"name": "KUBETUNE_JUDGE_API_KEY",
                                             "valueFrom": {"secretKeyRef": {"name": "judge-creds", "key": "token"}}}
    config = objects["configMap"]["data"]["config.yaml"]
    assert "aws-creds" not in config and "judge-creds" not in config and "secretRef" not in config
    assert yaml.safe_load(config)["evaluation"]["judge"] == {
        "url": "https://judge.example/v1", "model": "grader", "prompt": api.JobJudgeSpec.model_fields["prompt"].default,
        "timeoutSeconds": 30, "maxRetries": 2}


def test_config_map_holds_the_trainer_config_with_defaults_from_settings() -> None:
    config = yaml.safe_load(rendered(MINIMAL)["configMap"]["data"]["config.yaml"])
    assert config["runName"] == "team-a/llama/0000-111"
    assert config["storage"] == {"endpoint": "minio.storage:9000", "insecure": True}


def test_a_replacement_pod_waits_until_the_previous_one_is_gone() -> None:
    assert rendered(MINIMAL)["job"]["spec"]["podReplacementPolicy"] == "Failed"


def test_exit_codes_decide_retries() -> None:
    rules = rendered(MINIMAL)["job"]["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        # invalid input (3) and out of memory (6): retrying the same settings cannot help
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3, 6]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        # the store (5) or output.oci's registry (7) went away mid-run: resume in a new pod without
        # using up backoffLimit
        {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [5, 7]}},
    ]


def test_the_registry_secret_reaches_the_trainer_as_a_secret_reference_only() -> None:
    out = rendered(MAXIMAL)
    env = {e["name"]: e for e in out["job"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_REGISTRY_AUTH"]["valueFrom"] == {
        "secretKeyRef": {"name": "registry", "key": ".dockerconfigjson"}}
    config = yaml.safe_load(out["configMap"]["data"]["config.yaml"])
    assert config["output"]["oci"] == {"repository": "registry.example.com/team/adapters", "tag": "llama",
                                       "overwrite": False, "insecure": False}, "the tag defaults to the job's name"
    assert "secretRef" not in out["configMap"]["data"]["config.yaml"].split("output:")[1].split("storage:")[0]
    assert "KUBETUNE_REGISTRY_AUTH" not in {e["name"] for e in pod(MINIMAL)["containers"][0]["env"]}


def test_gpu_limits_and_shared_memory() -> None:
    spec = pod(MAXIMAL)
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}


def test_cpu_only_job_requests_no_gpu() -> None:
    spec = pod({**MINIMAL, "resources": {"gpus": 0}})
    assert "limits" not in spec["containers"][0]["resources"]


def test_a_cpu_only_pod_sees_no_gpu_of_the_node() -> None:
    # With the NVIDIA container runtime, NVIDIA_VISIBLE_DEVICES=all in an image would hand a pod
    # without GPU limits every GPU of the node: the operator sets it to void, last, so it wins.
    # Even over a preset default that set it (a preset's env is not checked against the deny list).
    env = pod({**MINIMAL, "resources": {"gpus": 0},
               "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]})["containers"][0]["env"]
    values = [e.get("value") for e in env if e["name"] == "NVIDIA_VISIBLE_DEVICES"]
    assert values[-1] == "void"  # for a repeated name the last entry wins
    assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in pod(MAXIMAL)["containers"][0]["env"]}


def test_kueue_queue_creates_the_job_suspended_with_the_label() -> None:
    job = rendered(MAXIMAL)["job"]
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_workload_priority_class_is_the_kueue_priority_label() -> None:
    scheduling = {"queueName": "team-a", "workloadPriorityClassName": "low"}
    job = rendered({**MINIMAL, "scheduling": scheduling})["job"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "low"
    assert "kueue.x-k8s.io/priority-class" not in rendered(MINIMAL)["job"]["metadata"]["labels"]


def test_pvc_sources_are_mounted_read_only() -> None:
    mounts = {m["mountPath"]: m for m in pod(MAXIMAL)["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/pvc/models"]["readOnly"] and mounts["/mnt/pvc/data"]["readOnly"]
    assert "/var/cache/kubetune" in mounts


def test_long_names_stay_valid_and_distinct() -> None:
    long_a, long_b = "a" * 200 + "x", "a" * 200 + "y"
    assert len(render.job_name(long_a)) <= 63
    assert render.job_name(long_a) != render.job_name(long_b)
    assert render.job_name("short") == "short-trainer"


def test_report_tokens_are_bound_to_the_job_uid_and_the_operator_key() -> None:
    token = render.report_token(b"k" * 32, "uid-1")
    assert token == render.report_token(b"k" * 32, "uid-1") and len(token) >= 43
    assert token != render.report_token(b"k" * 32, "uid-2")  # same name, re-created: a new token
    assert token != render.report_token(b"x" * 32, "uid-1")


def test_termination_grace_comes_from_the_operator_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = FineTuneJobSpec.model_validate(MINIMAL)
    assert render.render_pod_spec(owner(), spec, Settings())["terminationGracePeriodSeconds"] == 300
    monkeypatch.setenv("KUBETUNE_TERMINATION_GRACE_SECONDS", "1800")
    slow_store = Settings()
    assert render.render_pod_spec(owner(), spec, slow_store)["terminationGracePeriodSeconds"] == 1800


def test_one_training_process_per_gpu_under_the_launcher() -> None:
    assert pod(MINIMAL)["containers"][0]["command"] == ["python", "-m", "kubetune_trainer"]
    assert pod(MAXIMAL)["containers"][0]["command"] == [
        "python", "-m", "kubetune_trainer.launch", "--standalone", "--nproc-per-node", "4", "-m", "kubetune_trainer"]
    cpu = pod({**MINIMAL, "resources": {"gpus": 0, "distribution": {"processesPerNode": 2}}})
    assert cpu["containers"][0]["command"][-4:] == ["--nproc-per-node", "2", "-m", "kubetune_trainer"]


def test_a_run_over_several_nodes_is_an_indexed_job_that_meets_at_pod_zero() -> None:
    children = rendered(MULTI_NODE)
    job, service = children["job"], children["service"]
    assert job["spec"] | {"completionMode": "Indexed", "completions": 3, "parallelism": 3} == job["spec"]
    assert job["spec"]["backoffLimit"] == 3 * 3  # restarts of the whole group, three pods each
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"] == "llama-trainer"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {render.JOB_LABEL: "llama"}
    command = pod_spec["containers"][0]["command"]
    assert set(command) >= {"--nnodes", "3", "--nproc-per-node", "4", "--max-restarts"}
    assert command[command.index("--node-rank") + 1] == "$(JOB_COMPLETION_INDEX)"  # pod i is node rank i
    assert command[command.index("--master-addr") + 1] == "llama-trainer-0.llama-trainer"
    assert "--standalone" not in pod_spec["containers"][0]["command"]
    single = rendered({**MINIMAL, "resources": {"gpus": 2}})["job"]
    assert "completionMode" not in single["spec"] and "subdomain" not in single["spec"]["template"]["spec"]
    assert "--standalone" in single["spec"]["template"]["spec"]["containers"][0]["command"]


@pytest.mark.parametrize(("name", "nodes", "bad"), [("n" * 52, 64, False), ("n" * 53, 2, True), ("n" * 63, 1, False)])
def test_a_job_over_several_nodes_has_a_name_its_pod_hostnames_fit(name: str, nodes: int, bad: bool) -> None:
    spec = FineTuneJobSpec.model_validate({**MINIMAL, "resources": {"gpus": 1, "distribution": {"nodes": nodes}}})
    problem = api.name_problem(name, spec)
    assert (problem is not None) == bad
    if bad:
        assert problem is not None and problem.startswith("metadata.name:") and "at most 52" in problem
    if nodes > 1 and not bad:  # every pod's hostname is a DNS label
        assert len(f"{render.job_name(name)}-{nodes - 1}") <= 63
