"""The local development cluster behaves like a real one for what KubeTune needs.

Real kube-apiserver, controller-manager and scheduler; pods run by the session cluster's node, a
kubelet with containerd, from the operator image (Python and the kubernetes client) in the
cluster's registry. The node's own tests (securityContext, networking, limits, `down`) are in
test_real_node.py.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import Cluster, wait_for

pytestmark = pytest.mark.e2e

@pytest.fixture
def python_image(cluster_images: dict[str, str]) -> str:
    """An image with Python and the kubernetes client: the operator image from the cluster's registry."""
    return cluster_images["operator"]


def job(image: str, name: str, script: str, *, backoff_limit: int = 0, **pod_spec: Any) -> dict[str, Any]:
    """A batch/v1 Job running ``python -c script`` once."""
    container = {"name": "main", "image": image, "command": ["python", "-c", script]}
    container.update(pod_spec.pop("container", {}))
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "template": {
            "spec": {"restartPolicy": "Never", "containers": [container], **pod_spec}}},
    }


def job_condition(cluster: Cluster, namespace: str, name: str) -> str | None:
    """The job's terminal condition type (Complete or Failed) once it has one."""
    status = cluster.get("job", name, "-n", namespace).get("status", {})
    done = [c["type"] for c in status.get("conditions", [])
            if c["type"] in ("Complete", "Failed") and c["status"] == "True"]
    return done[0] if done else None


def job_pods(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = cluster.get("pods", "-n", namespace, "-l", f"job-name={name}")["items"]
    return pods


def terminated_state(pod: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return state


def test_gpu_job_with_configmap_secret_and_termination_message_completes(
        cluster: Cluster, namespace: str, python_image: str) -> None:
    cluster.apply([
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "greeting"},
         "data": {"message.txt": "hello"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "credentials"},
         "stringData": {"token": "s3cr3t"}},
    ], namespace)
    script = (
        "import os\n"
        "greeting = open('/etc/greeting/message.txt').read()\n"
        "token = open('/etc/credentials/token').read()\n"
        "assert os.environ['TOKEN'] == token, 'env from secretKeyRef differs from the mounted secret'\n"
        "open('/dev/termination-log', 'w').write(f'{greeting} {token}')\n"
    )
    cluster.apply(job(
        python_image, "gpu", script,
        container={
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "credentials", "key": "token"}}}],
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "volumeMounts": [{"name": "greeting", "mountPath": "/etc/greeting"},
                             {"name": "credentials", "mountPath": "/etc/credentials", "readOnly": True}],
        },
        volumes=[{"name": "greeting", "configMap": {"name": "greeting"}},
                 {"name": "credentials", "secret": {"secretName": "credentials"}}],
    ), namespace)

    assert wait_for(lambda: job_condition(cluster, namespace, "gpu"), 90, "job gpu to finish") == "Complete"
    [pod] = job_pods(cluster, namespace, "gpu")
    terminated = terminated_state(pod)
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == "hello s3cr3t"
    assert pod["status"]["phase"] == "Succeeded"


def test_pod_authenticates_with_its_projected_service_account_token(
        cluster: Cluster, namespace: str, python_image: str) -> None:
    script = (
        "from kubernetes import client, config\n"
        "config.load_incluster_config()\n"
        "review = client.AuthenticationV1Api().create_self_subject_review("
        "{'apiVersion': 'authentication.k8s.io/v1', 'kind': 'SelfSubjectReview'})\n"
        "open('/dev/termination-log', 'w').write(review.status.user_info.username)\n"
    )
    cluster.apply(job(python_image, "whoami", script), namespace)

    assert wait_for(lambda: job_condition(cluster, namespace, "whoami"), 90, "job whoami") == "Complete"
    [pod] = job_pods(cluster, namespace, "whoami")
    assert terminated_state(pod)["message"] == f"system:serviceaccount:{namespace}:default"


def test_failing_job_fails_after_backoff_limit_retries(cluster: Cluster, namespace: str, python_image: str) -> None:
    cluster.apply(job(python_image, "exit3", "raise SystemExit(3)", backoff_limit=1), namespace)

    assert wait_for(lambda: job_condition(cluster, namespace, "exit3"), 120, "job exit3 to fail") == "Failed"
    pods = job_pods(cluster, namespace, "exit3")
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        assert terminated_state(pod)["exitCode"] == 3
        assert terminated_state(pod)["reason"] == "Error"


def test_kubectl_logs_shows_what_the_container_printed(cluster: Cluster, namespace: str, python_image: str) -> None:
    cluster.apply(job(python_image, "chatty", "print('epoch 1 loss 2.5'); print('epoch 2 loss 1.9')"), namespace)
    assert wait_for(lambda: job_condition(cluster, namespace, "chatty"), 60, "job chatty") == "Complete"

    logs = cluster.kubectl("logs", "job/chatty", "-n", namespace).stdout
    assert logs == "epoch 1 loss 2.5\nepoch 2 loss 1.9\n"
    assert cluster.kubectl("logs", "job/chatty", "-n", namespace, "--tail=1").stdout == "epoch 2 loss 1.9\n"


def test_pod_requesting_more_gpus_than_the_node_has_is_unschedulable(
        cluster: Cluster, namespace: str, python_image: str) -> None:
    gpus = int(cluster.get("node", "kubetune-local")["status"]["allocatable"]["nvidia.com/gpu"])
    cluster.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "greedy"},
        "spec": {"containers": [{"name": "main", "image": python_image, "command": ["true"],
                                 "resources": {"limits": {"nvidia.com/gpu": gpus + 1}}}]},
    }, namespace)

    def scheduled_condition() -> dict[str, Any] | None:
        conditions = cluster.get("pod", "greedy", "-n", namespace).get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "PodScheduled"), None)

    condition = wait_for(scheduled_condition, 60, "the scheduler's verdict on pod greedy")
    assert condition["status"] == "False"
    assert condition["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in condition["message"]
    assert cluster.get("pod", "greedy", "-n", namespace)["status"]["phase"] == "Pending"


@pytest.mark.parametrize("propagation", ["background", "foreground"])
def test_deleting_a_running_job_stops_its_process_with_sigterm(
    cluster: Cluster, namespace: str, python_image: str, tmp_path: Path, propagation: str
) -> None:
    script = (
        "import os, signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    open('/out/sigterm', 'w').write('received')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "open('/out/started', 'w').close()\n"
        "while True:\n"
        "    time.sleep(0.1)\n"
    )
    grace_s = 20
    cluster.apply(job(
        python_image, "sleeper", script, terminationGracePeriodSeconds=grace_s,
        container={"volumeMounts": [{"name": "out", "mountPath": "/out"}]},
        volumes=[{"name": "out", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
    ), namespace)
    tmp_path.chmod(0o777)  # writable by the image's user
    wait_for(lambda: (tmp_path / "started").exists(), 90, "the job's process to start")

    deleted_at = time.monotonic()
    cluster.kubectl("delete", "job", "sleeper", "-n", namespace, f"--cascade={propagation}", "--wait=false")

    wait_for(lambda: (tmp_path / "sigterm").exists(), grace_s, "SIGTERM to reach the process")
    # The pod object goes once the node reports its container stopped: the process exited on
    # SIGTERM, before the grace period ran out (and a SIGKILL).
    wait_for(lambda: not job_pods(cluster, namespace, "sleeper"), grace_s, "the pod to be deleted")
    assert time.monotonic() - deleted_at < grace_s


def test_minio_stores_and_returns_an_object(minio_env: dict[str, str]) -> None:
    import io

    from minio import Minio

    client = Minio(minio_env["MINIO_ENDPOINT"], access_key=minio_env["MINIO_ACCESS_KEY"],
                   secret_key=minio_env["MINIO_SECRET_KEY"], secure=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    payload = b"adapter weights"
    client.put_object(bucket, "run/adapter.bin", io.BytesIO(payload), len(payload))

    response = client.get_object(bucket, "run/adapter.bin")
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()


def test_pvc_of_the_default_storage_class_keeps_data_between_pods(
        cluster: Cluster, namespace: str, python_image: str) -> None:
    cluster.apply({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }, namespace)
    mount: dict[str, Any] = {"container": {"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
             "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}
    cluster.apply(job(python_image, "writer", "open('/data/out.txt', 'w').write('persisted')", **mount), namespace)
    assert wait_for(lambda: job_condition(cluster, namespace, "writer"), 90, "job writer") == "Complete"

    reader = "open('/dev/termination-log', 'w').write(open('/data/out.txt').read())"
    cluster.apply(job(python_image, "reader", reader, **mount), namespace)

    assert wait_for(lambda: job_condition(cluster, namespace, "reader"), 90, "job reader") == "Complete"
    [pod] = job_pods(cluster, namespace, "reader")
    assert terminated_state(pod)["message"] == "persisted"
    assert cluster.get("pvc", "data", "-n", namespace)["status"]["phase"] == "Bound"


def test_pod_sees_its_hostname_downward_api_projected_and_memory_backed_volumes(
    cluster: Cluster, namespace: str, python_image: str
) -> None:
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                   "data": {"MODE": "lora", "nested.txt": "inner"}}, namespace)
    script = (
        "import json, os, socket\n"
        "mounts = open('/proc/self/mounts').read().splitlines()\n"
        "report = {\n"
        "  'hostname': socket.gethostname(),\n"
        "  'resolves': socket.gethostbyname(socket.gethostname()),\n"
        "  'cwd': os.getcwd(),\n"
        "  'mode': os.environ['MODE'],\n"
        "  'expanded': os.environ['GREETING'],\n"
        "  'namespace': os.environ['POD_NAMESPACE'],\n"
        "  'labels': open('/etc/podinfo/labels').read(),\n"
        "  'projected_ns': open('/etc/projected/namespace').read(),\n"
        "  'projected_cm': open('/etc/projected/settings/nested').read(),\n"
        "  'sub_path': open('/etc/nested.txt').read(),\n"
        "  'scratch': [m.split()[2] for m in mounts if m.split()[1] == '/scratch'],\n"
        "}\n"
        "open('/dev/termination-log', 'w').write(json.dumps(report))\n"
    )
    cluster.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "inspect", "labels": {"app": "inspect"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": python_image, "command": ["python", "-c", script],
                "workingDir": "/scratch",
                "envFrom": [{"configMapRef": {"name": "settings"}}],
                "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "GREETING", "value": "mode=$(MODE)"}],
                "volumeMounts": [
                    {"name": "podinfo", "mountPath": "/etc/podinfo"},
                    {"name": "projected", "mountPath": "/etc/projected"},
                    {"name": "settings", "mountPath": "/etc/nested.txt", "subPath": "nested.txt"},
                    {"name": "scratch", "mountPath": "/scratch"},
                ],
            }],
            "volumes": [
                {"name": "podinfo", "downwardAPI": {"items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                {"name": "projected", "projected": {"sources": [
                    {"downwardAPI": {"items": [{"path": "namespace",
                                                "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
                    {"configMap": {"name": "settings", "items": [{"key": "nested.txt", "path": "settings/nested"}]}},
                ]}},
                {"name": "settings", "configMap": {"name": "settings"}},
                {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            ],
        },
    }, namespace)

    pod = wait_for(lambda: (p := cluster.get("pod", "inspect", "-n", namespace))["status"].get("phase")
                   in ("Succeeded", "Failed") and p, 60, "pod inspect to finish")
    report = json.loads(terminated_state(pod)["message"])
    # Its own name resolves to its address on the pod network.
    assert report == {
        "hostname": "inspect", "resolves": pod["status"]["podIP"],
        "cwd": "/scratch", "mode": "lora", "expanded": "mode=lora", "namespace": namespace,
        "labels": 'app="inspect"', "projected_ns": namespace, "projected_cm": "inner",
        "sub_path": "inner", "scratch": ["tmpfs"],
    }


def test_on_failure_pod_restarts_its_container_until_it_succeeds(
        cluster: Cluster, namespace: str, python_image: str) -> None:
    script = (
        "import os\n"
        "if not os.path.exists('/state/failed-once'):\n"
        "    open('/state/failed-once', 'w').close()\n"
        "    raise SystemExit(1)\n"
    )
    cluster.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "flaky"},
        "spec": {"restartPolicy": "OnFailure",
                 "containers": [{"name": "main", "image": python_image, "command": ["python", "-c", script],
                                 "volumeMounts": [{"name": "state", "mountPath": "/state"}]}],
                 "volumes": [{"name": "state", "emptyDir": {}}]},
    }, namespace)

    pod = wait_for(lambda: (p := cluster.get("pod", "flaky", "-n", namespace))["status"].get("phase")
                   == "Succeeded" and p, 60, "pod flaky to succeed")
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1 and status["state"]["terminated"]["exitCode"] == 0
    # The failed first run, while the kubelet still holds its container (its garbage collection may
    # already have removed it).
    previous = status["lastState"].get("terminated")
    assert previous is None or previous["exitCode"] == 1, previous


def test_pod_past_its_active_deadline_is_stopped_and_fails(cluster: Cluster, namespace: str, python_image: str) -> None:
    cluster.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "slow"},
        "spec": {"restartPolicy": "Never", "activeDeadlineSeconds": 2, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "main", "image": python_image, "command": [
                     "python", "-c", "import signal, sys, time\n"
                     "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\ntime.sleep(3600)"]}]},
    }, namespace)

    pod = wait_for(lambda: (p := cluster.get("pod", "slow", "-n", namespace))["status"].get("phase")
                   == "Failed" and p, 60, "pod slow to fail")
    assert pod["status"]["reason"] == "DeadlineExceeded"
    assert terminated_state(pod)["exitCode"] == 143  # SIGTERM
