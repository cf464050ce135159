"""The memory census (kubetune_trainer.census) of int8 LoRA training on the CPU, beside the
transformers.Trainer + peft baseline on the same config: after the first step nothing grows, and the
trainer holds no kind of memory, nor more of any kind, than the baseline does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.census import growth
from tests.support.trainer import REPO, tiny_config

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

DATA_DEPENDENT = {"quantization outliers", "other"}
"""The outlier columns of the last batch, and the batch itself: each side trains its own order."""


def census_of(command: list[str], env: dict[str, str], path: Path) -> dict[str, dict[str, int]]:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found: dict[str, dict[str, int]] = json.loads(path.read_text())
    return found


def test_int8_memory_holds_still_after_the_first_step_and_no_more_than_the_baseline(assets: Path,
                                                                                       tmp_path: Path) -> None:
    import os

    config = tiny_config(assets, tmp_path / "out", quantization="int8",
                         training={"maxSteps": 4, "logEverySteps": 2, "evalEverySteps": 4, "checkpointEverySteps": 4})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "KUBETUNE_CENSUS_FILE": str(tmp_path / "ours.json")}
    ours = census_of([sys.executable, "-m", "kubetune_trainer", "--config", str(tmp_path / "cfg.yaml")], env,
                     tmp_path / "ours.json")
    baseline = {**config, "output": {**config["output"], "location": str(tmp_path / "baseline")}}
    (tmp_path / "baseline.yaml").write_text(yaml.safe_dump(baseline))
    theirs = census_of([sys.executable, str(REPO / "hack" / "baseline_trainer.py"), "--config",
                        str(tmp_path / "baseline.yaml"), "--out", str(tmp_path / "result.json"),
                        "--census", str(tmp_path / "theirs.json")], dict(os.environ), tmp_path / "theirs.json")

    assert sorted(ours) == sorted(theirs) == ["1", "2", "3"]
    assert ours["3"]["frozen weights int8"] > 0 and ours["3"]["trainable weights"] > 0
    # AdamW: two moments per weight, and a step count per tensor
    assert ours["3"]["optimizer state"] // ours["3"]["trainable weights"] == 2
    for side in (ours, theirs):
        assert growth(side["2"], side["3"]) == {}, "nothing grows once the first step made the optimizer state"
    only_ours = set(ours["3"]) - set(theirs["3"]) - DATA_DEPENDENT
    assert not only_ours, f"memory the baseline does without: {only_ours}"
    more = {kind: (ours["3"][kind], theirs["3"][kind]) for kind in set(ours["3"]) - DATA_DEPENDENT
            if ours["3"][kind] > theirs["3"][kind]}
    assert not more, f"more than the baseline holds (ours, theirs): {more}"
