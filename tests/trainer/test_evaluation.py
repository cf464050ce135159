"""Evaluation after training (evaluation.py): tuned vs base on a task the tiny backbone really learns,
the metrics as the libraries compute them on predictions.jsonl, the same results from one process or
two, re-evaluation of a published adapter, and the judge metric against a test double."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.metrics.bleu import BLEU

from kubetune_trainer.__main__ import main
from kubetune_trainer.artifacts import verify_manifest
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config, tiny_config

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]
LEARNED = {"maxSteps": 120, "evalEverySteps": 60, "checkpointEverySteps": 120}
"""Enough steps for the tiny backbone to learn the capitals and most reversals."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def learned_run(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that learned the task, with a gate it meets; its published directory."""
    out = tmp_path_factory.mktemp("learned")
    config = make_config(assets, out / "out", training=LEARNED, evaluation={
        "maxNewTokens": 8, "batchSize": 5,
        "gate": {"rules": [{"metric": "exactMatch", "minImprovement": 0.2}, {"metric": "perplexity", "max": 20}]},
    })
    result = Trainer(config, Reporter(out / "metrics.jsonl")).run()
    (out / "summary.json").write_text(json.dumps(result.summary))
    return out / "out" / "tiny"


def test_the_tuned_model_beats_the_backbone_and_the_metrics_are_the_libraries_own(learned_run: Path) -> None:
    evaluation = json.loads((learned_run / "evaluation.json").read_text())
    metrics = evaluation["metrics"]
    assert metrics["exactMatch"]["tuned"] > metrics["exactMatch"]["base"]
    assert metrics["bleu"]["tuned"] > metrics["bleu"]["base"]
    assert metrics["rouge"]["tuned"] > metrics["rouge"]["base"]
    assert metrics["perplexity"]["tuned"] < metrics["perplexity"]["base"]
    assert evaluation["gate"]["passed"] is True, evaluation["gate"]
    assert evaluation["headline"].startswith("perplexity ")

    # The plumbing, not the libraries: the values are sacrebleu's and rouge-score's on predictions.jsonl.
    rows = read_jsonl(learned_run / "predictions.jsonl")
    assert len(rows) == 16 and {"prompt", "reference", "tuned", "base", "scores"} <= set(rows[0])
    references = [r["reference"] for r in rows]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for model in ("tuned", "base"):
        answers = [r[model] for r in rows]
        bleu = BLEU(effective_order=True).corpus_score(answers, [references]).score
        rouge = sum(scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references, strict=True)) / 16
        exact = sum(a == r for a, r in zip(answers, references, strict=True)) / 16
        assert metrics["bleu"][model] == pytest.approx(bleu, abs=1e-5)
        assert metrics["rouge"][model] == pytest.approx(rouge, abs=1e-5)
        assert metrics["exactMatch"][model] == pytest.approx(exact, abs=1e-5)
        for row in rows:
            assert row["scores"]["bleu"][model] == pytest.approx(
                sacrebleu.sentence_bleu(row[model], [row["reference"]]).score)
    exact = metrics["exactMatch"]
    assert exact["delta"] == pytest.approx(exact["tuned"] - exact["base"])


def test_the_evaluation_is_published_in_the_manifest_the_summary_and_the_model_card(learned_run: Path) -> None:
    files = {f["path"] for f in verify_manifest(str(learned_run))["files"]}
    assert {"evaluation.json", "predictions.jsonl", "README.md"} <= files
    summary = json.loads((learned_run.parents[1] / "summary.json").read_text())
    evaluation = json.loads((learned_run / "evaluation.json").read_text())
    assert summary["evaluation"]["metrics"]["exactMatch"] == {**evaluation["metrics"]["exactMatch"]}
    card = (learned_run / "README.md").read_text()
    assert "## Evaluation" in card and "| exactMatch |" in card and "Promotion gate: passed" in card
    assert len(json.dumps(summary)) < 4096  # the termination message's limit


def evaluate_command(config: Path, adapter: Path) -> list[str]:
    return ["-m", "kubetune_trainer", "evaluate", "--config", str(config), "--adapter", str(adapter)]


def test_two_processes_give_the_answers_and_metrics_of_one(assets: Path, learned_run: Path, tmp_path: Path) -> None:
    """Re-evaluating the same adapter: every batch is generated as a single process would, on either rank."""
    outputs = {}
    for processes in (1, 2):
        config = tiny_config(assets, tmp_path / f"p{processes}", training=LEARNED,
                             evaluation={"maxNewTokens": 8, "batchSize": 3})
        path = tmp_path / f"p{processes}.json"
        path.write_text(json.dumps(config))
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        done = subprocess.run([*launcher, *evaluate_command(path, learned_run / "adapter")], capture_output=True,
                              text=True, timeout=600, cwd=REPO)
        assert done.returncode == 0, done.stderr[-4000:]
        outputs[processes] = tmp_path / f"p{processes}" / "tiny"
    one, two = (json.loads((outputs[p] / "evaluation.json").read_text()) for p in (1, 2))
    assert read_jsonl(outputs[1] / "predictions.jsonl") == read_jsonl(outputs[2] / "predictions.jsonl")
    for metric, result in one["metrics"].items():
        for key in ("tuned", "base"):
            assert two["metrics"][metric][key] == pytest.approx(result[key], rel=1e-5), metric
    # and the published adapter evaluates as it did at the end of training
    trained = json.loads((learned_run / "evaluation.json").read_text())
    assert [r["tuned"] for r in read_jsonl(outputs[1] / "predictions.jsonl")] == \
        [r["tuned"] for r in read_jsonl(learned_run / "predictions.jsonl")]
    assert one["metrics"]["perplexity"]["tuned"] == pytest.approx(trained["metrics"]["perplexity"]["tuned"], rel=1e-4)
    verify_manifest(str(outputs[2]))


def test_reevaluation_refuses_an_adapter_that_does_not_match_its_manifest(
        assets: Path, learned_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(learned_run, copy)
    (copy / "adapter" / "adapter_model.safetensors").write_bytes(b"tampered")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(tiny_config(assets, tmp_path / "again")))
    assert main(["evaluate", "--config", str(config), "--adapter", str(copy / "adapter")]) == 3
    assert "adapter/adapter_model.safetensors has size 8" in caplog.text
    assert not (tmp_path / "again").exists()


# -- the judge ----------------------------------------------------------------------------------


class JudgeDouble(ThreadingHTTPServer):
    """A TEST DOUBLE of an OpenAI-compatible chat-completions endpoint (no judge model runs here):
    ``reply`` is what it answers; ``hang`` keeps each request open until the test ends."""

    reply = "7"
    hang = False
    keys: list[str]
    released: threading.Event


class JudgeHandler(BaseHTTPRequestHandler):
    server: JudgeDouble

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length))
        self.server.keys.append(self.headers.get("Authorization", ""))
        assert "Reference answer" in body["messages"][0]["content"]
        if self.server.hang:
            self.server.released.wait(30)
            return
        answer = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": self.server.reply}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_double() -> Iterator[JudgeDouble]:
    server = JudgeDouble(("127.0.0.1", 0), JudgeHandler)
    server.keys, server.released = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("mode", "unavailable"), [
    ("scores", None),
    ("hangs", "did not answer within 1s (0 retries)"),
    ("garbage", "is not a score from 0 to 10"),
])
def test_the_judge_scores_or_is_unavailable_with_a_reason_and_the_run_succeeds(
        mode: str, unavailable: str | None, assets: Path, tmp_path: Path, judge_double: JudgeDouble,
        monkeypatch: pytest.MonkeyPatch) -> None:
    judge_double.hang = mode == "hangs"
    judge_double.reply = "I'd say 7 out of 10, nice" if mode == "garbage" else "7"
    monkeypatch.setenv("KUBETUNE_JUDGE_API_KEY", "judge-secret-key")
    url = f"http://127.0.0.1:{judge_double.server_address[1]}/v1"
    config = make_config(assets, tmp_path / "out", training={"maxSteps": 2}, evaluation={
        "metrics": ["exactMatch", "judge"], "maxSamples": 3, "maxNewTokens": 4,
        "judge": {"url": url, "model": "grader", "timeoutSeconds": 1, "maxRetries": 0}})
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    judged = result.summary["evaluation"]["metrics"]["judge"]
    run = tmp_path / "out" / "tiny"
    if unavailable is None:
        assert judged["tuned"] == 7.0 and judged["base"] == 7.0 and judged["samples"] == 3
        assert judge_double.keys == ["Bearer judge-secret-key"] * 6  # 3 tuned answers, 3 base answers
        assert all(r["scores"]["judge"] == {"tuned": 7.0, "base": 7.0} for r in read_jsonl(run / "predictions.jsonl"))
    else:
        assert judged.get("tuned") is None and unavailable in judged["unavailable"], judged
        assert result.summary["evaluation"]["metrics"]["exactMatch"]["samples"] == 3
    verify_manifest(str(run))
    for path in run.rglob("*"):
        if path.is_file():
            assert b"judge-secret-key" not in path.read_bytes(), path


def test_running_out_of_memory_while_generating_loses_nothing_but_the_answer_metrics(
        assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter is trained: an out-of-memory in generation leaves those metrics unavailable, says
    what to lower, and the run publishes and succeeds (it is not retried or failed)."""
    import torch

    from kubetune_trainer import evaluation

    def exhausted(*args: Any, **kwargs: Any) -> int:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evaluation, "generate_batches", exhausted)
    config = make_config(assets, tmp_path / "out", training={"maxSteps": 2})
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    metrics = result.summary["evaluation"]["metrics"]
    for name in ("bleu", "rouge", "exactMatch"):
        assert metrics[name]["unavailable"].startswith("out of memory generating the answers (CUDA out of memory")
        assert "lower evaluation.batchSize or evaluation.maxNewTokens" in metrics[name]["unavailable"]
        assert "tuned" not in metrics[name]
    assert metrics["perplexity"]["tuned"] > 0 and metrics["perplexity"]["base"] > 0
    run = tmp_path / "out" / "tiny"
    assert (run / "predictions.jsonl").read_text() == ""
    assert "adapter/adapter_model.safetensors" in {f["path"] for f in verify_manifest(str(run))["files"]}
