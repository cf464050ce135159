"""CEL as the Kubernetes API server evaluates it: hack/k8s/celeval, built from the cluster's own
k8s.io/apiserver (its CEL libraries: optionals, strings, lists, regex) by hack/build-binaries.sh.

    evaluate([{"expression": "self.x > 1", "activation": {"self": {"x": 2}}}])  ->  [{"value": True}]

Each request may carry ``variables`` ([name, expression] pairs, as an admission policy's
spec.variables) evaluated in order; a result has ``value`` or ``error``.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def evaluator() -> Path:
    """The celeval binary, built once per version of its sources (cached in ~/.cache/kubetune/bin)."""
    out = subprocess.run(["bash", str(REPO / "hack" / "build-binaries.sh"), "celeval"], check=True,
                         capture_output=True, text=True, timeout=1800)
    return Path(out.stdout.strip().splitlines()[-1])


def evaluate(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate each request; one process for the whole list."""
    out = subprocess.run([str(evaluator())], input=json.dumps(requests), check=True, capture_output=True,
                         text=True, timeout=120)
    results: list[dict[str, Any]] = json.loads(out.stdout)
    return results
