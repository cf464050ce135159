"""Presets and policy on a real API server: defaults applied by the operator, limits enforced at
`kubectl apply` by the chart's ValidatingAdmissionPolicies, and re-checked by the operator.

The operator runs the TEST DOUBLE trainer (tests/e2e/fake_trainer.py): it reports training.maxSteps
of its config as the final step, so the effective spec shows in status.progress.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support.helpers import REPO, wait_for
from tests.support.jobs import Signals, env, finetunejob, ftj, wait_phase

pytestmark = pytest.mark.e2e

POLICY_LABEL = "kubetune.io/e2e-policy"
LIMITS: dict[str, Any] = {
    "allowedModelPrefixes": ["s3://models/"],
    "allowedOutputPrefixes": ["s3://runs/team-a/"],
    "allowedImages": ["registry.example/trainer:"],
    "allowedServiceAccounts": ["trainer"],
    "allowedPvcs": ["hf-cache"],
    "maxGpusPerNode": 1,
    "maxNodes": 1,
    "allowedQuantizations": ["none", "int4"],
    "maxSteps": 100,
    "maxEpochs": 2,
}


def preset(name: str, namespace: str | None = None, defaults: dict[str, Any] | None = None,
           limits: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if defaults is not None:
        spec["defaults"] = defaults
    if limits is not None:
        spec["limits"] = limits
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    kind = "FineTunePreset" if namespace else "ClusterFineTunePreset"
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def job(name: str, **spec: Any) -> dict[str, Any]:
    """finetunejob() with the preset "team" and an output the limits allow."""
    return finetunejob(name, **{"output": {"location": "s3://runs/team-a/"},
                                "preset": {"kind": "FineTunePreset", "name": "team"}, **spec})


def apply(cluster: Any, namespace: str, manifest: dict[str, Any]) -> Any:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)


@pytest.fixture(scope="module")
def admission_policy(cluster: Any, crd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The chart's admission policies, bound to namespaces labelled POLICY_LABEL=<token> only (other
    tests share the cluster). Yields the token."""
    token = secrets.token_hex(4)
    values = tmp_path_factory.mktemp("policy") / "values.yaml"
    selector = {"matchLabels": {POLICY_LABEL: token}}
    values.write_text(yaml.safe_dump({"fullnameOverride": f"e2e-{token}",
                                      "admissionPolicy": {"namespaceSelector": selector}}))
    rendered = cluster.helm("template", "e2e", str(REPO / "helm" / "kubetune"), "-f", str(values),
                            "--show-only", "templates/admission-policy.yaml").stdout
    cluster.kubectl("apply", "-f", "-", input=rendered)
    try:
        yield token
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)


@pytest.fixture
def policed(cluster: Any, namespace: str, admission_policy: str) -> str:
    """The test's namespace under the admission policies, with the FineTunePreset "team" (LIMITS);
    returns once the API server enforces them."""
    cluster.kubectl("label", "namespace", namespace, f"{POLICY_LABEL}={admission_policy}")
    cluster.apply(preset("team", namespace, limits=LIMITS), namespace)
    refused_at_apply(cluster, namespace, job("probe", model={"source": "s3://elsewhere/"}), "allowedModelPrefixes")
    return namespace


def refused_at_apply(cluster: Any, namespace: str, probe: dict[str, Any], words: str) -> None:
    """Wait until the API server refuses `probe` with `words` (policies and their params take a
    moment to be in force)."""

    def enforced() -> bool:
        result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                 input=yaml.safe_dump(probe), check=False)
        return result.returncode != 0 and words in result.stderr

    wait_for(enforced, timeout=60, message=f"the admission policies to refuse {words}")


@pytest.mark.parametrize(("spec", "words"), [
    ({"model": {"source": "s3://other/tiny/"}},
     ["spec.model.source: s3://other/tiny/ is not under limits.allowedModelPrefixes", "(s3://models/)"]),
    ({"model": {"source": "s3://models/tiny/", "tokenizer": "hf://someone/tok"}},
     ["spec.model.tokenizer: hf://someone/tok is not under limits.allowedModelPrefixes"]),
    ({"output": {"location": "s3://runs/team-b/"}},
     ["spec.output.location: s3://runs/team-b/ is not under limits.allowedOutputPrefixes", "(s3://runs/team-a/)"]),
    ({"resources": {"gpus": 2}}, ["spec.resources.gpus: 2 is more than limits.maxGpusPerNode 1"]),
    # maxNodes cannot be exceeded in v1alpha1 (nodes and maxNodes are both at least 1, nodes at most 1):
    # the CRD schema rejects the field first.
    ({"resources": {"gpus": 0, "distribution": {"nodes": 2}}}, ["spec.resources.distribution.nodes"]),
    ({"image": "evil.example/trainer:1"},
     ["spec.image: evil.example/trainer:1 is not in limits.allowedImages", "(registry.example/trainer:)"]),
    ({"serviceAccountName": "admin"},
     ["spec.serviceAccountName: admin is not in limits.allowedServiceAccounts", "(trainer)"]),
    ({"cacheVolume": {"claimName": "other"}}, ["PVC other is not in limits.allowedPvcs", "(hf-cache)"]),
    ({"dataset": {"train": "pvc://data/train.jsonl"}}, ["PVC data is not in limits.allowedPvcs"]),
    ({"quantization": "int8"}, ["spec.quantization: int8 is not in limits.allowedQuantizations", "(none, int4)"]),
    ({"training": {"maxSteps": 500}}, ["spec.training.maxSteps: 500 is more than limits.maxSteps 100"]),
    ({"training": {"epochs": 5}}, ["spec.training.epochs: 5", "is more than limits.maxEpochs 2"]),
], ids=["model-prefix", "tokenizer-prefix", "output-prefix", "gpus", "nodes", "image", "service-account", "pvc",
        "pvc-source", "quantization", "max-steps", "max-epochs"])
def test_a_job_over_its_presets_limits_is_rejected_at_apply(cluster: Any, policed: str, spec: dict[str, Any],
                                                          words: list[str]) -> None:
    assert_refused(cluster, policed, job("over", **spec), words)


def assert_refused(cluster: Any, namespace: str, body: dict[str, Any], words: list[str]) -> None:
    """`kubectl apply` of `body` fails with each of `words`, and nothing is stored."""
    result = apply(cluster, namespace, body)
    assert result.returncode != 0, result.stdout
    for word in words:
        assert word in result.stderr, result.stderr
    assert cluster.kubectl("get", "ftj", body["metadata"]["name"], "-n", namespace, check=False).returncode != 0


def test_a_job_within_its_presets_limits_is_accepted(cluster: Any, policed: str) -> None:
    within = job("within", image="registry.example/trainer:1.2", serviceAccountName="trainer",
                 cacheVolume={"claimName": "hf-cache"}, quantization="int4", lora={"enabled": True},
                 training={"maxSteps": 100})
    result = apply(cluster, policed, within)
    assert result.returncode == 0, result.stderr


def test_edits_are_checked_but_a_tightened_preset_does_not_block_suspend(cluster: Any, policed: str) -> None:
    assert apply(cluster, policed, job("edited", resources={"gpus": 1})).returncode == 0
    result = cluster.kubectl("patch", "ftj", "edited", "-n", policed, "--type=merge",
                             "-p", '{"spec":{"resources":{"gpus":2}}}', check=False)
    assert result.returncode != 0 and "spec.resources.gpus: 2 is more than limits.maxGpusPerNode 1" in result.stderr
    cluster.kubectl("patch", "finetunepreset", "team", "-n", policed, "--type=merge",
                    "-p", '{"spec":{"limits":{"maxGpusPerNode":0}}}')

    def tightened() -> bool:  # the job as it stands would now be refused
        again = cluster.kubectl("apply", "--dry-run=server", "-n", policed, "-f", "-", check=False,
                                input=yaml.safe_dump(job("edited-2", resources={"gpus": 1})))
        return again.returncode != 0 and "limits.maxGpusPerNode 0" in again.stderr

    wait_for(tightened, timeout=60, message="the tightened preset in force")
    suspend = cluster.kubectl("patch", "ftj", "edited", "-n", policed, "--type=merge",
                              "-p", '{"spec":{"suspend":true}}', check=False)
    assert suspend.returncode == 0, suspend.stderr


def test_without_a_preset_a_job_cannot_choose_its_image_or_service_account(cluster: Any, policed: str) -> None:
    for field, value in (("image", "registry.example/trainer:1.2"), ("serviceAccountName", "trainer")):
        result = apply(cluster, policed, finetunejob("mine", **{field: value}))
        assert result.returncode != 0 and f"spec.{field}: a FineTuneJob without a preset cannot choose" \
            in result.stderr, result.stderr
    assert apply(cluster, policed, finetunejob("plain")).returncode == 0


def test_preset_defaults_fill_the_job_and_status_names_the_preset(cluster: Any, namespace: str,
                                                                  operator: Any) -> None:
    defaults = {"training": {"maxSteps": 7}, "env": [{"name": "FROM_PRESET", "value": "yes"}],
                "resources": {"gpus": 0, "sharedMemory": "64Mi", "cpu": "1"}}
    cluster.apply(preset("team", namespace, defaults=defaults), namespace)
    body = job("defaults")
    for key in ("training", "resources"):
        del body["spec"][key]  # left to the preset
    cluster.apply(body, namespace)
    status = wait_phase(cluster, namespace, "defaults", "Succeeded")
    assert status["progress"]["step"] == 7  # the trainer ran the preset's training.maxSteps
    assert status["preset"] == {"kind": "FineTunePreset", "name": "team", "generation": 1}
    stored = ftj(cluster, namespace, "defaults")["spec"]
    assert "training" not in stored and "resources" not in stored  # the stored job is what its author wrote
    pod = cluster.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=defaults-trainer")["items"][0]
    container = pod["spec"]["containers"][0]
    assert {"name": "FROM_PRESET", "value": "yes"} in container["env"]
    assert container["resources"]["requests"]["cpu"] == "1"


def test_a_namespace_default_preset_applies_to_jobs_that_name_none(cluster: Any, namespace: str,
                                                                   operator: Any) -> None:
    name = f"e2e-default-{secrets.token_hex(3)}"
    cluster.apply(preset(name, defaults={"training": {"maxSteps": 4}}))
    try:
        cluster.kubectl("annotate", "namespace", namespace, f"kubetune.io/default-preset={name}")
        body = finetunejob("plain")
        del body["spec"]["training"]
        cluster.apply(body, namespace)
        status = wait_phase(cluster, namespace, "plain", "Succeeded")
        assert status["progress"]["step"] == 4
        assert status["preset"] == {"kind": "ClusterFineTunePreset", "name": name, "generation": 1}
        cluster.apply(finetunejob("own", preset={"kind": "FineTunePreset", "name": "missing"}), namespace)
        waiting = wait_phase(cluster, namespace, "own", "Pending", reason="MissingDependency")
        assert "FineTunePreset missing" in waiting["message"]
    finally:
        cluster.kubectl("delete", "clusterfinetunepreset", name, "--ignore-not-found", check=False)


def test_editing_a_preset_does_not_change_a_running_job(cluster: Any, namespace: str, operator: Any,
                                                        signals: Signals) -> None:
    cluster.apply(preset("team", namespace, defaults={"training": {"maxSteps": 7}}), namespace)
    body = job("held", env=env(FAKE_WAIT_FOR=signals.gate("held")))
    del body["spec"]["training"]
    cluster.apply(body, namespace)
    wait_phase(cluster, namespace, "held", "Running")

    cluster.kubectl("patch", "finetunepreset", "team", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"defaults":{"training":{"maxSteps":9}}}}')
    # A spec edit makes the operator reconcile the job after the preset changed.
    cluster.kubectl("patch", "ftj", "held", "-n", namespace, "--type=merge", "-p",
                    '{"spec":{"ttlSecondsAfterFinished":3600}}')
    wait_for(lambda: (ftj(cluster, namespace, "held").get("status") or {}).get("observedGeneration") == 2,
             timeout=60, message="the edit of the job observed")
    assert ftj(cluster, namespace, "held")["status"]["preset"]["generation"] == 1
    job_annotations = cluster.get("job", "held-trainer", "-n", namespace)["metadata"]["annotations"]
    assert '"maxSteps": 7' in job_annotations["kubetune.io/preset-defaults"]

    signals.open("held")
    status = wait_phase(cluster, namespace, "held", "Succeeded")
    assert status["progress"]["step"] == 7 and status["preset"]["generation"] == 1
    # A job created now gets the edited preset.
    later = job("later")
    del later["spec"]["training"]
    cluster.apply(later, namespace)
    status = wait_phase(cluster, namespace, "later", "Succeeded")
    assert status["progress"]["step"] == 9 and status["preset"]["generation"] == 2


def test_the_operator_fails_a_job_that_got_past_admission(cluster: Any, namespace: str, operator: Any) -> None:
    # No policy binding selects this namespace: admission lets everything through.
    cluster.apply(preset("team", namespace, limits=LIMITS), namespace)
    cluster.apply(job("bypass", model={"source": "s3://other/tiny/"}, resources={"gpus": 0, "sharedMemory": "64Mi"}),
                  namespace)
    status = wait_phase(cluster, namespace, "bypass", "Failed", reason="PolicyViolation")
    assert "spec.model.source: s3://other/tiny/ is not under limits.allowedModelPrefixes" in status["message"]
    assert "FineTunePreset/team" in status["message"]
    assert status["preset"]["name"] == "team"
    assert cluster.kubectl("get", "job", "bypass-trainer", "-n", namespace, check=False).returncode != 0


RESTRICTED = {"KUBETUNE_RESTRICT_IMAGES_AND_SERVICE_ACCOUNTS": "true"}


@pytest.mark.parametrize("operator_env", [RESTRICTED], ids=["restricted"])
def test_the_operator_refuses_a_chosen_image_no_preset_allows(cluster: Any, namespace: str, operator: Any,
                                                              fake_trainer_env: dict[str, str]) -> None:
    image = fake_trainer_env["KUBETUNE_TRAINER_IMAGE"]  # an image the node can run
    cluster.apply(finetunejob("own-image", image=image), namespace)
    status = wait_phase(cluster, namespace, "own-image", "Failed", reason="PolicyViolation")
    assert status["message"] == "spec.image: a FineTuneJob without a preset cannot choose its image"
    cluster.apply(preset("team", namespace, limits={"allowedImages": [image.rsplit(":", 1)[0] + ":"]}), namespace)
    cluster.apply(job("allowed", image=image), namespace)
    wait_phase(cluster, namespace, "allowed", "Succeeded")


STRICT: dict[str, Any] = {
    "allowedModelPrefixes": ["s3://models/"],
    "allowTrustRemoteCode": False,
    "allowedPriorityClasses": ["batch-low"],
    "allowedWorkloadPriorityClasses": ["normal"],
    "allowedTolerationKeys": ["gpu"],
    "allowedNodeLabels": ["pool=team-a", "zone"],
    "allowedEnv": ["WANDB_*", "HF_TOKEN"],
    "allowedSecrets": ["hf-token"],
    "allowedQueues": ["team-a", "team-a-low"],
}


@pytest.fixture
def strict(cluster: Any, policed: str) -> str:
    """The FineTunePreset "strict" (STRICT limits, default store minio.storage:9000 and queue team-a)
    in the policed namespace, once the API server enforces it."""
    defaults = {"storage": {"endpoint": "minio.storage:9000"}, "scheduling": {"queueName": "team-a"}}
    cluster.apply(preset("strict", policed, limits=STRICT, defaults=defaults), policed)
    refused_at_apply(cluster, policed, strict_job("probe", scheduling={"priorityClassName": "system-cluster-critical"}),
                     "allowedPriorityClasses")
    return policed


def strict_job(name: str, **spec: Any) -> dict[str, Any]:
    return job(name, preset={"kind": "FineTunePreset", "name": "strict"}, **spec)


@pytest.mark.parametrize(("spec", "words"), [
    ({"storage": {"endpoint": "evil.example:9000"}},
     ["spec.storage.endpoint: FineTunePreset/strict limits model or output prefixes"]),
    ({"model": {"source": "s3://models/tiny/", "trustRemoteCode": True}},
     ["spec.model.trustRemoteCode: FineTunePreset/strict allows no remote code"]),
    ({"scheduling": {"priorityClassName": "system-cluster-critical"}},
     ["spec.scheduling.priorityClassName: system-cluster-critical is not in limits.allowedPriorityClasses"]),
    ({"scheduling": {"workloadPriorityClassName": "urgent"}},
     ["spec.scheduling.workloadPriorityClassName: urgent is not in"]),
    ({"scheduling": {"tolerations": [{"operator": "Exists"}]}},
     ["spec.scheduling.tolerations: key (none: every taint) is not in limits.allowedTolerationKeys"]),
    ({"scheduling": {"nodeSelector": {"pool": "team-b"}}},
     ["spec.scheduling.nodeSelector: pool=team-b is not in limits.allowedNodeLabels"]),
    ({"scheduling": {"affinity": {"nodeAffinity": {}}}}, ["spec.scheduling.affinity: FineTunePreset/strict limits"]),
    ({"env": [{"name": "DEBUG", "value": "1"}]}, ["spec.env: DEBUG is not in limits.allowedEnv"]),
    ({"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "other-team", "key": "t"}}}]},
     ["spec: Secret other-team is not in limits.allowedSecrets"]),
    ({"storage": {"secretRef": {"name": "other-team"}}}, ["Secret other-team is not in limits.allowedSecrets"]),
    ({"scheduling": {"queueName": "team-b"}},
     ["spec.scheduling.queueName: team-b is not in limits.allowedQueues", "(team-a, team-a-low)"]),
], ids=["endpoint", "remote-code", "priority-class", "workload-priority", "toleration", "node-label", "affinity",
        "env", "env-secret", "storage-secret", "queue"])
def test_choices_a_preset_limits_are_rejected_at_apply(cluster: Any, strict: str, spec: dict[str, Any],
                                                      words: list[str]) -> None:
    assert_refused(cluster, strict, strict_job("over", **spec), words)


def test_choices_within_a_presets_limits_are_accepted(cluster: Any, strict: str) -> None:
    within = strict_job("within", storage={"endpoint": "minio.storage:9000"},
                        scheduling={"priorityClassName": "batch-low", "workloadPriorityClassName": "normal",
                                    "tolerations": [{"key": "gpu", "operator": "Exists"}],
                                    "nodeSelector": {"pool": "team-a", "zone": "z1"}},
                        env=[{"name": "WANDB_PROJECT", "value": "p"},
                             {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "t"}}}])
    result = apply(cluster, strict, within)
    assert result.returncode == 0, result.stderr
    # an empty queueName does not leave the preset's queue
    assert apply(cluster, strict, strict_job("queued", scheduling={"queueName": ""})).returncode == 0
    # an edit of a limited field that may change (env, scheduling) is checked too
    edit = cluster.kubectl("patch", "ftj", "within", "-n", strict, "--type=merge",
                           "-p", '{"spec":{"env":[{"name":"DEBUG","value":"1"}]}}', check=False)
    assert edit.returncode != 0 and "spec.env: DEBUG is not in limits.allowedEnv" in edit.stderr


def test_a_step_limit_refuses_a_job_that_trains_by_epochs_at_apply(cluster: Any, policed: str) -> None:
    result = apply(cluster, policed, job("by-epochs", training={"epochs": 1}))
    assert result.returncode != 0
    assert "spec.training.maxSteps: required by limits.maxSteps 100 of FineTunePreset/team" in result.stderr


def cluster_preset(cluster: Any, selector: dict[str, Any]) -> str:
    name = f"e2e-bound-{secrets.token_hex(3)}"
    body = preset(name)
    body["spec"]["namespaceSelector"] = selector
    cluster.apply(body)
    return name


def test_a_cluster_preset_is_usable_only_from_the_namespaces_it_selects(cluster: Any, policed: str) -> None:
    # team-a's user names team-b's looser preset: refused, since it does not select team-a's namespace.
    name = cluster_preset(cluster, {"matchLabels": {"kubetune.io/e2e-team": "b"}})
    try:
        body = job("borrowed", preset={"name": name})

        def refused() -> str:
            result = apply(cluster, policed, body)
            assert result.returncode != 0
            return str(result.stderr)

        message = wait_for(refused, timeout=60, message="the cluster preset's namespaceSelector enforced")
        assert f"spec.preset: ClusterFineTunePreset/{name} is not for namespace {policed}" in message
        cluster.kubectl("label", "namespace", policed, "kubetune.io/e2e-team=b")
        assert apply(cluster, policed, body).returncode == 0
    finally:
        cluster.kubectl("delete", "clusterfinetunepreset", name, "--ignore-not-found", check=False)


def test_a_namespace_can_require_a_preset(cluster: Any, policed: str) -> None:
    cluster.kubectl("label", "namespace", policed, "kubetune.io/preset-required=true")
    result = apply(cluster, policed, finetunejob("no-preset"))
    assert result.returncode != 0
    assert f"spec.preset: namespace {policed} requires a preset (label kubetune.io/preset-required=true)" \
        in result.stderr
    assert apply(cluster, policed, job("with-preset")).returncode == 0


def test_the_operator_refuses_a_borrowed_preset_and_a_missing_one(cluster: Any, namespace: str,
                                                                  operator: Any) -> None:
    # No policy binding selects this namespace: the operator is the second line.
    name = cluster_preset(cluster, {"matchExpressions": [{"key": "kubetune.io/e2e-team", "operator": "In",
                                                          "values": ["b"]}]})
    try:
        cluster.apply(finetunejob("borrowed", preset={"name": name}), namespace)
        status = wait_phase(cluster, namespace, "borrowed", "Failed", reason="PolicyViolation")
        assert status["message"] == (f"spec.preset: ClusterFineTunePreset/{name} is not for namespace {namespace} "
                                     "(its spec.namespaceSelector does not select it)")
        cluster.kubectl("label", "namespace", namespace, "kubetune.io/preset-required=true")
        cluster.apply(finetunejob("bare"), namespace)
        status = wait_phase(cluster, namespace, "bare", "Failed", reason="PolicyViolation")
        assert "requires a preset (label kubetune.io/preset-required=true)" in status["message"]
        for job_name in ("borrowed-trainer", "bare-trainer"):
            assert cluster.kubectl("get", "job", job_name, "-n", namespace, check=False).returncode != 0
    finally:
        cluster.kubectl("delete", "clusterfinetunepreset", name, "--ignore-not-found", check=False)
