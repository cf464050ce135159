"""kube.py: every API call gives up after its timeout when the API server stops answering."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from kubetune.kube import Kube
from tests.support.faults import BlackholeProxy

OWNER = {"metadata": {"name": "job", "namespace": "ns", "uid": "u-1"}}
JOB = {"metadata": {"uid": "u-2"}}
CONFIG_MAP = {"kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}}

CALLS: dict[str, Callable[[Kube], Any]] = {
    "get_finetunejob": lambda k: k.get_finetunejob("ns", "job"),
    "patch_status": lambda k: k.patch_status("ns", "job", {"phase": "Running"}),
    "patch_progress": lambda k: k.patch_progress("ns", "job", [{"op": "test", "path": "/status", "value": {}}]),
    "create_or_adopt": lambda k: k.create_or_adopt(CONFIG_MAP, "u-1"),
    "get_job": lambda k: k.get_job("ns", "job-trainer"),
    "set_job_suspend": lambda k: k.set_job_suspend("ns", "job-trainer", True),
    "list_pods": lambda k: k.list_pods("ns", JOB),
    "delete_children": lambda k: k.delete_children("ns", "job", "uid"),
    "delete_pods": lambda k: k.delete_pods("ns", "u-1", 30),
    "missing_claims": lambda k: k.missing_claims("ns", ["c"]),
    "get_namespace": lambda k: k.get_namespace("ns"),
    "get_preset": lambda k: k.get_preset("ClusterFineTunePreset", "ns", "p"),
    "get_workload": lambda k: k.get_workload("ns", "u-2"),
    "pod_creation_failure": lambda k: k.pod_creation_failure("ns", "u-2"),
    "patch_workload": lambda k: k.patch_workload("ns", "job-job-trainer-1a2b3", {"spec": {"active": False}}),
}
BEST_EFFORT = {"event"}  # swallows its errors by design; it must still return


@pytest.fixture(scope="module")
def silent_kube() -> Iterator[Kube]:
    """A Kube whose API server accepts connections and never answers."""
    with BlackholeProxy("127.0.0.1", 9) as proxy:
        proxy.blackhole()
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{proxy.port}"
        configuration.retries = 1
        yield Kube(client.ApiClient(configuration), timeout=0.5)


def test_every_api_call_is_listed_here() -> None:
    public = {name for name, _ in inspect.getmembers(Kube, inspect.isfunction) if not name.startswith("_")}
    assert public == set(CALLS) | BEST_EFFORT


def outcome(call: Callable[[], Any], within: float = 10.0) -> BaseException | None:
    """Run `call` in a thread; its exception (None if it returned). Fails if it is still running."""
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            result.append(None)
        except BaseException as error:
            result.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(within)
    assert result, f"still waiting for the API server after {within}s"
    return result[0]


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_silent_api_server_fails_the_call_after_its_timeout(silent_kube: Kube, name: str) -> None:
    error = outcome(lambda: CALLS[name](silent_kube))
    assert error is not None and "timed out" in str(error).lower(), error


def test_events_give_up_quietly(silent_kube: Kube) -> None:
    assert outcome(lambda: silent_kube.event(OWNER, "Normal", "Test", "hello")) is None
