"""reconcile.Reconciler: one pass at a time per object, no thread waits on another's network call,
and a wedged pass is visible to the liveness check."""

from __future__ import annotations

import threading
from typing import Any

from kubetune.reconcile import Reconciler
from kubetune.settings import Settings


class SlowKube:
    """TEST DOUBLE for kube.Kube: get_finetunejob blocks until released and counts its calls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def get_finetunejob(self, namespace: str, name: str) -> Any:
        self.calls += 1
        self.entered.set()
        self.release.wait(10)
        return None  # deleted meanwhile: the pass ends here


def test_a_second_call_does_not_wait_and_the_running_pass_goes_round_again() -> None:
    kube = SlowKube()
    reconciler = Reconciler(kube, Settings())  # type: ignore[arg-type]
    first = threading.Thread(target=reconciler, args=("ns", "job"))
    first.start()
    assert kube.entered.wait(5)
    second = threading.Thread(target=reconciler, args=("ns", "job"))
    second.start()
    second.join(2)
    assert not second.is_alive(), "the second call waited for the first one's network call"
    kube.release.set()
    first.join(5)
    assert kube.calls == 2  # the change that arrived during the first pass was not lost


def test_a_pass_that_runs_too_long_is_reported_as_stalled() -> None:
    kube = SlowKube()
    reconciler = Reconciler(kube, Settings())  # type: ignore[arg-type]
    assert reconciler.stalled(limit=0.0) is None
    worker = threading.Thread(target=reconciler, args=("ns", "wedged"))
    worker.start()
    assert kube.entered.wait(5)
    problem = reconciler.stalled(limit=0.0)
    assert problem is not None and "ns/wedged" in problem
    assert reconciler.stalled(limit=3600) is None
    kube.release.set()
    worker.join(5)
    assert reconciler.stalled(limit=0.0) is None
