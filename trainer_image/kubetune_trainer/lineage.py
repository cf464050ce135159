"""A run's lineage: which backbone, data, config and image made its artifacts (docs/artifacts.md).

It goes into manifest.json, the model card and ``status.artifacts.lineage``. The same inputs give
the same lineage, times apart: digests of content, never of where a copy lies.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kubetune_contract import __version__
from kubetune_contract.config import TrainerConfig
from kubetune_contract.events import DataLineage, Lineage, now

from .sources import sha256_of

IMAGE_ENV = "KUBETUNE_IMAGE"
"""The trainer image as the Job names it (the operator sets it)."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def config_sha256(config: TrainerConfig) -> str:
    """sha256 of the effective config as trainer_config.json has it, without runName and output
    (where the results go does not change what is trained); keys sorted, compact."""
    values = config.model_dump(by_alias=True, mode="json", exclude={"run_name", "output"})
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hub_commit(model_dir: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot (``.../snapshots/<commit>``), else None."""
    return model_dir.name if model_dir.parent.name == "snapshots" else None


def weights_sha256(model_dir: Path) -> str:
    """sha256 over ``"<sha256>  <relative path>"`` lines, sorted by path, of a model directory's
    weight files (every file when none has a weight suffix)."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)] or files
    lines = "".join(f"{sha256_of(p)}  {p.relative_to(model_dir).as_posix()}\n" for p in weights)
    return hashlib.sha256(lines.encode()).hexdigest()


def data_file(role: str, uri: str, path: Path) -> DataLineage:
    return DataLineage.model_validate({"role": role, "uri": uri, "bytes": path.stat().st_size,
                                       "sha256": sha256_of(path)})


def lineage(config: TrainerConfig, model_dir: Path, data: list[DataLineage], started_at: str) -> Lineage:
    """The run's lineage, finished now; ``data``: the files read (data.Datasets.files)."""
    commit = hub_commit(model_dir) if config.model.source.startswith("hf://") else None
    return Lineage(
        model_source=config.model.source,
        model_revision=commit or config.model.revision,
        # A hub snapshot is named by its commit; anything else by what its weights hold.
        model_sha256=None if commit else weights_sha256(model_dir),
        data=data,
        config_sha256=config_sha256(config),
        image=os.environ.get(IMAGE_ENV) or None,
        version=__version__,
        started_at=started_at,
        finished_at=now(),
    )


def as_json(value: Lineage) -> dict[str, Any]:
    return value.model_dump(by_alias=True, exclude_none=True, mode="json")


def card_lines(value: dict[str, Any]) -> list[str]:
    """The model card's lineage section."""
    if not value:
        return []
    model = value.get("modelSource", "")
    if value.get("modelRevision"):
        model += f" @ {value['modelRevision']}"
    lines = ["## Lineage", "", f"- backbone: `{model}`"]
    if value.get("modelSha256"):
        lines.append(f"- backbone weights sha256: `{value['modelSha256']}`")
    lines += [f"- {d['role']} data: `{d['uri']}` ({d['bytes']} bytes, sha256 `{d['sha256']}`)"
              for d in value.get("data") or []]
    lines.append(f"- config sha256: `{value.get('configSha256')}`")
    if value.get("image"):
        lines.append(f"- trainer image: `{value['image']}`")
    lines += [f"- KubeTune {value.get('version')}; started {value.get('startedAt')}, "
              f"finished {value.get('finishedAt')}", ""]
    return lines
