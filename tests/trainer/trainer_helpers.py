"""Helpers for the trainer tests: the tiny assets module and small configs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from kubetune_trainer.config import TrainerConfig

REPO = Path(__file__).resolve().parents[2]


def _load_tiny() -> Any:
    spec = importlib.util.spec_from_file_location("kubetune_hack_tiny", REPO / "hack" / "tiny.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tiny = _load_tiny()


def tiny_config(assets: Path, location: Path | str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small, fast config for the tiny backbone; ``sections`` update the defaults per section."""
    config: dict[str, Any] = {
        "runName": "tiny",
        "model": {"source": str(assets / "backbone")},
        "dataset": {
            "train": str(assets / "data" / "train.jsonl"),
            "validation": str(assets / "data" / "validation.jsonl"),
            "maxLength": 32,
        },
        "training": {
            "maxSteps": 30,
            "batchSize": 8,
            "learningRate": 0.01,
            "warmupRatio": 0.0,
            "evalEverySteps": 10,
            "checkpointEverySteps": 10,
            "gradientCheckpointing": False,
            "seed": 7,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "output": {"location": str(location)},
    }
    for name, values in sections.items():
        if isinstance(config.get(name), dict):
            config[name].update(values)
        else:
            config[name] = values
    return config


def make_config(assets: Path, location: Path | str, **sections: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(tiny_config(assets, location, **sections))
