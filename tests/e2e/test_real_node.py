"""The local cluster's node: kubelet + containerd + CNI, kube-proxy, CoreDNS.

On the session's cluster (one real node per machine). Pods run from a tiny image built here:
Debian's static busybox and the cluster's (static) kubectl in an image ``FROM scratch``
(devcluster/real_node.py builds it with buildah and imports it into the node's containerd;
``imagePullPolicy: Never``). The KubeTune images come from `make images` through the cluster's
loopback registry: the chart, the quickstart and `make demo` run from them. That `down` leaves
nothing of the node behind is checked by the session's teardown (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devcluster import node_cleanup, real_node, seed_demo
from devcluster.demo import chart_values
from tests.support.helpers import REPO, Cluster, devcluster, wait_for
from tests.support.jobs import published

pytestmark = pytest.mark.e2e


IMAGE = "kubetune.local/busybox:test"
# nslookup, wget, httpd, mkdir: cluster DNS and Services between pods. (This busybox's wget cannot
# talk TLS to the apiserver, whose certificate has an ECDSA key, and crashes with -T: kubectl does
# the in-cluster API calls.)
APPLETS = ("sh", "id", "touch", "echo", "sleep", "cat", "head", "tr", "nslookup", "wget", "httpd", "mkdir")
RESTRICTED = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
LOCKED_DOWN = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def busybox_image(workdir: Path, kubectl: Path) -> Path:
    """An image holding /bin/busybox (static), links to a few applets and /bin/kubectl (static: the
    in-cluster API client); its user is root."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bin_dir / "busybox")
    shutil.copy2(kubectl.resolve(), bin_dir / "kubectl")
    for applet in APPLETS:
        (bin_dir / applet).symlink_to("busybox")
    archive: Path = real_node.buildah_image(workdir / "busybox.tar", IMAGE, [(bin_dir, "/bin")],
                                            ["--cmd", '["/bin/sh"]', "--user", "0"])
    return archive


@pytest.fixture(scope="module")
def node_cluster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    """The session's cluster, its node holding the busybox image."""
    if cluster.dir is None:
        pytest.skip("the local cluster's node (USE_EXISTING_CLUSTER)")
    busybox = busybox_image(tmp_path_factory.mktemp("real-node") / "image", cluster.kubectl_path)
    real_node.import_image(real_node.NodePaths(cluster.dir / "data" / "node"), busybox)
    return cluster


@pytest.fixture(scope="module")
def restricted_namespace(node_cluster: Cluster) -> str:
    """A namespace where Pod Security admission enforces the `restricted` profile."""
    node_cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "restricted", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    wait_for(lambda: node_cluster.get("serviceaccount", "default", "-n", "restricted"), 60,
             "the default ServiceAccount of namespace restricted")
    return "restricted"


def pod(name: str, script: str, pod_security: dict[str, Any], container_security: dict[str, Any],
        **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "securityContext": pod_security, "containers": [{
            "name": "main", "image": IMAGE, "imagePullPolicy": "Never", "command": ["sh", "-c", script],
            "securityContext": container_security, **container}]},
    }


def container_state(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    statuses = cluster.get("pod", name, "-n", namespace)["status"].get("containerStatuses") or [{}]
    state: dict[str, Any] = statuses[0].get("state", {})
    return state


def test_node_is_a_kubelet_with_containerd_and_the_stand_in_gpus(node_cluster: Cluster) -> None:
    wide = node_cluster.kubectl("get", "nodes", "-o", "wide").stdout
    [_header, row] = wide.strip().splitlines()
    assert "v1.35.4" in row.split()
    assert any(word.startswith("containerd://") for word in row.split()), wide
    node = node_cluster.get("node", "kubetune-local")
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.35.4"
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions == {"Ready": "True", "MemoryPressure": "False", "DiskPressure": "False",
                          "PIDPressure": "False"}, conditions
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    [internal_ip] = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
    assert internal_ip == real_node.node_ip()


def test_restricted_pod_runs_as_its_user_with_a_read_only_root_and_logs(
        node_cluster: Cluster, restricted_namespace: str) -> None:
    ns = restricted_namespace
    node_cluster.apply(pod("secure", "echo hello from $(id -u); exec sleep 3600",
                           {**RESTRICTED, "runAsUser": 10001}, LOCKED_DOWN), ns)
    wait_for(lambda: "running" in container_state(node_cluster, ns, "secure"), 90, "pod secure to run")

    assert node_cluster.kubectl("exec", "-n", ns, "secure", "--", "id", "-u").stdout.strip() == "10001"
    write = node_cluster.kubectl("exec", "-n", ns, "secure", "--", "touch", "/x", check=False)
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr
    status = node_cluster.kubectl("exec", "-n", ns, "secure", "--", "cat", "/proc/self/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["CapEff"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # filter mode: the runtime's default profile
    logs = wait_for(lambda: node_cluster.kubectl("logs", "-n", ns, "secure").stdout, 30, "logs of pod secure")
    assert logs == "hello from 10001\n"


def test_run_as_non_root_pod_of_a_root_image_is_refused_by_the_kubelet(
        node_cluster: Cluster, restricted_namespace: str) -> None:
    ns = restricted_namespace
    node_cluster.apply(pod("rootimage", "exec sleep 3600", RESTRICTED, LOCKED_DOWN), ns)

    waiting = wait_for(lambda: container_state(node_cluster, ns, "rootimage").get("waiting", {}).get("message")
                       and container_state(node_cluster, ns, "rootimage")["waiting"], 90,
                       "the kubelet to refuse pod rootimage")
    assert waiting["reason"] == "CreateContainerConfigError"
    assert "container has runAsNonRoot and image will run as root" in waiting["message"]


def test_memory_limit_is_enforced(node_cluster: Cluster, restricted_namespace: str) -> None:
    ns = restricted_namespace
    # 200 MiB in a shell variable, under a 32 MiB limit.
    node_cluster.apply(pod("hog", "x=$(head -c 209715200 /dev/zero | tr '\\0' a); echo survived",
                           {**RESTRICTED, "runAsUser": 10001}, LOCKED_DOWN,
                           resources={"limits": {"memory": "32Mi", "cpu": "500m"}}), ns)

    terminated = wait_for(lambda: container_state(node_cluster, ns, "hog").get("terminated"), 120,
                          "pod hog to end")
    assert terminated["reason"] == "OOMKilled", terminated


@pytest.fixture(scope="module")
def network_namespace(node_cluster: Cluster) -> str:
    """A namespace with a long-running client pod (busybox, root) for the Service and DNS tests."""
    ns = "net"
    node_cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    wait_for(lambda: node_cluster.get("serviceaccount", "default", "-n", ns), 60, f"the default ServiceAccount of {ns}")
    node_cluster.apply(pod("client", "exec sleep 3600", {}, {}), ns)
    wait_for(lambda: "running" in container_state(node_cluster, ns, "client"), 90, "pod client to run")
    return ns


def in_client(cluster: Cluster, namespace: str, script: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("exec", "-n", namespace, "client", "--", "sh", "-c", script, check=False, timeout=60)


def addresses(nslookup: str) -> list[str]:
    """The answers in busybox nslookup's output (the lines after `Name:`, not the server's)."""
    answers = nslookup.split("Name:", 1)[1] if "Name:" in nslookup else ""
    return [line.split(":", 1)[1].strip() for line in answers.splitlines() if line.startswith("Address:")]


def test_killed_kubelet_is_restarted_by_up_and_its_running_pod_lives_on(
        node_cluster: Cluster, restricted_namespace: str) -> None:
    """The kubelet dies (SIGKILL): `up` restarts it alone. The pod's container lives on in its shim
    and the new kubelet adopts it (same container, not restarted); the node runs new pods."""
    assert node_cluster.dir is not None
    ns = restricted_namespace
    node_cluster.apply(pod("survivor", "exec sleep 3600", {**RESTRICTED, "runAsUser": 10001}, LOCKED_DOWN), ns)
    wait_for(lambda: "running" in container_state(node_cluster, ns, "survivor"), 90, "pod survivor to run")
    [before] = node_cluster.get("pod", "survivor", "-n", ns)["status"]["containerStatuses"]
    processes = json.loads((node_cluster.dir / "cluster.json").read_text())["processes"]
    [kubelet] = [p["pid"] for p in processes if p["name"] == "kubelet"]
    sleepers = node_cleanup.pod_pids()

    os.kill(kubelet, signal.SIGKILL)
    up = devcluster("up", "--dir", str(node_cluster.dir), timeout=300)
    assert up.returncode == 0 and "restarting kubelet" in up.stderr, up.stderr[-3000:]

    processes = json.loads((node_cluster.dir / "cluster.json").read_text())["processes"]
    assert [p["pid"] for p in processes if p["name"] == "kubelet"] != [kubelet]
    assert sleepers <= node_cleanup.pod_pids()  # no pod process was stopped
    [after] = node_cluster.get("pod", "survivor", "-n", ns)["status"]["containerStatuses"]
    assert after["containerID"] == before["containerID"] and after["restartCount"] == 0 and "running" in after["state"]
    assert node_cluster.get("node", "kubetune-local")["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    node_cluster.apply(pod("newcomer", "echo ran", {**RESTRICTED, "runAsUser": 10001}, LOCKED_DOWN), ns)
    wait_for(lambda: "terminated" in container_state(node_cluster, ns, "newcomer"), 90, "pod newcomer to run")
    assert container_state(node_cluster, ns, "newcomer")["terminated"]["exitCode"] == 0


def test_pod_resolves_the_kubernetes_service_and_reaches_the_apiserver_through_it(
        node_cluster: Cluster, network_namespace: str) -> None:
    ns = network_namespace
    # The apiserver's lease endpoint reconciler keeps the Service's endpoint at the node address.
    [slice_] = node_cluster.get("endpointslices", "-n", "default", "-l",
                                "kubernetes.io/service-name=kubernetes")["items"]
    assert [e["addresses"] for e in slice_["endpoints"]] == [[real_node.node_ip()]]
    resolv = in_client(node_cluster, ns, "cat /etc/resolv.conf").stdout
    assert "nameserver 10.0.0.10" in resolv.splitlines(), resolv
    assert f"search {ns}.svc.cluster.local svc.cluster.local cluster.local" in resolv.splitlines(), resolv

    def resolved() -> list[str]:
        return addresses(in_client(node_cluster, ns, "nslookup kubernetes.default.svc.cluster.local").stdout)

    assert wait_for(resolved, 60, "kubernetes.default.svc.cluster.local to resolve in pod client") == ["10.0.0.1"]
    env = in_client(node_cluster, ns, "echo $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT").stdout.strip()
    assert env == "10.0.0.1:443"

    # kubectl's in-cluster configuration: KUBERNETES_SERVICE_HOST, the service-account token and CA
    # (the serving certificate names 10.0.0.1).
    def version() -> dict[str, Any] | None:
        out = in_client(node_cluster, ns, "kubectl get --raw /version")
        return json.loads(out.stdout) if out.returncode == 0 else None

    assert wait_for(version, 60, "the apiserver through the kubernetes Service")["gitVersion"] == "v1.35.4"
    # By its DNS name, the certificate verified against the cluster CA, as the pod's service account.
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    whoami = in_client(node_cluster, ns, f"kubectl --server=https://kubernetes.default.svc.cluster.local "
                       f"--certificate-authority={sa}/ca.crt --token=$(cat {sa}/token) auth whoami -o json")
    assert whoami.returncode == 0, whoami.stderr
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:default"
    # Nothing is forwarded out of the machine: other names do not resolve.
    outside = in_client(node_cluster, ns, "nslookup example.com")
    assert not addresses(outside.stdout), outside.stdout


def test_pod_reaches_another_pod_through_a_cluster_ip_service_by_its_dns_name(
        node_cluster: Cluster, network_namespace: str) -> None:
    ns = network_namespace
    web = pod("web", "mkdir -p /www && echo hello from web > /www/index.html && exec httpd -f -p 8080 -h /www",
              {}, {})
    web["metadata"]["labels"] = {"app": "web"}
    node_cluster.apply([web, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                              "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}], ns)
    wait_for(lambda: "running" in container_state(node_cluster, ns, "web"), 90, "pod web to run")
    cluster_ip = node_cluster.get("service", "web", "-n", ns)["spec"]["clusterIP"]

    def fetched() -> str | None:
        out = in_client(node_cluster, ns, f"wget -q -O - http://web.{ns}.svc.cluster.local/")
        return out.stdout if out.returncode == 0 else None

    assert wait_for(fetched, 90, "pod web through its Service, by name") == "hello from web\n"
    lookup = in_client(node_cluster, ns, f"nslookup web.{ns}.svc.cluster.local").stdout
    assert addresses(lookup) == [cluster_ip], lookup
    # The short name through the search list; and a pod reaching itself through its own Service
    # (hairpin; not by the short name, which its /etc/hosts maps to its own address).
    assert in_client(node_cluster, ns, "wget -q -O - http://web/").stdout == "hello from web\n"
    hairpin = node_cluster.kubectl("exec", "-n", ns, "web", "--", "wget", "-q", "-O", "-",
                                   f"http://web.{ns}.svc.cluster.local/", check=False, timeout=60)
    assert hairpin.stdout == "hello from web\n", hairpin.stderr


def test_chart_and_quickstart_run_from_the_images_on_the_real_node(
    node_cluster: Cluster, cluster_images: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart installed with both images from the loopback registry, its operator a pod in a
    `restricted` namespace; examples/quickstart.yaml trained by the REAL trainer in its image, in a
    `restricted` namespace, reporting to the operator through the chart's Service DNS name and
    reading and writing MinIO at the node's address; a verified adapter at the end."""
    assert node_cluster.dir is not None
    state = json.loads((node_cluster.dir / "cluster.json").read_text())
    minio = dict(line.split("=", 1) for line in (node_cluster.dir / "minio.env").read_text().split())
    seed_demo.seed(minio["MINIO_ENDPOINT"], minio["MINIO_ACCESS_KEY"], minio["MINIO_SECRET_KEY"],
                   seed_demo.build_assets(tmp_path / "assets"))
    namespace, system = "quickstart", "kubetune-system"
    for name in (namespace, system):
        node_cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
        wait_for(lambda name=name: node_cluster.get("serviceaccount", "default", "-n", name), 60,
                 f"the default ServiceAccount of {name}")
    node_cluster.kubectl("create", "secret", "generic", "kubetune-s3", "-n", namespace,
                         f"--from-literal=AWS_ACCESS_KEY_ID={minio['MINIO_ACCESS_KEY']}",
                         f"--from-literal=AWS_SECRET_ACCESS_KEY={minio['MINIO_SECRET_KEY']}")
    node_cluster.helm(
        "install", "kubetune", str(REPO / "helm" / "kubetune"), "-n", system, "--wait", "--timeout", "300s",
        *chart_values(cluster_images, state["node_ip"], minio["MINIO_ENDPOINT"]),
        "--set", "reports.statusIntervalSeconds=1", timeout=420,
    )
    try:
        [operator_pod] = node_cluster.get("pods", "-n", system, "-l", "app.kubernetes.io/name=kubetune")["items"]
        assert operator_pod["spec"]["containers"][0]["image"] == cluster_images["operator"]
        operator_uid = node_cluster.kubectl("exec", "-n", system, operator_pod["metadata"]["name"], "--",
                                            "id", "-u").stdout.strip()
        assert operator_uid == "65532"
        node_cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "quickstart.yaml"))

        def running_pod() -> dict[str, Any] | None:
            ftj_status = node_cluster.get("ftj", "quickstart", "-n", namespace).get("status") or {}
            assert ftj_status.get("phase") not in ("Failed", "Succeeded"), ftj_status
            pods = node_cluster.get("pods", "-n", namespace, "-l",
                                    "batch.kubernetes.io/job-name=quickstart-trainer")["items"]
            if pods and pods[0]["status"].get("phase") == "Running" and (ftj_status.get("progress") or {}).get("step"):
                found: dict[str, Any] = pods[0]
                return found
            return None

        # Pulling and unpacking the trainer image (several GB) dominates the wait. Progress in the
        # status means a report reached the operator pod through its Service's DNS name.
        pod_object = wait_for(running_pod, timeout=900, interval=0.5, message="the trainer pod running and reporting")
        name = pod_object["metadata"]["name"]
        container = pod_object["spec"]["containers"][0]
        assert container["image"] == cluster_images["trainer"]
        report_url = {e["name"]: e.get("value") for e in container["env"]}["KUBETUNE_REPORT_URL"]
        assert report_url.startswith(f"http://kubetune.{system}.svc:8081/"), report_url
        exec_id = node_cluster.kubectl("exec", "-n", namespace, name, "--", "id", "-u").stdout.strip()
        assert exec_id == "10001"
        denied = node_cluster.kubectl("exec", "-n", namespace, name, "--", "touch", "/x", check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        status = wait_for(lambda: (s := node_cluster.get("ftj", "quickstart", "-n", namespace).get("status") or {})
                          .get("phase") in ("Succeeded", "Failed") and s, timeout=900, interval=1,
                          message="the quickstart to end")
        assert status["phase"] == "Succeeded", status
        logs = node_cluster.kubectl("logs", "-n", namespace, "job/quickstart-trainer").stdout
        assert "published" in logs, logs[-2000:]
        assert status["progress"]["percent"] == 100 and status["attempts"] == 1
        published(status, minio, monkeypatch)
    finally:
        node_cluster.helm("uninstall", "kubetune", "-n", system, "--wait", check=False)


def test_make_demo_trains_the_quickstart_from_the_images_on_the_real_node(
        node_cluster: Cluster, cluster_images: dict[str, str]) -> None:
    """`make demo` (python -m devcluster.demo up) on the session's cluster: the images built and
    pushed, the chart installed from them, the quickstart followed live to a published adapter."""
    assert node_cluster.dir is not None
    demo = subprocess.run([sys.executable, "-m", "devcluster.demo", "up", "--dir", str(node_cluster.dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    try:
        assert demo.returncode == 0, (demo.stdout[-3000:], demo.stderr[-3000:])
        # The trainer pod's image, from the loopback registry.
        assert re.search(rf"{re.escape(cluster_images['trainer'])}\s+Succeeded", demo.stdout), demo.stdout[-3000:]
        assert "containerd://" in demo.stdout  # the node, shown wide
        assert '"phase": "Succeeded"' in demo.stdout
        assert "Running (Training)" in demo.stdout and "step 300/300 (100%)" in demo.stdout, \
            "kubetune watch's lines (not a terminal)"
        assert "Is the fine-tuned model better?" in demo.stdout and re.search(r"exactMatch\s+[\d.]+\s+[\d.]+",
                                                                               demo.stdout), demo.stdout[-3000:]
        assert re.search(r"verified \d+ files .* against manifest\.json", demo.stdout), demo.stdout[-3000:]
        assert (node_cluster.dir / "demo" / "quickstart" / "adapter" / "adapter_model.safetensors").is_file()
        [operator_pod] = node_cluster.get("pods", "-n", "kubetune-system", "-l",
                                          "app.kubernetes.io/name=kubetune")["items"]
        assert operator_pod["spec"]["containers"][0]["image"] == cluster_images["operator"]
        status = node_cluster.get("ftj", "quickstart", "-n", "default")["status"]
        assert status["phase"] == "Succeeded" and status["artifacts"]["adapter"], status
    finally:
        node_cluster.helm("uninstall", "kubetune", "-n", "kubetune-system", "--wait", check=False)
