"""The command line: exit codes, first error line, no model load on bad input, termination message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_trainer import model as model_lib
from kubetune_trainer.__main__ import main
from tests.support.trainer import REPO, tiny_config

pytestmark = pytest.mark.trainer


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def first_error(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if " ERROR " in line)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to load the backbone."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_lib, "load_model", refuse)
    monkeypatch.setattr(model_lib, "load_base", refuse)


def test_missing_column_exits_3_before_loading_the_model(assets: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "cfg.yaml", tiny_config(assets, tmp_path / "out", dataset={"promptColumn": "question"})
    )
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(config)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert proc.returncode == 3, proc.stderr
    line = first_error(proc.stderr)
    assert str(assets / "data" / "train.jsonl") in line and "'question'" in line and "dataset.promptColumn" in line
    assert "loading model" not in proc.stderr
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["exitCode"] == 3 and "'question'" in summary["error"]


@pytest.mark.parametrize("content", ["", '{"prompt": "a", "answer": \n'], ids=["empty", "unreadable"])
def test_empty_or_unreadable_data_exits_3(
    content: str, assets: Path, tmp_path: Path, no_model_load: None, caplog: pytest.LogCaptureFixture
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(content)
    config = write_config(tmp_path / "cfg.yaml", tiny_config(assets, tmp_path / "out", dataset={"train": str(train)}))
    assert main(["--config", str(config)]) == 3
    assert str(train) in next(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_invalid_config_exits_3_naming_the_field(assets: Path, tmp_path: Path, no_model_load: None,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path / "cfg.yaml", tiny_config(assets, tmp_path / "out"))
    assert main(["--config", str(config), "--set", "training.batchSize=0"]) == 3
    error = next(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert str(config) in error and "training.batchSize" in error


@pytest.mark.parametrize("text", ["model: [unclosed\n", "- a list\n", "{}\n"], ids=["yaml", "list", "empty"])
def test_malformed_config_file_exits_3(text: str, tmp_path: Path, no_model_load: None,
                                       caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(text)
    assert main(["--config", str(config)]) == 3
    assert str(config) in next(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


@pytest.mark.parametrize(
    "source", ["/nonexistent/backbone", "hf://org/model", "pvc://claim/models/x"], ids=["path", "hf-offline", "pvc"]
)
def test_unavailable_model_source_exits_4(source: str, assets: Path, tmp_path: Path, no_model_load: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    config = write_config(tmp_path / "cfg.yaml", tiny_config(assets, tmp_path / "out", model={"source": source}))
    assert main(["--config", str(config)]) == 4
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["exitCode"] == 4 and source in summary["error"]


def test_out_of_memory_exits_6_with_settings_to_change(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    def clip_grad_norm_out_of_memory(*args: object, **kwargs: object) -> None:
        """TEST DOUBLE for torch.nn.utils.clip_grad_norm_: fails as a CUDA allocation does when memory runs out
        (this test runs on the CPU, where no real CUDA out-of-memory can happen)."""
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test double)")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_out_of_memory)
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    config = write_config(tmp_path / "cfg.yaml", tiny_config(assets, tmp_path / "out"))
    assert main(["--config", str(config)]) == 6
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["exitCode"] == 6 and summary["step"] == 0
    error = summary["error"]
    assert error.startswith("out of accelerator memory during step 1: CUDA out of memory. Tried to allocate 2.00 GiB")
    for hint in ("quantization int4 (now none)", "dataset.maxLength (now 32)", "training.batchSize (now 8",
                 "more GPUs"):
        assert hint in error, hint
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [error]
