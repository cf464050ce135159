"""CPU benchmark of the evaluation after training: its share of the run, and generation with and
without the KV cache.

    python -m hack.bench_evaluation [--repeat 2]

Runs the trainer in this process on the quickstart's settings (examples/quickstart.yaml: the tiny
backbone, 256 training and 32 validation rows, 300 steps) and on the trainer benchmark's (60 steps,
hack/bench_trainer.py), with the default evaluation (perplexity, BLEU, ROUGE-L, exact match; tuned
and backbone; up to 64 new tokens); times the whole run and the evaluation in it. Then generates the
answers to the validation prompts with the trained model, KV cache on and off, and prints the new
tokens per second of each. Asserts nothing: the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from devcluster.seed_demo import build_assets

REPO = Path(__file__).resolve().parents[1]


def quickstart_config(assets: Path, out: Path) -> dict[str, Any]:
    """examples/quickstart.yaml's training sections, with local sources."""
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())["spec"]
    sections = {k: spec[k] for k in ("dataset", "training", "lora", "quantization")}
    sections["dataset"] = {**sections["dataset"], "train": str(assets / "data" / "train.jsonl"),
                           "validation": str(assets / "data" / "validation.jsonl")}
    return {"runName": "quickstart", "model": {"source": str(assets / "backbone")}, **sections,
            "output": {"location": str(out)}}


def bench_config(assets: Path, out: Path) -> dict[str, Any]:
    """hack/bench_trainer.py's settings: 60 steps, batch 8, maxLength 32."""
    config = quickstart_config(assets, out)
    config["runName"] = "bench"
    config["dataset"]["maxLength"] = 32
    config["training"] = {"maxSteps": 60, "batchSize": 8, "learningRate": 0.003, "evalEverySteps": 30,
                          "checkpointEverySteps": 60, "gradientCheckpointing": False}
    return config


def timed_run(config: dict[str, Any], work: Path) -> dict[str, Any]:
    """One trainer run in this process: the run's and the evaluation's wall time."""
    from kubetune_contract.config import TrainerConfig
    from kubetune_trainer import evaluation
    from kubetune_trainer.report import Reporter
    from kubetune_trainer.train import Trainer

    spent: list[float] = []
    evaluate = evaluation.evaluate

    def timed(*args: Any, **kwargs: Any) -> evaluation.Result:
        started = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    evaluation.evaluate = timed
    try:
        started = time.perf_counter()
        with open(os.devnull, "w") as quiet:  # the progress lines: only the report goes to stdout
            result = Trainer(TrainerConfig.model_validate(config), Reporter(work / "metrics.jsonl", url="",
                                                                            stream=quiet)).run()
        total = time.perf_counter() - started
    finally:
        evaluation.evaluate = evaluate
    return {"runSeconds": round(total, 2), "evaluationSeconds": round(spent[0], 2),
            "share": round(spent[0] / total, 3), "evaluation": result.summary["evaluation"]["metrics"],
            "model": result.model, "tokenizer": result.tokenizer, "config": TrainerConfig.model_validate(config)}


def generation_speed(run: dict[str, Any], assets: Path, use_cache: bool) -> dict[str, float]:
    from kubetune_trainer import data, distributed, evaluation

    config = run["config"]
    examples = data.load_examples(assets / "data" / "validation.jsonl", config.dataset)
    model = run["model"]
    model.eval()
    answers = evaluation.generate_answers(model, run["tokenizer"], config, examples, model.device,
                                          distributed.World(), sharded=False, use_cache=use_cache)
    return {"newTokens": answers.new_tokens, "seconds": round(answers.seconds, 3),
            "tokensPerSecond": round(answers.new_tokens / answers.seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-eval-") as tmp:
        work = Path(tmp)
        assets = build_assets(work / "assets")
        report: dict[str, Any] = {}
        for name, make in (("quickstart", quickstart_config), ("bench", bench_config)):
            runs = []
            for i in range(args.repeat):
                run = timed_run(make(assets, work / f"{name}-{i}"), work)
                speeds = {cache: generation_speed(run, assets, cache == "on") for cache in ("on", "off")}
                runs.append({k: v for k, v in run.items() if k not in ("model", "tokenizer", "config")}
                            | {"generation": speeds})
            report[name] = runs
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
