"""output.oci against a real CNCF distribution registry: a run's artifact pushed by tag, resolved and
pulled by digest, every file checked; a taken tag, altered blobs and re-pushes refused; a registry
with a password; a registry stopped for 60 s mid-push."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_contract.config import OciSpec
from kubetune_trainer import oci
from kubetune_trainer.artifacts import IncompleteRun, LocalStore, publish, pull_run
from kubetune_trainer.errors import (
    EXIT_REGISTRY_UNAVAILABLE,
    EXIT_SOURCE_UNAVAILABLE,
    InvalidInput,
    RegistryUnavailable,
    SourceUnavailable,
)
from kubetune_trainer.report import Reporter
from kubetune_trainer.sources import sha256_of
from kubetune_trainer.train import Trainer
from tests.support.trainer import RegistryServer, make_config, registry_binary

pytestmark = pytest.mark.trainer

FILES = {
    "adapter/adapter_model.safetensors": b"\x00weights" * 40_000,
    "adapter/adapter_config.json": b'{"r": 8}',
    "README.md": b"# run\n",
    "evaluation.json": b'{"metrics": {}}\n',
    "metrics.jsonl": b'{"step": 1}\n',
    "checkpoints/step-2/state.pt": b"state",
}
PUSHED = ["README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "evaluation.json",
          "manifest.json"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = RegistryServer(registry_binary(), tmp_path_factory.mktemp("registry"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def published(root: Path, name: str, files: dict[str, bytes] = FILES) -> tuple[Path, dict[str, Any], str]:
    """A run published to a local store: (its staging directory, its manifest, its location)."""
    staging = root / f"{name}-staging"
    for path, content in files.items():
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_bytes(content)
    store = LocalStore(root / "runs" / name)
    manifest = publish(staging, store, lineage={"configSha256": "c" * 64})
    return staging, manifest, store.uri


def push(server: RegistryServer, repository: str, staging: Path, manifest: dict[str, Any], run: str,
         tag: str = "v1", overwrite: bool = False, auth: str | None = None) -> oci.Reference:
    spec = OciSpec(repository=f"{server.endpoint}/{repository}", tag=tag, overwrite=overwrite, insecure=True)
    registry = oci.Registry(spec.repository, True, auth, retry_seconds=5)
    registry.check_tag(tag, run, overwrite)
    return oci.push(registry, spec, staging, manifest, run, "2026-12-08T00:00:00Z")


def get(url: str, accept: str = oci.MANIFEST_MEDIA_TYPE) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}), timeout=10) as response:
        return bytes(response.read())


def tag_digest(server: RegistryServer, repository: str, tag: str) -> str:
    return "sha256:" + hashlib.sha256(get(f"http://{server.endpoint}/v2/{repository}/manifests/{tag}")).hexdigest()


def test_a_pushed_run_resolves_by_digest_and_pulls_verified(registry: RegistryServer, tmp_path: Path) -> None:
    staging, manifest, run = published(tmp_path, "a")
    ref = push(registry, "team/adapters", staging, manifest, run)
    assert ref.digest is not None and str(ref) == f"{registry.endpoint}/team/adapters@{ref.digest}"
    assert tag_digest(registry, "team/adapters", "v1") == ref.digest

    body = get(f"http://{registry.endpoint}/v2/team/adapters/manifests/{ref.digest}")
    assert "sha256:" + hashlib.sha256(body).hexdigest() == ref.digest
    document = json.loads(body)
    assert document["artifactType"] == oci.ARTIFACT_TYPE
    assert document["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert [layer["annotations"][oci.TITLE] for layer in document["layers"]] == PUSHED, \
        "the adapter, model card, evaluation and manifest; no metrics, no checkpoints"
    types = {layer["annotations"][oci.TITLE]: layer["mediaType"] for layer in document["layers"]}
    assert types["manifest.json"] == "application/vnd.kubetune.manifest.v1+json"
    assert types["README.md"] == "text/markdown"
    assert types["adapter/adapter_model.safetensors"] == oci.FILE_MEDIA_TYPE
    assert document["annotations"][oci.RUN_ANNOTATION] == run
    assert document["annotations"]["org.opencontainers.image.created"] == "2026-12-08T00:00:00Z"

    pinned = sha256_of(staging / "manifest.json")
    pulled = pull_run(f"oci://{ref}", tmp_path / "pulled", manifest_sha256=pinned, insecure_registry=True)
    assert pulled["lineage"] == {"configSha256": "c" * 64}
    for path in PUSHED[:-1]:
        assert (tmp_path / "pulled" / path).read_bytes() == FILES[path]
    assert not (tmp_path / "pulled" / "metrics.jsonl").exists()


def test_a_taken_tag_is_refused_before_training_unless_overwrite(registry: RegistryServer, tmp_path: Path) -> None:
    staging_a, manifest_a, run_a = published(tmp_path, "a")
    first = push(registry, "team/taken", staging_a, manifest_a, run_a)
    staging_b, manifest_b, run_b = published(tmp_path, "b", {**FILES, "README.md": b"# another run\n"})
    with pytest.raises(InvalidInput) as refused:
        oci.Registry(f"{registry.endpoint}/team/taken", True, None, retry_seconds=5).check_tag("v1", run_b, False)
    assert "output.oci.tag" in str(refused.value) and "overwrite" in str(refused.value)
    assert first.digest is not None and first.digest in str(refused.value)
    assert tag_digest(registry, "team/taken", "v1") == first.digest, "the tag still names the first run"

    # A retry of the run that pushed it may push again; overwrite: true replaces it.
    oci.Registry(f"{registry.endpoint}/team/taken", True, None, retry_seconds=5).check_tag("v1", run_a, False)
    second = push(registry, "team/taken", staging_b, manifest_b, run_b, overwrite=True)
    assert second.digest != first.digest and tag_digest(registry, "team/taken", "v1") == second.digest
    # The first artifact is still there by digest.
    pull_run(f"oci://{first}", tmp_path / "first", insecure_registry=True)
    assert (tmp_path / "first" / "README.md").read_bytes() == FILES["README.md"]


def blob_file(server: RegistryServer, digest: str) -> Path:
    hexdigest = digest.removeprefix("sha256:")
    return server.root / "data" / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def test_an_altered_blob_is_refused_and_nothing_is_written(registry: RegistryServer, tmp_path: Path) -> None:
    files = {**FILES, "adapter/adapter_model.safetensors": b"\x01other weights" * 20_000}
    staging, manifest, run = published(tmp_path, "a", files)
    ref = push(registry, "team/altered", staging, manifest, run)
    weights = "sha256:" + sha256_of(staging / "adapter/adapter_model.safetensors")
    stored = blob_file(registry, weights)
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF  # the registry's disk changed under it
    stored.write_bytes(bytes(data))
    with pytest.raises(IncompleteRun, match=r"adapter/adapter_model\.safetensors"):
        pull_run(f"oci://{ref}", tmp_path / "pulled", insecure_registry=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-staging", "runs"], "no partial directory is left"


def test_a_tampered_repush_under_the_tag_is_refused_by_the_jobs_pin(registry: RegistryServer, tmp_path: Path) -> None:
    staging, manifest, run = published(tmp_path, "a")
    original = push(registry, "team/repushed", staging, manifest, run)
    pinned = sha256_of(staging / "manifest.json")  # status.artifacts.manifestSha256

    # Someone re-pushes the tag: other weights, the run's own manifest.json copied in.
    forged = tmp_path / "forged"
    for path in PUSHED:
        (forged / path).parent.mkdir(parents=True, exist_ok=True)
        (forged / path).write_bytes((staging / path).read_bytes())
    (forged / "adapter/adapter_model.safetensors").write_bytes(b"\x02backdoor" * 40_000)
    tampered = push(registry, "team/repushed", forged, manifest, "s3://elsewhere", overwrite=True)
    assert tag_digest(registry, "team/repushed", "v1") == tampered.digest
    with pytest.raises(IncompleteRun, match=r"adapter/adapter_model\.safetensors"):
        pull_run(f"oci://{tampered}", tmp_path / "pulled", manifest_sha256=pinned, insecure_registry=True)

    # With a manifest.json rewritten to match, the pin refuses it.
    rewritten = publish(forged, LocalStore(tmp_path / "forged-run"))
    tampered = push(registry, "team/repushed", forged, rewritten, "s3://elsewhere", overwrite=True)
    with pytest.raises(IncompleteRun, match="pinned"):
        pull_run(f"oci://{tampered}", tmp_path / "pulled", manifest_sha256=pinned, insecure_registry=True)
    assert not (tmp_path / "pulled").exists()

    # The job's digest still gives the job's files.
    pull_run(f"oci://{original}", tmp_path / "pulled", manifest_sha256=pinned, insecure_registry=True)
    assert (tmp_path / "pulled/adapter/adapter_model.safetensors").read_bytes() == FILES[
        "adapter/adapter_model.safetensors"]


def docker_config(server: RegistryServer, user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {f"http://{server.endpoint}": {"auth": token}}})


def test_credentials_come_from_a_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = RegistryServer(registry_binary(), tmp_path / "server", user="team", password="s3cret-Pa55")
    server.start()
    try:
        staging, manifest, run = published(tmp_path, "a")
        repository = f"{server.endpoint}/team/private"
        for auth, field in ((None, "no credentials"), (docker_config(server, "team", "wrong"), "refused"),
                            (json.dumps({"auths": {"elsewhere.io": {"auth": "eDp5"}}}), "no credentials")):
            with pytest.raises(InvalidInput, match=r"output\.oci\.secretRef") as refused:
                oci.Registry(repository, True, auth, retry_seconds=5).check_tag("v1", run, False)
            assert field in str(refused.value) and "wrong" not in str(refused.value)
        with pytest.raises(InvalidInput, match="not JSON") as refused:
            oci.Registry(repository, True, "{s3cret-Pa55", retry_seconds=5)
        assert "s3cret" not in str(refused.value)

        auth = docker_config(server, "team", "s3cret-Pa55")
        ref = push(server, "team/private", staging, manifest, run, auth=auth)
        with pytest.raises(InvalidInput, match=r"output\.oci\.secretRef"):
            pull_run(f"oci://{ref}", tmp_path / "anonymous", insecure_registry=True)
        monkeypatch.setenv("KUBETUNE_REGISTRY_AUTH", auth)
        pull_run(f"oci://{ref}", tmp_path / "pulled", insecure_registry=True)
        assert (tmp_path / "pulled/adapter/adapter_config.json").read_bytes() == FILES["adapter/adapter_config.json"]
    finally:
        server.stop()


def test_a_registry_that_stays_away_fails_with_its_own_exit_code(tmp_path: Path) -> None:
    server = RegistryServer(registry_binary(), tmp_path / "server")
    repository = f"{server.endpoint}/team/away"
    with pytest.raises(SourceUnavailable, match=r"output\.oci\.repository") as never:
        oci.Registry(repository, True, None, retry_seconds=1).check_tag("v1", "run", False)
    assert never.value.exit_code == EXIT_SOURCE_UNAVAILABLE, "a registry that never answered fails the job"
    server.start()
    staging, manifest, run = published(tmp_path, "a")
    registry = oci.Registry(repository, True, None, retry_seconds=2)
    registry.check_tag("v1", run, False)
    server.stop()
    with pytest.raises(RegistryUnavailable) as away:
        oci.push(registry, OciSpec(repository=repository, tag="v1", insecure=True), staging, manifest, run, None)
    assert away.value.exit_code == EXIT_REGISTRY_UNAVAILABLE


@pytest.mark.slow
def test_a_run_whose_registry_stops_for_60_s_mid_push_succeeds_and_reports_the_digest(
        assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (tiny) training run with output.oci; the registry stops after the first blob and comes
    back 60 s later: the run waits it out (KUBETUNE_STORE_RETRY_SECONDS, default 300) and succeeds."""
    server = RegistryServer(registry_binary(), tmp_path / "server")
    server.start()
    upload = oci.Registry.upload
    back = threading.Event()
    uploads: list[str] = []

    def stop_after_the_first_blob(registry: oci.Registry, path: Path, layer: dict[str, Any]) -> None:
        upload(registry, path, layer)
        uploads.append(layer["annotations"].get(oci.TITLE, "config") if "annotations" in layer else "config")
        if len(uploads) == 1:
            server.stop()
            threading.Thread(target=lambda: (back.wait(60), server.start()), daemon=True).start()

    monkeypatch.setattr(oci.Registry, "upload", stop_after_the_first_blob)
    try:
        config = make_config(assets, tmp_path / "out", training={"maxSteps": 2},
                             output={"oci": {"repository": f"{server.endpoint}/team/run", "tag": "tiny",
                                             "insecure": True}})
        summary = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run().summary["artifacts"]
        assert uploads[0] == "README.md" and uploads[-2:] == ["manifest.json", "config"], uploads
        run = tmp_path / "out" / "tiny"
        assert summary["manifestSha256"] == sha256_of(run / "manifest.json")
        assert summary["ociReference"] == f"{server.endpoint}/team/run@{summary['ociDigest']}"
        assert tag_digest(server, "team/run", "tiny") == summary["ociDigest"]
        pull_run(f"oci://{summary['ociReference']}", tmp_path / "pulled", manifest_sha256=summary["manifestSha256"],
                 insecure_registry=True)
        assert (tmp_path / "pulled/adapter/adapter_model.safetensors").read_bytes() == (
            run / "adapter/adapter_model.safetensors").read_bytes()
    finally:
        server.stop()
