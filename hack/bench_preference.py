"""CPU benchmark of preference tuning: KubeTune's dpo vs its sft on the same data, and vs TRL's
DPOTrainer on the same model and settings.

    python -m hack.bench_preference [--steps 40]

A random-weight Llama of hidden size 256 and 4 layers with the tiny tokenizer (devcluster/tiny.py),
256 prompt/chosen/rejected rows of the tiny tasks (sft trains on prompt/chosen), LoRA r8 on all
linear layers, 8 pairs per step (sft: 8 samples, and 16 for the same sequences per forward pass),
maxLength 64, fp32, no gradient checkpointing. Each
run is its own process, so its peak resident memory is its own. Training tokens per second count the
sequences' tokens without padding (a pair: both sequences), over the training steps only (KubeTune's
tokensPerSecond; TRL: its num_tokens over train_runtime). Asserts nothing: the figures go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devcluster import tiny

REPO = Path(__file__).resolve().parents[1]


def assets(root: Path) -> Path:
    if not (root / "backbone" / "config.json").exists():
        tiny.build_tiny_backbone(root / "backbone", hidden_size=256, layers=4, heads=8, pretrain_steps=0)
    rows = tiny.make_preference_rows(256, seed=0)
    tiny.write_rows(root / "pairs.jsonl", rows)
    tiny.write_rows(root / "sft.jsonl", [{"prompt": r["prompt"], "answer": r["chosen"]} for r in rows])
    return root


def kubetune_run(root: Path, method: str, steps: int, batch: int = 8) -> dict[str, Any]:
    from kubetune_contract.config import TrainerConfig
    from kubetune_trainer.report import Reporter
    from kubetune_trainer.train import Trainer

    data = root / ("sft.jsonl" if method == "sft" else "pairs.jsonl")
    config = TrainerConfig.model_validate({
        "runName": method, "model": {"source": str(root / "backbone")},
        "dataset": {"train": str(data), "maxLength": 64},
        "training": {"method": method, "maxSteps": steps, "batchSize": batch, "learningRate": 0.001,
                     "precision": "fp32", "gradientCheckpointing": False, "evalEverySteps": steps,
                     "checkpointEverySteps": steps, "logEverySteps": steps},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "output": {"location": str(root / "out")},
        "evaluation": {"maxSamples": 1, "maxNewTokens": 1, "compareBase": False},
    })
    summary = Trainer(config, Reporter(root / f"metrics-{method}.jsonl")).run().summary
    return {"tokens_per_second": summary["metrics"]["tokensPerSecond"]}


def trl_run(root: Path, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(root / "backbone"))
    model = AutoModelForCausalLM.from_pretrained(str(root / "backbone"), dtype=torch.float32)
    args = DPOConfig(output_dir=str(root / "trl"), report_to=[], use_cpu=True, bf16=False, max_steps=steps,
                     per_device_train_batch_size=8, learning_rate=0.001, max_length=64, logging_steps=steps,
                     save_strategy="no", gradient_checkpointing=False, beta=0.1, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    began = time.perf_counter()
    output = trainer.train()
    seconds = output.metrics.get("train_runtime") or time.perf_counter() - began
    return {"tokens_per_second": trainer._total_train_tokens / seconds}


def one(root: Path, name: str, steps: int) -> None:
    if name == "trl-dpo":
        result = trl_run(root, steps)
    else:
        result = kubetune_run(root, name.split("-")[0], steps, 16 if name == "sft-16" else 8)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.root, args.one, args.steps)
        return
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-pref-") as tmp:
        root = assets(Path(tmp))
        results = {}
        for name in ("sft", "sft-16", "dpo", "trl-dpo"):
            done = subprocess.run([sys.executable, "-m", "hack.bench_preference", "--one", name, "--root", str(root),
                                   "--steps", str(args.steps)], capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "OMP_NUM_THREADS": "2"})
            if done.returncode != 0:
                raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'run':<10} {'tokens/s':>10} {'peak RSS (MiB)':>15}")
    for name, result in results.items():
        print(f"{name:<10} {result['tokens_per_second']:>10.0f} {result['peak_rss_bytes'] / 2**20:>15.0f}")
    peak = {name: result["peak_rss_bytes"] for name, result in results.items()}
    speed = {name: result["tokens_per_second"] for name, result in results.items()}
    print(f"dpo / sft peak: {peak['dpo'] / peak['sft']:.3f} (same batchSize), {peak['dpo'] / peak['sft-16']:.3f} "
          f"(same sequences per pass); KubeTune dpo / TRL DPOTrainer tokens/s {speed['dpo'] / speed['trl-dpo']:.2f}")


if __name__ == "__main__":
    main()
