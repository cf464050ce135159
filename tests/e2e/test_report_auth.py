"""The report endpoint against the real API server: only a job's own token may report for it."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.support.helpers import wait_for
from tests.support.jobs import Signals, env, finetunejob, ftj, report_token, wait_phase

pytestmark = pytest.mark.e2e


def post(url: str, body: dict[str, Any], token: str | None) -> int:
    return send(url, body, token)[0]


def send(url: str, body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read() or b"{}")


def running_job(cluster: Any, namespace: str, operator: Any, name: str, signals: Signals) -> tuple[str, str]:
    """A FineTuneJob held Running (TEST DOUBLE trainer) until its gate opens: (report URL, token)."""
    cluster.apply(finetunejob(name, env=env(FAKE_WAIT_FOR=signals.gate(name))), namespace)
    wait_phase(cluster, namespace, name, "Running")
    return f"{operator.report_url}/v1/reports/{namespace}/{name}", report_token(cluster, namespace, name)


def test_only_the_jobs_own_token_reports_for_it(cluster: Any, namespace: str, operator: Any,
                                                signals: Signals) -> None:
    hold = env(FAKE_WAIT_FOR=signals.gate("release"))
    for name in ("job-a", "job-b"):
        cluster.apply(finetunejob(name, env=hold), namespace)
    for name in ("job-a", "job-b"):
        wait_phase(cluster, namespace, name, "Running")

    secret = cluster.get("secrets", "-n", namespace, "-l", "kubetune.io/job=job-a")["items"][0]
    token_a = report_token(cluster, namespace, "job-a")
    assert secret["metadata"]["ownerReferences"][0]["name"] == "job-a"
    pod = cluster.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=job-a-trainer")["items"][0]
    pod_env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert pod_env["KUBETUNE_REPORT_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert token_a not in json.dumps(pod)

    url_a = f"{operator.report_url}/v1/reports/{namespace}/job-a"
    url_b = f"{operator.report_url}/v1/reports/{namespace}/job-b"
    report = {"type": "progress", "step": 7, "totalSteps": 10, "loss": 1.5, "phase": "Succeeded"}
    assert post(url_b, report, None) == 401
    assert post(url_b, report, "not-a-token") == 403
    assert post(url_b, report, token_a) == 403
    assert post(url_a, {"type": "progress", "step": "x"}, token_a) == 400

    assert post(url_a, report, token_a) == 202
    status_a = wait_for(lambda: (ftj(cluster, namespace, "job-a").get("status") or {}).get("progress"),
                        timeout=30, message="job-a progress from its report")
    assert status_a["step"] == 7 and status_a["percent"] == 70
    status_b = ftj(cluster, namespace, "job-b")["status"]
    assert "progress" not in status_b and not status_b.get("metrics")
    assert ftj(cluster, namespace, "job-a")["status"]["phase"] == "Running"

    signals.open("release")
    wait_phase(cluster, namespace, "job-a", "Succeeded")
    wait_phase(cluster, namespace, "job-b", "Succeeded")
    assert send(url_a, {"type": "progress", "step": 1, "totalSteps": 10}, token_a) == (202, {"accepted": False})
    assert ftj(cluster, namespace, "job-a")["status"]["progress"]["percent"] == 100


def test_reports_are_rate_limited_per_job(cluster: Any, namespace: str, operator: Any, signals: Signals) -> None:
    url, token = running_job(cluster, namespace, operator, "chatty", signals)
    codes = [post(url, {"type": "progress", "step": i}, token) for i in range(40)]
    assert codes.count(202) >= 20 and 429 in codes
    signals.open("chatty")
    wait_phase(cluster, namespace, "chatty", "Succeeded")


FLOOD_SECONDS = float(os.environ.get("KUBETUNE_TEST_FLOOD_SECONDS", "120"))
FLOOD_RATE = 200  # bogus requests per second, all threads together


def flood(host: str, port: int, namespace: str, real_job: str, stop: threading.Event, sent: list[int],
          rate: float) -> None:
    """Bogus reports at `rate` per second: unknown jobs, the real job with wrong tokens, no tokens."""
    connection = http.client.HTTPConnection(host, port, timeout=5)
    body = json.dumps({"type": "progress", "step": 999}).encode()
    period, due, i = 1.0 / rate, time.monotonic(), 0
    while not stop.is_set():
        i += 1
        name = real_job if i % 10 == 0 else f"ghost-{secrets.token_hex(4)}"
        headers = {"Content-Type": "application/json"}
        if i % 10 != 5:
            headers["Authorization"] = f"Bearer {secrets.token_urlsafe(32)}"
        try:
            connection.request("POST", f"/v1/reports/{namespace}/{name}", body=body, headers=headers)
            connection.getresponse().read()
            sent[0] += 1
        except (OSError, http.client.HTTPException):
            connection.close()
            connection = http.client.HTTPConnection(host, port, timeout=5)
        due += period
        stop.wait(max(0.0, due - time.monotonic()))
    connection.close()


def test_a_flood_of_bogus_reports_does_not_stop_a_real_jobs_progress(cluster: Any, namespace: str, operator: Any,
                                                                      signals: Signals) -> None:
    url, token = running_job(cluster, namespace, operator, "steady", signals)

    stop, sent = threading.Event(), [0]
    threads = [threading.Thread(target=flood, args=(operator.report_host, operator.report_port, namespace, "steady",
                                                    stop, sent, FLOOD_RATE / 4), daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    codes: list[int] = []
    seen: list[int] = []
    started = time.monotonic()
    step = 0
    try:
        while time.monotonic() - started < FLOOD_SECONDS:
            step += 1
            codes.append(post(url, {"type": "progress", "step": step, "totalSteps": 100000}, token))
            if step % 20 == 0:
                seen.append(int((ftj(cluster, namespace, "steady")["status"].get("progress") or {}).get("step", 0)))
            stop.wait(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    elapsed = time.monotonic() - started
    print(f"flood: {sent[0]} bogus requests in {elapsed:.0f}s ({sent[0] / elapsed:.0f}/s); "
          f"real reports {codes.count(202)}/{len(codes)} accepted; progress samples {seen}")
    assert codes.count(202) == len(codes), f"real reports refused: {sorted(set(codes))}"
    assert len(seen) >= 3 and all(a < b for a, b in itertools.pairwise(seen)), seen
    wait_for(lambda: ftj(cluster, namespace, "steady")["status"]["progress"]["step"] == step, timeout=30,
             message="the last real report in status")
    assert sent[0] > 0
    signals.open("steady")
    wait_phase(cluster, namespace, "steady", "Succeeded")


def test_progress_never_goes_backwards_after_a_resume(cluster: Any, namespace: str, operator: Any,
                                                     signals: Signals) -> None:
    url, token = running_job(cluster, namespace, operator, "resumed", signals)

    def status() -> dict[str, Any]:
        return ftj(cluster, namespace, "resumed")["status"]

    assert post(url, {"type": "progress", "step": 30, "totalSteps": 100, "loss": 1.0}, token) == 202
    wait_for(lambda: (status().get("progress") or {}).get("step") == 30, timeout=30, message="step 30")
    # The pod restarted and resumed from its checkpoint of step 25: its loss is news, its step is not.
    assert post(url, {"type": "progress", "step": 26, "totalSteps": 100, "loss": 0.7}, token) == 202
    wait_for(lambda: status()["metrics"].get("trainLoss") == 0.7, timeout=30, message="the resumed run's loss")
    assert status()["progress"]["step"] == 30 and status()["progress"]["percent"] == 30
    assert post(url, {"type": "progress", "step": 31, "totalSteps": 100, "loss": 0.6}, token) == 202
    wait_for(lambda: status()["progress"]["step"] == 31, timeout=30, message="step 31")
    signals.open("resumed")
    wait_phase(cluster, namespace, "resumed", "Succeeded")
