"""Operator benchmarks on the local cluster (figures printed, recorded in docs/benchmarks.md).

    python -m hack.bench_operator [--dir .kubetune] [--sizes 50,200,1000] [--lifecycle-sizes 50,200]
                                  [--report-seconds 60] [--idle-seconds 60] [--peer auto|off]

Every series runs in a namespace of its own, on a quiet cluster: the previous series has settled
and its namespace is gone (the finished lifecycle jobs stay until the end, as history does). N
objects are "created at once" by 8 client threads; each latency runs from that object's own create
request until a watch shows the result.

    floor           N ConfigMaps → each seen on a watch: the API server's own create → watch trip
    job-controller  N plain Jobs whose pods cannot schedule → each Job's Pod seen: the Kubernetes
                    Job controller (Job → Pod), the peer inside Kubernetes
    operator        N FineTuneJobs whose pods cannot schedule (a nodeSelector no node has) → each
                    Job seen: the operator's own work
    peer            N PyTorchJobs → each Pod seen: Kubeflow training-operator v1.8.1, built from
                    its Go module by hack/build-peer.sh (--peer off skips it)
    lifecycle       N FineTuneJobs run by the TEST DOUBLE trainer (tests/e2e/fake_trainer.py) →
                    Job seen, and Job Complete → FineTuneJob Succeeded
    report          one job held running gets a progress report every 0.5 s: report → status,
                    and status writes per running job per minute

Also measured: operator RSS and CPU seconds (with the largest series' jobs and the finished
lifecycle jobs present, and after all are deleted), writes to idle FineTuneJobs (their status does
not change), and API requests per FineTuneJob: the operator's own client (its
kubetune_api_requests_total) plus kopf's (the API server's PATCH count on finetunejobs).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from devcluster import images
from hack.bench_support import (
    Api,
    Operator,
    Results,
    per_job,
    request_counts,
    requests_since,
)
from tests.support.helpers import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]

NOWHERE = {"kubetune.io/bench": "no-such-node"}  # a nodeSelector no node has: pods stay Pending
Json = dict[str, Any]


def finetunejob(name: str, *, env: list[Json] | None = None, pending: bool = False) -> Json:
    spec: Json = {"model": {"source": "s3://m/tiny/"}, "dataset": {"train": "s3://d/train.jsonl"},
                  "training": {"maxSteps": 10}, "output": {"location": "s3://runs/"},
                  "resources": {"gpus": 0, "sharedMemory": "16Mi"}, "backoffLimit": 0, "env": env or []}
    if pending:
        spec["scheduling"] = {"nodeSelector": NOWHERE}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def plain_job(name: str) -> Json:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never", "nodeSelector": NOWHERE,
                "containers": [{"name": "main", "image": "bench/none", "command": ["true"]}]}}}}


def pytorch_job(name: str) -> Json:
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "Never", "template": {
                "spec": {"nodeSelector": NOWHERE,
                         "containers": [{"name": "pytorch", "image": "bench/none", "command": ["true"]}]}}}}}}


def is_complete(job: Json) -> bool:
    return any(c.get("type") == "Complete" and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


class Bench:
    def __init__(self, state: Path, results: Results) -> None:
        self.state = state
        self.env = {**os.environ, "KUBECONFIG": str(state / "kubeconfig")}
        self.api = Api(state / "kubeconfig")
        self.results = results
        self.prefix = f"bench-{secrets.token_hex(2)}"
        self.namespaces: list[str] = []
        self.operator: Operator | None = None

    # --- namespaces -------------------------------------------------------------------------------

    def namespace(self, series: str, size: int) -> str:
        name = f"{self.prefix}-{series}-{size}"
        self.api.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        wait_for(lambda: self._has_service_account(name), 30, f"the default ServiceAccount of {name}")
        self.namespaces.append(name)
        return name

    def _has_service_account(self, namespace: str) -> bool:
        items = self.api.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts")["items"]
        return any(sa["metadata"]["name"] == "default" for sa in items)

    def remove(self, namespace: str, timeout: float = 600) -> None:
        """Delete a series' FineTuneJobs (while the operator still serves the namespace and can
        release its finalizer), then the namespace, and wait until it is gone: the next series starts
        on a quiet cluster."""
        ftjs = f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs"
        self.api.request("DELETE", ftjs)
        wait_for(lambda: not self.api.request("GET", ftjs)["items"], timeout,
                   f"the FineTuneJobs of {namespace} to be deleted")
        self.api.request("DELETE", f"/api/v1/namespaces/{namespace}")

        def gone() -> bool:
            names = [n["metadata"]["name"] for n in self.api.request("GET", "/api/v1/namespaces")["items"]]
            return namespace not in names

        wait_for(gone, timeout, f"namespace {namespace} to be deleted")
        self.namespaces.remove(namespace)

    def quiet(self, seen: dict[str, float], seconds: float = 3.0, timeout: float = 300) -> None:
        """Wait until no watched event arrived for `seconds` (`seen` holds the last event time)."""
        wait_for(lambda: time.monotonic() - seen["last"] > seconds, timeout, "the series to settle")

    # --- series -----------------------------------------------------------------------------------

    def floor(self, size: int) -> None:
        ns = self.namespace("floor", size)
        seen: dict[str, float] = {}
        stop = threading.Event()
        self.api.watch(f"/api/v1/namespaces/{ns}/configmaps",
                       lambda t, kind, obj: seen.setdefault(obj["metadata"]["name"], t) if kind == "ADDED" else None,
                       stop)
        bodies = [{"metadata": {"name": f"cm-{i:04d}"}, "data": {"k": "v"}} for i in range(size)]
        sent = self.api.create_all(f"/api/v1/namespaces/{ns}/configmaps", bodies)
        wait_for(lambda: all(n in seen for n in sent), 300, "every ConfigMap on the watch")
        stop.set()
        self.results.add("floor", size, "ConfigMap create → seen on a watch", (seen[n] - sent[n] for n in sent))
        self.remove(ns)

    def job_controller(self, size: int) -> None:
        ns = self.namespace("jobctl", size)
        pods: dict[str, float] = {}
        stop = threading.Event()

        def on_pod(t: float, kind: str, pod: Json) -> None:
            job = (pod["metadata"].get("labels") or {}).get("job-name")
            if kind == "ADDED" and job:
                pods.setdefault(job, t)

        self.api.watch(f"/api/v1/namespaces/{ns}/pods", on_pod, stop)
        sent = self.api.create_all(f"/apis/batch/v1/namespaces/{ns}/jobs",
                                   [plain_job(f"job-{i:04d}") for i in range(size)])
        wait_for(lambda: all(n in pods for n in sent), 600, "a Pod of every Job")
        stop.set()
        self.results.add("job-controller", size, "Job create → its Pod seen", (pods[n] - sent[n] for n in sent))
        self.remove(ns)

    def peer(self, size: int, binary: Path) -> None:
        """Kubeflow training-operator v1.8.1 as built by hack/build-peer.sh (its header says how it
        runs outside a cluster: a cert Secret to fill and a self-signed pair for its webhook server,
        which nothing calls). Same worker count as KubeTune's operator; its client keeps its own
        default rate limit (20 requests/s, burst 30), which v1.8.1 has no flag for."""
        self.run_kubectl("apply", "--server-side", "--force-conflicts", "-f",
                         str(binary.parent / "kubeflow.org_pytorchjobs.yaml"))
        ns = self.namespace("peer", size)
        self.api.request("POST", f"/api/v1/namespaces/{ns}/secrets",
                         {"metadata": {"name": "training-operator-webhook-cert"}})
        self_signed_pair(Path("/tmp/k8s-webhook-server/serving-certs"))
        pods: dict[str, float] = {}
        stop = threading.Event()

        def on_pod(t: float, kind: str, pod: Json) -> None:
            job = (pod["metadata"].get("labels") or {}).get("training.kubeflow.org/job-name")
            if kind == "ADDED" and job:
                pods.setdefault(job, t)

        health = free_port()
        process = subprocess.Popen(
            [str(binary), f"--kubeconfig={self.state / 'kubeconfig'}", "--enable-scheme=pytorchjob",
             f"--metrics-bind-address=127.0.0.1:{free_port()}", f"--health-probe-bind-address=127.0.0.1:{health}",
             f"--webhook-server-port={free_port()}", "--controller-threads=16"],
            env={**self.env, "MY_POD_NAMESPACE": ns}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: self._ready(f"http://127.0.0.1:{health}/readyz"), 120, "training-operator readiness")
            self.api.watch(f"/api/v1/namespaces/{ns}/pods", on_pod, stop)
            sent = self.api.create_all(f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs",
                                       [pytorch_job(f"pt-{i:04d}") for i in range(size)])
            wait_for(lambda: all(n in pods for n in sent), 900, "a Pod of every PyTorchJob")
            self.results.add("peer: training-operator", size, "PyTorchJob create → its Pod seen",
                             (pods[n] - sent[n] for n in sent))
            self.api.request("DELETE", f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs")
            self.remove(ns)
        finally:
            stop.set()
            process.terminate()  # v1.8.1 panics on its way out ("close of closed channel"): exit code ignored
            process.wait(timeout=30)

    @staticmethod
    def _ready(url: str) -> bool:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return True
        except OSError:
            return False

    def operator_series(self, size: int, *, idle_seconds: float, keep: bool = False) -> None:
        """FineTuneJobs whose pods never schedule: apply → Job is the operator's own work."""
        assert self.operator is not None
        ns = self.namespace("operator", size)
        jobs: dict[str, float] = {}
        phases: dict[str, str] = {}
        last = {"last": time.monotonic()}
        writes = [0]
        stop = threading.Event()

        def on_job(t: float, kind: str, job: Json) -> None:
            last["last"] = t
            owner = (job["metadata"].get("annotations") or {}).get("kubetune.io/finetunejob")
            if kind == "ADDED" and owner:
                jobs.setdefault(owner, t)

        def on_ftj(t: float, kind: str, obj: Json) -> None:
            last["last"] = t
            if kind == "MODIFIED":
                writes[0] += 1
            phase = (obj.get("status") or {}).get("phase")
            if phase:
                phases[obj["metadata"]["name"]] = phase

        self.api.watch(f"/apis/batch/v1/namespaces/{ns}/jobs", on_job, stop)
        self.api.watch(f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs", on_ftj, stop)
        before = request_counts(self.operator, self.api)
        cpu_before = self.operator.cpu_seconds()
        sent = self.api.create_all(f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs",
                                   [finetunejob(f"ftj-{i:04d}", pending=True) for i in range(size)])
        wait_for(lambda: all(n in jobs for n in sent), 900, "a Job for every FineTuneJob")
        wait_for(lambda: all(n in phases for n in sent), 300, "a status on every FineTuneJob")
        self.results.add("operator", size, "FineTuneJob create → Job seen", (jobs[n] - sent[n] for n in sent))
        self.quiet(last)
        requests = requests_since(self.operator, self.api, before)
        self.results.fact(f"operator {size}: API requests per FineTuneJob until settled",
                          f"{sum(requests.values()) / size:.1f} ({per_job(requests, size)})")
        self.results.fact(f"operator {size}: operator CPU seconds per FineTuneJob",
                          f"{(self.operator.cpu_seconds() - cpu_before) / size:.3f}")
        if idle_seconds:
            writes[0] = 0
            before = request_counts(self.operator, self.api)
            begin = time.monotonic()
            time.sleep(idle_seconds)
            minutes = (time.monotonic() - begin) / 60
            requests = requests_since(self.operator, self.api, before)
            self.results.fact(f"operator {size}: writes to idle FineTuneJobs (status unchanged), per job per minute",
                              f"{writes[0] / size / minutes:.2f}")
            self.results.fact(f"operator {size}: API requests per idle FineTuneJob per minute",
                              f"{sum(requests.values()) / size / minutes:.2f}")
        stop.set()
        if not keep:
            self.remove(ns)

    def lifecycle(self, size: int) -> None:
        """FineTuneJobs run to the end by the test double: the whole lifecycle."""
        ns = self.namespace("lifecycle", size)
        created: dict[str, float] = {}
        complete: dict[str, float] = {}
        succeeded: dict[str, float] = {}
        stop = threading.Event()

        def on_job(t: float, kind: str, job: Json) -> None:
            owner = (job["metadata"].get("annotations") or {}).get("kubetune.io/finetunejob")
            if owner:
                created.setdefault(owner, t)
                if is_complete(job):
                    complete.setdefault(owner, t)

        def on_ftj(t: float, kind: str, obj: Json) -> None:
            if (obj.get("status") or {}).get("phase") == "Succeeded":
                succeeded.setdefault(obj["metadata"]["name"], t)

        self.api.watch(f"/apis/batch/v1/namespaces/{ns}/jobs", on_job, stop)
        self.api.watch(f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs", on_ftj, stop)
        sent = self.api.create_all(f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs",
                                   [finetunejob(f"ftj-{i:04d}") for i in range(size)])
        wait_for(lambda: all(n in succeeded for n in sent), 900, "every FineTuneJob to succeed")
        wait_for(lambda: all(n in complete for n in sent), 60, "every Job's Complete on the watch")
        stop.set()
        self.results.add("lifecycle", size, "FineTuneJob create → Job seen", (created[n] - sent[n] for n in sent))
        self.results.add("lifecycle", size, "Job Complete → FineTuneJob Succeeded",
                         (max(0.0, succeeded[n] - complete[n]) for n in sent))

    def report(self, seconds: float) -> None:
        assert self.operator is not None
        ns = self.namespace("report", 1)
        hold = Path(f"/tmp/kubetune-{ns}-release")
        self.api.request("POST", f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs",
                         finetunejob("reporter", env=[{"name": "FAKE_WAIT_FOR", "value": str(hold)}]))
        phase: dict[str, str] = {}
        posted: dict[int, float] = {}
        seen: dict[int, float] = {}
        writes = [0]
        stop = threading.Event()

        def on_ftj(t: float, kind: str, obj: Json) -> None:
            status = obj.get("status") or {}
            phase["now"] = str(status.get("phase"))
            step = (status.get("progress") or {}).get("step")
            if step is not None and step not in seen:
                seen[step] = t
                writes[0] += 1

        self.api.watch(f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs", on_ftj, stop)
        wait_for(lambda: phase.get("now") == "Running", 120, "the reporter job to run")
        secret = self.api.request("GET", f"/api/v1/namespaces/{ns}/secrets",
                                  query=[("labelSelector", "kubetune.io/job=reporter")])["items"][0]
        token = base64.b64decode(secret["data"]["token"]).decode()
        url = f"{self.operator.url}/v1/reports/{ns}/reporter"
        begin = time.monotonic()
        step = 0
        while time.monotonic() - begin < seconds:
            step += 1
            body = json.dumps({"type": "progress", "step": step, "totalSteps": 100000, "loss": 1.0}).encode()
            request = urllib.request.Request(url, data=body, method="POST", headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            posted[step] = time.monotonic()
            urllib.request.urlopen(request, timeout=5).read()
            time.sleep(0.5)
        last = step
        wait_for(lambda: max(seen, default=0) >= last, 30, "the last report in status")
        stop.set()
        hold.touch()
        visible = [min(t for s2, t in seen.items() if s2 >= s) - posted[s] for s in posted]
        minutes = (time.monotonic() - begin) / 60
        self.results.add("report", 1, "report → its step (or a later one) in status", visible)
        self.results.fact("status writes per running job per minute (a report every 0.5 s)",
                          f"{writes[0] / minutes:.1f}")
        hold.unlink(missing_ok=True)

    def run_kubectl(self, *args: str) -> str:
        return subprocess.run([str(self.state / "bin" / "kubectl"), *args], env=self.env, text=True, check=True,
                              capture_output=True).stdout


def peer_binary() -> Path | None:
    """The training-operator binary (hack/build-peer.sh builds it once, then finds it in the cache)."""
    if not shutil.which("go"):
        return None
    done = subprocess.run(["bash", str(REPO / "hack" / "build-peer.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"peer: hack/build-peer.sh failed: {done.stderr.strip()[-500:]}", flush=True)
        return None
    return Path(done.stdout.strip().splitlines()[-1])


def self_signed_pair(directory: Path) -> None:
    """tls.crt and tls.key for a loopback server (the peer's webhook server needs some pair)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


def test_double_trainer(state_dir: Path, image: str | None) -> tuple[str, str]:
    """The TEST DOUBLE image (devcluster.images, pushed to the cluster's registry) and the node
    address, where the cluster's pods reach this machine."""
    state = json.loads((state_dir / "cluster.json").read_text())
    if image is None:
        images.build_all(["operator"])  # the TEST DOUBLE image's base (cached layers: seconds)
        image = images.build_test_double(state["registry"])
    return image, str(state["node_ip"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / ".kubetune")
    parser.add_argument("--sizes", default="50,200,1000", help="comma-separated numbers of jobs applied at once")
    parser.add_argument("--lifecycle-sizes", default="50,200", help="sizes of the test-double lifecycle series")
    parser.add_argument("--report-seconds", type=float, default=60)
    parser.add_argument("--idle-seconds", type=float, default=60, help="idle window at the largest size (0: skip)")
    parser.add_argument("--series", default="floor,job-controller,peer",
                        help="reference series to run next to the operator series (comma-separated)")
    parser.add_argument("--peer", choices=("auto", "off"), default="auto",
                        help="auto: measure Kubeflow training-operator when hack/build-peer.sh builds it")
    parser.add_argument("--trainer-image", help="the TEST DOUBLE trainer image (default: built "
                        "FROM the operator image and pushed to the cluster's registry)")
    args = parser.parse_args()
    trainer_image, report_host = test_double_trainer(args.dir, args.trainer_image)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    lifecycle_sizes = [int(s) for s in args.lifecycle_sizes.split(",") if s]
    series = set(args.series.split(","))
    results = Results()
    bench = Bench(args.dir, results)
    bench.run_kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    peer = peer_binary() if args.peer == "auto" and "peer" in series else None
    if peer is None and args.peer == "auto" and "peer" in series:
        print("peer: Kubeflow training-operator not built (hack/build-peer.sh); the peer series is skipped")
    bench.operator = Operator(bench.env, trainer_image, report_host)
    try:
        results.fact("operator RSS at start", f"{bench.operator.rss_mib():.0f} MiB")
        for size in lifecycle_sizes:
            print(f"lifecycle series, {size} jobs", flush=True)
            bench.lifecycle(size)
        for size in sizes:
            print(f"series of {size}", flush=True)
            if "floor" in series:
                bench.floor(size)
            if "job-controller" in series:
                bench.job_controller(size)
            if peer and "peer" in series:
                bench.peer(size, peer)
            largest = size == max(sizes)
            bench.operator_series(size, idle_seconds=args.idle_seconds if largest else 0, keep=largest)
            if largest:
                finished = sum(lifecycle_sizes)
                results.fact(f"operator RSS with {size} active and {finished} finished FineTuneJobs",
                             f"{bench.operator.rss_mib():.0f} MiB")
                results.fact("operator CPU seconds so far", f"{bench.operator.cpu_seconds():.0f} s")
        bench.report(args.report_seconds)
        for ns in list(bench.namespaces):
            bench.remove(ns)
        results.fact("operator RSS after every FineTuneJob was deleted", f"{bench.operator.rss_mib():.0f} MiB")
    finally:
        for ns in list(bench.namespaces):  # after a failure; FineTuneJobs go while the operator runs
            with contextlib.suppress(Exception):
                bench.remove(ns, timeout=120)
        bench.operator.stop()
    print()
    print(f"{os.cpu_count()} cores; figures in seconds; p95 / floor p95 compares with the floor of the same size")
    print(results.table())


if __name__ == "__main__":
    main()
