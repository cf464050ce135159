"""`kubetune estimate` and the operator's GPU memory check before a Job is created."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api, preflight
from kubetune.__main__ import main
from kubetune_contract.config import StorageSpec
from tests.support.faults import HostileConfigServer as Hostile

MODELS = Path(__file__).resolve().parent / "models"


def manifest(tmp_path: Path, quantization: str, model: str = "llama-70b", **resources: Any) -> Path:
    job = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "big"},
        "spec": {
            "model": {"source": str(MODELS / model)},
            "dataset": {"train": "s3://data/train.jsonl", "maxLength": 2048},
            "training": {"batchSize": 1, "gradientAccumulation": 16, "optimizer": "paged_adamw_8bit"},
            "lora": {"r": 16, "targetModules": ["all-linear"]},
            "quantization": quantization,
            "output": {"location": "s3://runs/"},
            "resources": {"gpus": 1, **resources},
        },
    }
    path = tmp_path / "job.yaml"
    # A manifest file may hold other objects too (a PVC first, as in examples/).
    path.write_text(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "PersistentVolumeClaim"}, job]))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["estimate", *args])
    return code, capsys.readouterr().out


@pytest.mark.parametrize(("quantization", "memory", "fits"), [("int4", "24Gi", False), ("int4", "80Gi", True),
                                                               ("none", "80Gi", False)])
def test_70b_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str], quantization: str, memory: str,
                  fits: bool) -> None:
    code, out = run_cli(capsys, "-f", str(manifest(tmp_path, quantization)), "--gpu-memory", memory)
    assert code == (0 if fits else 1), out
    for line in ("weights", "trained parameters + gradients + optimizer", "activations", "logits and loss",
                 "allocator overhead", "required per GPU"):
        assert line in out
    assert ("fits" if fits else "does NOT fit") in out
    assert "70.55B parameters" in out
    if not fits:
        assert "to fit, try" in out


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "-f", str(manifest(tmp_path, "int4")), "--gpu-memory", "80Gi", "--json")
    assert code == 0
    got = json.loads(out)
    assert got["fits"] is True and got["gpuMemoryBytes"] == 80 * 1024**3
    assert 40 * 1024**3 < got["peakBytes"] < got["requiredBytes"] < 80 * 1024**3
    assert got["peakBytes"] == pytest.approx(sum(got["breakdown"].values()), abs=8)
    assert got["settings"]["quantization"] == "int4" and got["settings"]["maxLength"] == 2048


def test_gpu_memory_from_the_manifest_and_no_verdict_without_one(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "-f", str(manifest(tmp_path, "int4", gpuMemory="24Gi")))
    assert code == 1 and "24.00 GiB: does NOT fit" in out
    code, out = run_cli(capsys, "-f", str(manifest(tmp_path, "int4")))
    assert code == 0 and "fit" not in out.split("required per GPU")[1]


def test_trainer_config_and_model_config_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": "hf://meta-llama/Llama-3.1-8B"},  # not read: --model-config wins
        "dataset": {"train": "data.jsonl", "maxLength": 1024},
        "training": {"batchSize": 2},
        "quantization": "int4",
        "output": {"location": str(tmp_path / "out")},
    }))
    code, out = run_cli(capsys, "-f", str(config), "--model-config", str(MODELS / "llama-8b" / "config.json"),
                        "--gpu-memory", "24Gi", "--json")
    assert code == 0
    assert json.loads(out)["settings"]["microBatch"] == 2


def test_world_size_and_fsdp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(manifest(tmp_path, "none"))
    code, _ = run_cli(capsys, "-f", path, "--gpu-memory", "80Gi", "--world-size", "8", "--strategy", "ddp")
    assert code == 1  # DDP replicates 131 GiB of bf16 weights on every GPU
    code, out = run_cli(capsys, "-f", path, "--gpu-memory", "80Gi", "--world-size", "8", "--strategy", "fsdp")
    assert code == 0, out


@pytest.mark.parametrize(("change", "error"), [
    ({"model": {"source": "/nonexistent/model"}}, "no such file"),
    ({"quantization": "int3"}, "invalid"),
])
def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any],
                           error: str) -> None:
    path = manifest(tmp_path, "int4")
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[1]["spec"].update(change)
    path.write_text(yaml.safe_dump_all(docs))
    assert main(["estimate", "-f", str(path), "--gpu-memory", "80Gi"]) == 2
    assert error in capsys.readouterr().err


def test_bad_gpu_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "-f", str(manifest(tmp_path, "int4")), "--gpu-memory", "lots"]) == 2
    assert "lots" in capsys.readouterr().err


def spec(tmp_path: Path, quantization: str, **resources: Any) -> api.FineTuneJobSpec:
    docs = list(yaml.safe_load_all(manifest(tmp_path, quantization, **resources).read_text()))
    return api.FineTuneJobSpec.model_validate(docs[1]["spec"], context={api.LOCAL_SOURCES: True})


def test_gpu_memory_field_and_node_label(tmp_path: Path) -> None:
    assert preflight.gpu_memory(spec(tmp_path, "int4", gpuMemory="80Gi")) == (80 * 1024**3, "resources.gpuMemory")
    labelled = spec(tmp_path, "int4").model_copy(update={"scheduling": api.SchedulingSpec(
        node_selector={"nvidia.com/gpu.memory": "81559"})})
    assert preflight.gpu_memory(labelled) == (81559 * 1024**2, "node label nvidia.com/gpu.memory=81559 (MiB)")
    assert preflight.gpu_memory(spec(tmp_path, "int4")) is None
    with pytest.raises(ValueError, match="gpuMemory"):
        spec(tmp_path, "int4", gpuMemory="0Gi")


def read_fixture(source: str, storage: StorageSpec, revision: str | None) -> dict[str, Any]:
    return json.loads((Path(source) / "config.json").read_text())


def test_check_job(tmp_path: Path) -> None:
    wont = preflight.check_job(spec(tmp_path, "none", gpuMemory="80Gi"), StorageSpec(), fetch=read_fixture)
    assert wont is not None and wont.outcome == "wontfit"
    assert "does not fit in 80.0 GiB (resources.gpuMemory)" in wont.message
    assert "quantization int4 (now none)" in wont.message
    fits = preflight.check_job(spec(tmp_path, "int4", gpuMemory="80Gi"), StorageSpec(), fetch=read_fixture)
    assert fits is not None and fits.outcome == "fits"
    # Nothing to check: GPU memory unknown, or a CPU job.
    assert preflight.check_job(spec(tmp_path, "none"), StorageSpec(), fetch=read_fixture) is None
    cpu = spec(tmp_path, "none", gpuMemory="80Gi")
    cpu.resources.gpus = 0
    assert preflight.check_job(cpu, StorageSpec(), fetch=read_fixture) is None


@pytest.mark.parametrize(("strategy", "fits"), [("ddp", False), ("fsdp", True)])
def test_the_job_strategy_decides_the_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str], strategy: str,
                                               fits: bool) -> None:
    # 70B in bf16 on 8 GPUs of 80 GiB: ddp holds every weight on each GPU, fsdp an eighth of them.
    path = manifest(tmp_path, "none", gpus=8, gpuMemory="80Gi", distribution={"strategy": strategy})
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[1]["spec"]["training"]["optimizer"] = "adamw"
    path.write_text(yaml.safe_dump_all(docs))
    local = api.FineTuneJobSpec.model_validate(docs[1]["spec"], context={api.LOCAL_SOURCES: True})
    verdict = preflight.check_job(local, StorageSpec(),
                                  fetch=read_fixture)
    assert verdict is not None and verdict.outcome == ("fits" if fits else "wontfit"), verdict
    assert verdict.estimate is not None and verdict.estimate.settings.strategy == strategy
    code, out = run_cli(capsys, "-f", str(path))  # no --strategy: the manifest's
    assert code == (0 if fits else 1), out


def test_check_job_skips_a_config_it_cannot_read(tmp_path: Path) -> None:
    skipped = preflight.check_job(spec(tmp_path, "none", gpuMemory="80Gi"), StorageSpec())
    assert skipped is not None and skipped.outcome == "skipped"
    assert "cannot read a local source" in skipped.message


def test_anonymous_urls() -> None:
    storage = StorageSpec(endpoint="minio.local:9000", insecure=True)
    assert preflight.anonymous_url("s3://models/tiny/", storage, None) == "http://minio.local:9000/models/tiny/config.json"
    assert preflight.anonymous_url("s3://models", StorageSpec(), None) == "https://s3.amazonaws.com/models/config.json"
    assert preflight.anonymous_url("hf://Qwen/Qwen2.5-0.5B", storage, "v1.0") == \
        "https://huggingface.co/Qwen/Qwen2.5-0.5B/resolve/v1.0/config.json"


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server serving tmp_path (stands in for a public bucket)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        server.server_close()


def test_remote_config_over_http(http_root: tuple[str, Path]) -> None:
    endpoint, root = http_root
    (root / "models" / "big").mkdir(parents=True)
    (root / "models" / "big" / "config.json").write_text((MODELS / "llama-70b" / "config.json").read_text())
    storage = StorageSpec(endpoint=endpoint, insecure=True)
    assert preflight.remote_config("s3://models/big", storage, None)["hidden_size"] == 8192
    with pytest.raises(preflight.ConfigUnavailable, match="HTTP 404"):
        preflight.remote_config("s3://models/missing", storage, None)


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    yield server
    server.close()


def fetch_from(hostile: Hostile, name: str, deadline: float = 1.0) -> dict[str, Any]:
    url = preflight.anonymous_url(f"s3://m/{name}", StorageSpec(endpoint=hostile.endpoint, insecure=True), None)
    return preflight.http_get_json(url, deadline=deadline)


@pytest.mark.parametrize("name", ["drip", "drip-headers"])
def test_a_dripping_server_cannot_hold_the_fetch_past_its_deadline(hostile: Hostile, name: str) -> None:
    # Each byte arrives within any per-read timeout; only a deadline on the whole fetch ends it. The
    # server drips until the test ends, so a fetch without one would still be reading after 30 s.
    errors: list[Exception] = []

    def fetch() -> None:
        try:
            fetch_from(hostile, name, deadline=1.0)
        except Exception as err:
            errors.append(err)

    reader = threading.Thread(target=fetch, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "the fetch is still reading from the dripping server"
    assert len(errors) == 1 and isinstance(errors[0], preflight.ConfigUnavailable)
    assert "no complete answer within 1s" in str(errors[0])


@pytest.mark.parametrize(("name", "reason"), [
    ("redirect", "HTTP 302 redirect, not followed"),
    ("nested", "nested too deeply"),
    ("huge-int", "not JSON"),
    ("big", "larger than 1048576"),
    ("endless", "larger than 1048576"),
])
def test_hostile_answers_are_refused_with_a_reason(hostile: Hostile, name: str, reason: str) -> None:
    with pytest.raises(preflight.ConfigUnavailable, match=reason):
        fetch_from(hostile, name, deadline=5.0)
    if name == "redirect":
        assert hostile.requests == ["/m/redirect/config.json"]  # the target was never asked


def hostile_spec(tmp_path: Path, name: str, endpoint: str) -> tuple[api.FineTuneJobSpec, StorageSpec]:
    job = spec(tmp_path, "int4", gpuMemory="80Gi")
    job.model.source = f"s3://m/{name}"
    return job, StorageSpec(endpoint=endpoint, insecure=True)


@pytest.mark.parametrize(("name", "reason"), [
    ("huge-dims", "hidden_size is larger than 2147483648"),
    ("huge-int", "not JSON"),
    ("nested", "nested too deeply"),
    ("redirect", "redirect, not followed"),
])
def test_check_job_skips_hostile_configs_with_a_reason(tmp_path: Path, hostile: Hostile, name: str,
                                                       reason: str) -> None:
    job, storage = hostile_spec(tmp_path, name, hostile.endpoint)
    verdict = preflight.check_job(job, storage)
    assert verdict is not None and verdict.outcome == "skipped" and reason in verdict.message


def test_estimates_run_off_the_caller_and_hand_out_each_verdict_once(tmp_path: Path, hostile: Hostile) -> None:
    estimates = preflight.Estimates(workers=2)

    # Built here, one at a time: spec() writes one manifest file per test.
    jobs = {name: hostile_spec(tmp_path, name, hostile.endpoint) for name in ("drip", "drip-headers", "tiny")}

    def work(name: str) -> preflight.Verdict | None:
        job, storage = jobs[name]
        return preflight.check_job(job, storage, fetch=lambda s, st, r: preflight.http_get_json(
            preflight.anonymous_url(s, st, r), deadline=2.0))

    finished = {name: threading.Event() for name in ("drip", "drip-headers", "tiny")}
    for name in finished:
        got = estimates.check(name, lambda n=name: work(n), on_done=finished[name].set)  # type: ignore[misc]
        assert got is preflight.PENDING  # at once: the caller never waits on the network
    assert finished["tiny"].wait(10), "the third check runs once a worker is free"
    tiny = estimates.check("tiny", lambda: None)
    assert tiny is not None and tiny.outcome == "fits"
    assert estimates.check("tiny", lambda: None) == tiny  # kept: a retry does not read again
    estimates.forget("tiny")
    assert estimates.check("tiny", lambda: None) is preflight.PENDING  # forgotten: a new check starts
    assert finished["drip"].wait(10)
    drip = estimates.check("drip", lambda: None)
    assert drip is not None and drip.outcome == "skipped" and "no complete answer within 2s" in drip.message


def test_a_failing_check_is_a_skipped_estimate() -> None:
    estimates = preflight.Estimates(workers=1)
    finished = threading.Event()

    def boom() -> preflight.Verdict | None:
        raise RecursionError("deep")

    assert estimates.check("x", boom, on_done=finished.set) is preflight.PENDING
    assert finished.wait(5)
    got = estimates.check("x", boom)
    assert got is not None and got.outcome == "skipped" and "RecursionError: deep" in got.message


def test_forget_drops_every_generation_of_a_job() -> None:
    estimates = preflight.Estimates(workers=1)
    done = [threading.Event(), threading.Event()]
    for generation in (1, 2):
        estimates.check(("uid", generation), lambda: None, on_done=done[generation - 1].set)
    assert all(d.wait(5) for d in done)
    assert estimates.check(("uid", 2), lambda: preflight.Verdict("fits", "x")) is None  # the kept verdict: None
    estimates.forget("uid")
    assert estimates.check(("uid", 1), lambda: None) is preflight.PENDING
