"""Helpers shared by the test suites and the benches: ``from tests.support.helpers import Cluster, wait_for``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from devcluster.processes import free_ports

REPO = Path(__file__).resolve().parents[2]
# `python -m devcluster …`: the local cluster's command line (the repository root is the package's parent).
DEVCLUSTER = [sys.executable, "-m", "devcluster"]


def devcluster(*args: str, env: dict[str, str] | None = None, check: bool = False,
               timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
    """``python -m devcluster ARGS`` (up, down, status, stop, start), its output captured."""
    return subprocess.run([*DEVCLUSTER, *args], cwd=REPO, env=env, check=check, capture_output=True, text=True,
                          timeout=timeout)


def load_hack(name: str) -> Any:
    """hack/<name>.py (a script, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"kubetune_hack_{name}", REPO / "hack" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


STALE_DISCOVERY = "the server doesn't have a resource type"

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


@dataclass(frozen=True)
class Cluster:
    """How tests reach the cluster."""

    kubeconfig: Path
    kubectl_path: Path
    helm_path: Path | None
    apiserver: str
    dir: Path | None = None  # state directory of a local cluster; None for an existing cluster
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def _run(self, binary: Path, args: tuple[str, ...], input: str | None, check: bool,
             timeout: float) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(binary), *args], input=input, capture_output=True, text=True,
                                env=self.env, timeout=timeout)
        if result.returncode != 0 and binary == self.kubectl_path and STALE_DISCOVERY in result.stderr:
            # kubectl's discovery cache predates a CRD that is now served: refresh it once and retry.
            subprocess.run([str(binary), "api-resources"], capture_output=True, env=self.env, timeout=timeout)
            result = subprocess.run([str(binary), *args], input=input, capture_output=True, text=True,
                                    env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{binary.name} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises on failure unless ``check=False``."""
        return self._run(self.kubectl_path, args, input, check, timeout)

    def helm(self, *args: str, input: str | None = None, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        if self.helm_path is None:
            pytest.skip("helm is not available")
        return self._run(self.helm_path, args, input, check, timeout)

    def get(self, *args: str) -> Any:
        """``kubectl get ... -o json`` parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None) -> None:
        docs = manifest if isinstance(manifest, list) else [manifest]
        extra = ["-n", namespace] if namespace else []
        self.kubectl("apply", *extra, "-f", "-", input=yaml.safe_dump_all(docs))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    return free_ports(1)[0]


@dataclass(frozen=True)
class Node:
    """The session cluster's node: its pods, on the pod network, run images from the cluster's
    registry and reach this machine at its address."""

    host: str  # where pods reach this machine's servers (the operator's reports, MinIO, Signals)
    registry: str  # the cluster's image registry (host:port), where the tests push their images
