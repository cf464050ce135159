"""The images users deploy (`make images`): built from the repository's Dockerfiles with the tested
dependency set, labelled, non-root, cached, and able to run with a read-only root filesystem.

The containers run with podman and runc on this machine; the operator image against the local
cluster is tested in tests/e2e/test_operator_image.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster import images as images_lib
from devcluster import tiny
from tests.support.helpers import DEVCLUSTER, REPO

pytestmark = pytest.mark.images

NON_ROOT = {"operator": "65532:65532", "trainer": "10001"}
# Scratch space the operator gives every training pod (render.py SCRATCH_DIR): HOME and TMPDIR.
SCRATCH = "/var/tmp/kubetune"




def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env=images_lib.container_env())
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr[-3000:]}"
    return proc


def inspect(tag: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(podman("image", "inspect", tag).stdout)[0]
    return info


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def archive_manifest(archive: Path) -> dict[str, Any]:
    """The image manifest inside an OCI archive (index.json → manifest blob)."""
    with tarfile.open(archive) as tar:
        def blob(name: str) -> dict[str, Any]:
            member = tar.extractfile(name)
            assert member is not None
            loaded: dict[str, Any] = json.load(member)
            return loaded

        index = blob("index.json")
        digest = index["manifests"][0]["digest"].split(":", 1)[1]
        return blob(f"blobs/sha256/{digest}")


def git_revision() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("name", sorted(NON_ROOT))
def test_image_is_versioned_labelled_and_non_root(images: dict[str, str], name: str) -> None:
    version = images_lib.version()
    assert images[name] == f"localhost/kubetune/{name}:{version}"
    info = inspect(images[name])
    assert info["Config"]["User"] == NON_ROOT[name]
    expected = {
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": git_revision(),
        "org.opencontainers.image.source": images_lib.SOURCE_URL,
    }
    labels = info["Config"]["Labels"]
    assert {key: labels.get(key) for key in expected} == expected
    # The OCI archive carries the same as manifest annotations, for registries and scanners.
    annotations = archive_manifest(images_lib.IMAGES[name].archive)["annotations"]
    assert {key: annotations.get(key) for key in expected} == expected


@pytest.mark.parametrize("name", sorted(NON_ROOT))
def test_image_holds_the_tested_dependency_set(images: dict[str, str], name: str) -> None:
    """Every installed distribution pinned in constraints.txt has its pinned version (torch included)."""
    listing = podman("run", "--rm", "--read-only", "--network", "none", "--entrypoint", "python", images[name],
                     "-c", "import importlib.metadata as m, json; "
                     "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))").stdout
    installed = {re.sub(r"[-_.]+", "-", key).lower(): value for key, value in json.loads(listing).items()}
    pins = constraints()
    assert installed["kubetune"] == images_lib.version()
    required = {"operator": ["kopf", "kubernetes", "pydantic"], "trainer": ["torch", "transformers", "peft",
                                                                          "bitsandbytes", "accelerate", "minio"]}
    assert set(required[name]) <= set(installed)
    drift = {dist: (version, pins[dist]) for dist, version in installed.items()
             if dist in pins and pins[dist] != version}
    assert drift == {}, f"installed vs constraints.txt: {drift}"


def test_a_second_build_with_nothing_changed_reuses_every_layer(images: dict[str, str]) -> None:
    before = {name: images_lib.image_id(tag) for name, tag in images.items()}
    archives = {name: images_lib.IMAGES[name].archive.stat().st_mtime_ns for name in images}
    proc = subprocess.run([*DEVCLUSTER[:-1], "devcluster.images", "build"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {name: images_lib.image_id(tag) for name, tag in images.items()} == before
    assert {name: images_lib.IMAGES[name].archive.stat().st_mtime_ns for name in images} == archives
    assert "Using cache" in proc.stderr + proc.stdout


def test_trainer_image_trains_with_a_read_only_root_as_uid_10001(images: dict[str, str], tmp_path: Path) -> None:
    """A tiny CPU run inside the image, locked down as the operator's pod spec locks it down: read-only
    root, no network, no capabilities, writes only to its scratch space and the output volume."""
    assets = tmp_path / "assets"
    tiny.build_tiny_backbone(assets / "backbone")
    tiny.write_dataset(assets / "data" / "train.jsonl", 64, seed=0)
    tiny.write_dataset(assets / "data" / "validation.jsonl", 8, seed=1)
    for path in assets.rglob("*"):  # readable by the image's user (safetensors writes 0600)
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 10001, 10001)
    config = {
        "runName": "tiny",
        "model": {"source": "/assets/backbone"},
        "dataset": {"train": "/assets/data/train.jsonl", "validation": "/assets/data/validation.jsonl",
                    "maxLength": 32},
        "training": {"maxSteps": 6, "batchSize": 4, "learningRate": 0.01, "evalEverySteps": 3,
                     "checkpointEverySteps": 3, "gradientCheckpointing": False, "seed": 7},
        "lora": {"r": 4, "alpha": 8},
        "output": {"location": "/out"},
    }
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "trainer.yaml").write_text(yaml.safe_dump(config))
    proc = podman(
        "run", "--rm", "--read-only", "--network", "none", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "--tmpfs", f"{SCRATCH}:rw,mode=1777", "-e", f"HOME={SCRATCH}", "-e", f"TMPDIR={SCRATCH}",
        "-e", f"KUBETUNE_CACHE_DIR={SCRATCH}/cache", "-e", "HF_HUB_OFFLINE=1",
        "-v", f"{assets}:/assets:ro", "-v", f"{tmp_path / 'config'}:/config:ro", "-v", f"{out}:/out",
        images["trainer"], "--config", "/config/trainer.yaml",
        check=False, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = out / "tiny"
    manifest = json.loads((run / "manifest.json").read_text())
    paths = {entry["path"] for entry in manifest["files"]}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= paths
    assert all(path.stat().st_uid == 10001 for path in run.rglob("*"))
