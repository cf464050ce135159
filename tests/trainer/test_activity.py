"""What the trainer tells the operator's stall check (training.stallTimeoutSeconds): its activity at
each change (preparing, training, evaluating, checkpointing, publishing), and a report at least every
HEARTBEAT_S while steps advance, however rarely logEverySteps reports them. None of it is recorded
in metrics.jsonl. And the log it publishes with the outputs."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from kubetune_trainer import train
from kubetune_trainer.artifacts import verify_manifest
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config

pytestmark = pytest.mark.trainer


def test_activities_and_heartbeats_of_a_run(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # as the trainer's own logging setup does
    monkeypatch.setattr(train, "HEARTBEAT_S", 0.0)  # every step is "a minute later"
    out = io.StringIO()
    config = make_config(assets, tmp_path / "out", training={"maxSteps": 6, "logEverySteps": 100,
                                                             "evalEverySteps": 100, "checkpointEverySteps": 3})
    Trainer(config, Reporter(tmp_path / "metrics.jsonl", stream=out)).run()
    told = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    activity = [(e["step"], e["activity"]) for e in told if e.get("type") in ("progress", "activity")]
    assert activity[0] == (0, "preparing")
    assert activity[-1] == (6, "publishing")
    order = [a for _, a in activity]
    assert order.index("evaluating") < order.index("training") < order.index("checkpointing")
    # Steps 1, 2, 4 and 5 have no report of their own (logEverySteps 100): a heartbeat each.
    beats = {step for step, a in activity if a == "training"}
    assert {1, 2, 4, 5} <= beats
    assert (3, "checkpointing") in activity and (3, "training") in activity, "training again after the checkpoint"
    recorded = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(e.get("activity") in (None, "training") for e in recorded)
    assert len(recorded) < len(activity), "the light reports are not in metrics.jsonl"
    # Rank 0's log is published with the outputs (kubetune logs reads it once the pods are gone).
    run = tmp_path / "out" / "tiny"
    assert "trainer.log" in {f["path"] for f in verify_manifest(str(run))["files"]}
    assert "training: 6 steps" in (run / "trainer.log").read_text()
