"""`make gpu-check` end to end on the CPU at a tiny shape (`--allow-cpu`): every mode through the
KubeTune trainer and the baseline, the batchSize auto run, the estimates and the memory census, in one
JSON. (On the device, the same script runs the 3.55B shape.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.trainer import REPO

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def test_the_gpu_script_runs_every_mode_and_writes_one_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hack.gpu_check", "--allow-cpu", "--layers", "1", "--hidden", "256", "--steps", "4",
         "--vocab", "512", "--max-length", "64", "--train-samples", "400", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads((tmp_path / "gpu_check.json").read_text())
    assert found["shape"] == {"layers": 1, "hidden": 256}
    assert sorted(found["results"]) == ["bf16", "int4", "int8"]
    for mode, sides in found["results"].items():
        for side in ("kubetune", "baseline"):
            assert "error" not in sides[side], (mode, side, sides[side])
            assert sides[side]["tokensPerSecond"] > 0 and sides[side]["peakMemoryBytes"] > 0
            assert sorted(sides[side]["census"]) == ["1", "2", "3"], (mode, side)
    assert found["results"]["int8"]["kubetune"]["census"]["3"]["frozen weights int8"] > 0
    auto = found["auto"]
    assert "error" not in auto and isinstance(auto["microBatch"], int) and auto["microBatch"] >= 1
    assert auto["tokensPerSecond"] > 0 and sorted(auto["census"]) == ["1", "2", "3"]
    assert sorted(found["estimatedPeakBytes"]) == ["auto", "bf16", "int4", "int8"]
    assert sorted(found["preference"]) == ["dpo", "sft", "sft-8"]
    assert all(r["tokensPerSecond"] > 0 and r["peakMemoryBytes"] > 0 for r in found["preference"].values())
    assert "dpo peak / sft peak" in proc.stdout
    assert all(value > 0 for value in found["estimatedPeakBytes"].values())
