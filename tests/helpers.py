"""Helpers shared by the test suites (importable as ``from helpers import wait_for``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, message: str = "condition",
             interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout``.

    Exceptions raised by the predicate count as "not yet" (an object may not exist yet); the last
    one is chained to the timeout error.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as error:  # the state being polled may not exist yet
            last_error = error
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {message}") from last_error
        time.sleep(interval)
