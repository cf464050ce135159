"""The operator survives a black-holed API server: every call times out, nothing waits forever,
and deferred work (ttlSecondsAfterFinished) happens after the outage.

The operator reaches the API server through a fault-injecting proxy (tests/support/faults.py) that
silently drops every byte, as a dead route or middlebox does; connections that saw it stay dead.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.support.helpers import wait_for
from tests.support.jobs import Signals, env, event_reasons, finetunejob, ftj, wait_phase

pytestmark = pytest.mark.e2e

OUTAGE = float(os.environ.get("KUBETUNE_TEST_OUTAGE_SECONDS", "60"))
RECOVERY = 60.0  # every job must end Succeeded within this long after the network heals



def hold_until(deadline: float) -> None:
    """Keep a fault in place until a monotonic deadline (the fault's length, not a wait for state)."""
    threading.Event().wait(max(0.0, deadline - time.monotonic()))


def job_succeeded(cluster: Any, namespace: str, name: str) -> bool:
    return bool(cluster.get("job", f"{name}-trainer", "-n", namespace)["status"].get("succeeded"))


def test_jobs_that_finish_during_an_api_outage_succeed_soon_after_it(
        cluster: Any, namespace: str, proxied_operator: Any, apiserver_proxy: Any, signals: Signals) -> None:
    names = [f"blind-{i}" for i in range(3)]
    for name in names:
        cluster.apply(finetunejob(name, resources={"gpus": 0, "sharedMemory": "64Mi"},
                                  env=env(FAKE_WAIT_FOR=signals.gate("release"))), namespace)
    for name in names:
        wait_phase(cluster, namespace, name, "Running")

    apiserver_proxy.blackhole()
    end_of_outage = time.monotonic() + OUTAGE
    signals.open("release")
    wait_for(lambda: all(job_succeeded(cluster, namespace, n) for n in names), timeout=OUTAGE,
             message="the training Jobs to complete while the operator is cut off")
    assert {ftj(cluster, namespace, n)["status"]["phase"] for n in names} == {"Running"}, \
        "the operator wrote status through the black hole"
    hold_until(end_of_outage)

    apiserver_proxy.heal()
    healed = time.monotonic()
    for name in names:
        wait_phase(cluster, namespace, name, "Succeeded", timeout=RECOVERY)
    assert time.monotonic() - healed <= RECOVERY
    assert len(cluster.get("jobs", "-n", namespace)["items"]) == len(names), "a Job was created twice"
    with urllib.request.urlopen(proxied_operator.health_url, timeout=5) as response:
        assert response.status == 200


def test_ttl_clean_up_happens_although_the_api_server_is_unreachable_at_the_deadline(
        cluster: Any, namespace: str, proxied_operator: Any, apiserver_proxy: Any) -> None:
    ttl = 20
    cluster.apply(finetunejob("short-lived", ttlSecondsAfterFinished=ttl), namespace)
    status = wait_phase(cluster, namespace, "short-lived", "Succeeded")
    finished = dt.datetime.fromisoformat(status["completionTime"].replace("Z", "+00:00"))
    deadline = time.monotonic() + ttl - (dt.datetime.now(dt.UTC) - finished).total_seconds()
    assert cluster.get("jobs", "-n", namespace, "-l", "kubetune.io/job=short-lived")["items"], \
        "the Job must outlive the end of training until the TTL"

    hold_until(deadline - 5)
    apiserver_proxy.blackhole()  # from 5 s before the deadline to 15 s after it
    hold_until(deadline + 15)
    assert cluster.get("jobs", "-n", namespace, "-l", "kubetune.io/job=short-lived")["items"], \
        "children were removed through the black hole"
    apiserver_proxy.heal()

    wait_for(lambda: cluster.get("jobs,pods,configmaps", "-n", namespace, "-l",
                                 "kubetune.io/job=short-lived")["items"] == [],
             timeout=RECOVERY, message="Job, pods and ConfigMap removed after the outage")
    # The operator removes the children, then records it (status.cleanupTime).
    status = wait_for(lambda: (s := ftj(cluster, namespace, "short-lived")["status"]).get("cleanupTime") and s,
                      timeout=30, message="status.cleanupTime after the clean-up")
    assert status["phase"] == "Succeeded" and status["metrics"]["evalLoss"] == 0.5
    assert status["cleanupTime"] >= status["completionTime"]
    assert "Cleaned" in event_reasons(cluster, namespace, "short-lived")
    # kopf notices its dead watch connection within its 70 s inactivity timeout, reconnects, sees
    # that the job needs nothing more, and drops its finalizer.
    wait_for(lambda: not ftj(cluster, namespace, "short-lived")["metadata"].get("finalizers"), timeout=120,
             message="kopf to drop its finalizer once nothing is left to do")


def liveness(operator: Any) -> int:
    try:
        with urllib.request.urlopen(operator.health_url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


WEDGED = {"KUBETUNE_API_TIMEOUT": "120", "KUBETUNE_STALL_SECONDS": "3"}


@pytest.mark.parametrize("operator_env", [WEDGED], ids=["api-timeout-120s-stall-3s"])
def test_liveness_fails_while_a_reconcile_is_stuck(cluster: Any, namespace: str, proxied_operator: Any,
                                                   apiserver_proxy: Any, signals: Signals) -> None:
    cluster.apply(finetunejob("stuck", env=env(FAKE_WAIT_FOR=signals.gate("never"))), namespace)
    wait_phase(cluster, namespace, "stuck", "Running")
    assert liveness(proxied_operator) == 200
    apiserver_proxy.blackhole()  # the next resync waits on the API server for up to 120 s
    wait_for(lambda: liveness(proxied_operator) == 500, timeout=60,
             message="the liveness endpoint to report the stuck reconcile")
    proxied_operator.stop(kill=True)
    signals.open("never")  # let the training pod end instead of outliving the test
