"""The benchmarks' baseline (hack/baseline_trainer.py, transformers.Trainer + peft) trains a KubeTune
trainer config end to end on the CPU and reports throughput and peak memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.trainer import REPO, tiny_config

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_baseline_reports_tokens_per_second_and_peak_memory(quantization: str, assets: Path, tmp_path: Path) -> None:
    config = tiny_config(assets, tmp_path / "out", quantization=quantization,
                         training={"maxSteps": 6, "logEverySteps": 3, "evalEverySteps": 6, "checkpointEverySteps": 6})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "baseline_trainer.py"), "--config", str(tmp_path / "cfg.yaml"),
         "--out", str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["quantization"] == quantization
    assert result["steps"] == 6
    # The steps after the KubeTune trainer's report at step 3: those its final report's tokens/s covers.
    assert (result["window"]["firstStep"], result["window"]["lastStep"]) == (4, 6)
    assert result["window"]["tokens"] > 0
    assert result["tokensPerSecond"] > 0
    assert result["peakMemoryBytes"] > 0
    assert result["peakMemory"] == "peak RSS"
    assert math.isfinite(result["evalLoss"])
