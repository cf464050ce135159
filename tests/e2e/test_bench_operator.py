"""hack/bench_operator.py at a tiny size, so that `make bench` cannot rot: every series runs and
prints its row. (Figures are recorded by `make bench` in docs/benchmarks.md, never asserted.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_operator_benchmark_runs_every_series(cluster: Any, crd: None) -> None:
    if cluster.dir is None:
        pytest.skip("the benchmark runs on the local cluster")
    done = subprocess.run(
        [sys.executable, "-m", "hack.bench_operator", "--dir", str(cluster.dir), "--sizes", "3,5",
         "--lifecycle-sizes", "4", "--report-seconds", "3", "--idle-seconds", "2", "--peer", "off"],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("| series |", 1)[1]
    for row in ("| lifecycle | 4 | FineTuneJob create → Job seen |",
                "| lifecycle | 4 | Job Complete → FineTuneJob Succeeded |",
                "| floor | 3 |", "| floor | 5 |", "| job-controller | 5 |",
                "| operator | 3 | FineTuneJob create → Job seen |", "| operator | 5 | FineTuneJob create → Job seen |",
                "| report | 1 |", "| operator 5: API requests per FineTuneJob until settled |",
                "| operator 5: writes to idle FineTuneJobs", "| operator RSS after every FineTuneJob was deleted |"):
        assert row in table, f"{row!r} missing from:\n{table}"
    # Every series cleans up after itself: no bench namespace is left behind.
    left = cluster.kubectl("get", "namespaces", "-o", "name").stdout.split()
    assert not [n for n in left if n.startswith("namespace/bench-")], left
