"""GPU check: bf16 LoRA, int8 LoRA and int4 QLoRA on a real CUDA card, through the real trainer,
beside a transformers.Trainer + peft baseline.

    python -m hack.gpu_check [--steps 20] [--warmup-steps 10] [--layers 16] [--hidden 4096]
                             [--modes bf16,int8,int4,auto,dpo] [--out DIR]

Builds a Llama-architecture backbone from a config (random weights, saved in bf16; nothing is
downloaded): by default the 3.55B shape of ../shared/measurements/h200-2026-11-27.json (16 layers,
hidden 4096; about 5 minutes on one H100 or H200 in all) and a tokenizer trained locally. Then, per
mode, it runs ``python -m kubetune_trainer`` and the baseline (``hack/baseline_trainer.py``) on the
same config with packed 512-token blocks, each in its own process, so peak GPU memory is that side's
own. It prints tokens/s over the steps after the warm-up and peak GPU memory of both sides, the
ratios KubeTune / baseline and whether the targets are met (at least the baseline's tokens/s, at
most its peak memory: reported, not asserted), and the estimator's peak beside each measured
KubeTune one (kubetune_contract.estimate), and the time the KubeTune runs spent evaluating (tuned
and backbone answers to the 32 validation prompts) as a share of the run. With ``--out`` it writes
the same figures, and each side's memory census of its first three steps (kubetune_trainer.census),
to ``DIR/gpu_check.json``.

Mode ``dpo`` runs the KubeTune trainer alone on preference pairs of long synthetic rows (a prompt of
about 3/4 of ``--max-length``, answers of 1/8): bf16 LoRA ``dpo`` at 4 pairs per step beside ``sft``
on the prompts and chosen answers at 4 and at 8 samples per step (8 sequences per forward pass, as
the pairs): tokens/s and peak memory of each, and dpo's peak over sft's.

Mode ``auto`` is a short bf16 LoRA run with ``batchSize: auto`` through the KubeTune trainer alone
(the baseline has no such choice): the micro-batch it chose, its tokens/s and peak beside the
estimate. Exits non-zero when a mode fails on either side or, on a GPU, when the KubeTune trainer's
quantized modes do not use less GPU memory than its bf16 mode. ``--allow-cpu`` runs it all on the
CPU at a tiny shape (tests/trainer/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hack.bench_trainer import (
    check_warmup,
    compare,
    kubetune_result,
    print_comparison,
    run_env,
    with_census,
    write_config,
)


def build_backbone(out: Path, layers: int, hidden: int, device: str, vocab: int = 32000) -> int:
    """A random-weight Llama (bf16) with the tiny tokenizer; returns the parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from devcluster import tiny

    tiny.build_tokenizer(out)

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=vocab,  # 32000: a realistic embedding/LM-head cost; the tokenizer uses the first ids only
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
        model.to(torch.bfloat16)
    params = int(sum(p.numel() for p in model.parameters()))
    model.save_pretrained(str(out))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def estimated_peak(config: dict[str, Any], backbone: Path) -> int:
    """The estimator's peak GPU memory for a mode's config (what `kubetune estimate` would print)."""
    from kubetune_contract.config import TrainerConfig
    from kubetune_contract.estimate import RunSettings, estimate, read_shape

    return estimate(read_shape(backbone), RunSettings.from_run(TrainerConfig.model_validate(config))).peak


def preference_runs(work: Path, steps: int, warmup: int, max_length: int = 512) -> dict[str, Any]:
    """bf16 LoRA dpo (4 pairs per step) beside sft on the same prompts and chosen answers (4 and 8
    samples per step), through the KubeTune trainer alone: each run's tokens/s and peak memory."""
    import random

    from devcluster import tiny

    rng = random.Random(0)
    words = tiny.WORDS + sorted(tiny.CAPITALS)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [{"prompt": text(3 * max_length // 4), "chosen": text(max_length // 8), "rejected": text(max_length // 8)}
            for _ in range(512)]
    tiny.write_rows(work / "pairs.jsonl", rows)
    tiny.write_rows(work / "chosen.jsonl", [{"prompt": r["prompt"], "answer": r["chosen"]} for r in rows])
    results: dict[str, Any] = {}
    for name, method, batch in (("dpo", "dpo", 4), ("sft", "sft", 4), ("sft-8", "sft", 8)):
        config = {
            "runName": name, "model": {"source": str(work / "backbone")},
            "dataset": {"train": str(work / ("chosen.jsonl" if method == "sft" else "pairs.jsonl")),
                        "maxLength": max_length, "template": "plain"},
            "training": {"method": method, "maxSteps": steps, "batchSize": batch, "learningRate": 2e-4,
                         "precision": "bf16", "gradientCheckpointing": True, "evalEverySteps": steps,
                         "checkpointEverySteps": steps, "logEverySteps": warmup},
            "lora": {"r": 16, "alpha": 32},
            "evaluation": {"maxSamples": 1, "maxNewTokens": 1, "compareBase": False},
            "output": {"location": str(work / "out")},
        }
        summary_path = work / f"{name}.summary.json"
        command = [sys.executable, "-m", "kubetune_trainer", "--config", str(write_config(config, work, name))]
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=run_env(work, KUBETUNE_TERMINATION_LOG=str(summary_path)))
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            results[name] = {"error": f"exit {proc.returncode}"}
            continue
        results[name] = kubetune_result({**json.loads(summary_path.read_text()), "wallSeconds": None})
    return results


def auto_batch_run(work: Path, steps: int, max_length: int = 512) -> dict[str, Any]:
    """A short bf16 LoRA run with batchSize auto (the KubeTune trainer only): its result, the
    micro-batch it chose (from its log) and its config."""
    config = {
        "runName": "auto",
        "model": {"source": str(work / "backbone")},
        "dataset": {"train": str(work / "train.jsonl"), "validation": str(work / "validation.jsonl"),
                    "maxLength": max_length},
        "training": {"maxSteps": steps, "batchSize": "auto", "globalBatchSize": 16, "learningRate": 2e-4,
                     "packing": True, "precision": "bf16", "gradientCheckpointing": True,
                     "evalEverySteps": steps, "checkpointEverySteps": steps, "logEverySteps": max(1, steps // 2)},
        "lora": {"r": 16, "alpha": 32},
        "output": {"location": str(work / "out")},
    }
    summary_path, census_path = work / "auto.summary.json", work / "auto.census.json"
    command = [sys.executable, "-m", "kubetune_trainer", "--config", str(write_config(config, work, "auto"))]
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=run_env(work, KUBETUNE_TERMINATION_LOG=str(summary_path),
                                      KUBETUNE_CENSUS_FILE=str(census_path)))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": f"exit {proc.returncode}", "config": config}
    summary = with_census({**json.loads(summary_path.read_text()), "wallSeconds": None}, census_path)
    chosen = re.findall(r"batch size (\d+) per device", proc.stderr)  # the trainer's "training: ..." line
    return {**kubetune_result(summary), "microBatch": int(chosen[-1]) if chosen else None, "config": config}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, help="steps left out of tokens/s (default: half of --steps)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--modes", default="bf16,int8,int4,auto,dpo")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-length", type=int, default=512, help="tokens per packed block")
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test this script without a GPU")
    args = parser.parse_args()
    warmup = check_warmup(args.steps, args.warmup_steps)

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    from devcluster import tiny

    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-check-") as tmp:
        work = Path(tmp)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        params = build_backbone(work / "backbone", args.layers, args.hidden, device, args.vocab)
        tiny.write_dataset(work / "train.jsonl", args.train_samples, seed=0)
        tiny.write_dataset(work / "validation.jsonl", 32, seed=1)
        rows: list[tuple[str, dict[str, dict[str, Any]]]] = []
        estimates: dict[str, int] = {}
        auto: dict[str, Any] = {}
        preference: dict[str, Any] = {}
        for mode in args.modes.split(","):
            if mode == "dpo":
                preference = preference_runs(work, args.steps, warmup, args.max_length)
                continue
            if mode == "auto":
                auto = auto_batch_run(work, min(args.steps, 6), args.max_length)
                estimates[mode] = estimated_peak(auto.pop("config"), work / "backbone")
                continue
            config = {
                "runName": mode,
                "model": {"source": str(work / "backbone")},
                "dataset": {"train": str(work / "train.jsonl"), "validation": str(work / "validation.jsonl"),
                            "maxLength": args.max_length},
                "training": {"maxSteps": args.steps, "batchSize": 8, "learningRate": 2e-4, "packing": True,
                             "precision": "bf16", "gradientCheckpointing": True,
                             "optimizer": "paged_adamw_8bit" if mode != "bf16" else "adamw",
                             "evalEverySteps": args.steps, "checkpointEverySteps": args.steps,
                             "logEverySteps": warmup},
                "lora": {"r": 16, "alpha": 32},
                "quantization": "none" if mode == "bf16" else mode,
                # the default evaluation on the 32 validation prompts: its share of the run, on the GPU
                "evaluation": {"maxSamples": 32, "maxNewTokens": 64},
                "output": {"location": str(work / "out")},
            }
            rows.append((mode, compare(config, work, mode)))
            estimates[mode] = estimated_peak(config, work / "backbone")
        device = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke test)"
        print(f"{device}: Llama {params / 1e9:.2f}B params ({args.layers} layers, hidden {args.hidden}), "
              f"{args.steps} steps, batch 8 x 512 tokens (packed), LoRA r=16, gradient checkpointing; tokens/s over "
              f"the steps after a {warmup}-step warm-up; baseline: transformers.Trainer + peft, same config")
        print_comparison(rows, "peak GPU mem" if torch.cuda.is_available() else "peak RSS", "GiB")
        for mode, sides in rows:
            measured = sides["kubetune"].get("peakMemoryBytes")
            if measured:
                print(f"{mode}: estimated peak {estimates[mode] / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB "
                      f"({estimates[mode] / measured - 1:+.1%}; kubetune_contract.estimate)")
            spent, wall = sides["kubetune"].get("evaluationSeconds"), sides["kubetune"].get("wallSeconds")
            if spent is not None and wall:
                print(f"{mode}: evaluation (32 prompts, tuned and base, up to 64 new tokens) {spent:.1f}s of the "
                      f"run's {wall:.1f}s ({spent / wall:.0%})")
        if auto:
            measured = auto.get("peakMemoryBytes")
            print(f"auto: batchSize auto chose micro-batch {auto.get('microBatch')}, {auto.get('tokensPerSecond')} "
                  f"tokens/s, peak {measured / 2**30 if measured else float('nan'):.2f} GiB, estimated "
                  f"{estimates['auto'] / 2**30:.2f} GiB" if "error" not in auto else f"auto: {auto['error']}")
        for name, result in preference.items():
            print(f"{name}: {result.get('tokensPerSecond')} tokens/s, peak "
                  f"{(result.get('peakMemoryBytes') or 0) / 2**30:.2f} GiB" if "error" not in result
                  else f"{name}: {result['error']}")
        if all("error" not in preference.get(n, {"error": 1}) for n in ("dpo", "sft", "sft-8")):
            dpo, sft, sft8 = (preference[n]["peakMemoryBytes"] for n in ("dpo", "sft", "sft-8"))
            print(f"dpo peak / sft peak: {dpo / sft:.3f} at the same batchSize, {dpo / sft8:.3f} at the same "
                  "sequences per forward pass (target: at most 1.1; no second model)")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_check.json").write_text(json.dumps(
                {"device": device, "parameters": params, "shape": {"layers": args.layers, "hidden": args.hidden},
                 "steps": args.steps, "warmupSteps": warmup, "results": dict(rows), "auto": auto,
                 "preference": preference,
                 "estimatedPeakBytes": estimates}, indent=2))
    failed = [f"{mode} ({side})" for mode, sides in rows for side, r in sides.items() if "error" in r]
    failed += ["auto"] if "error" in auto else []
    failed += [name for name, result in preference.items() if "error" in result]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    peak = {mode: sides["kubetune"]["peakMemoryBytes"] for mode, sides in rows}
    if not torch.cuda.is_available():
        return 0  # on the CPU the peaks are RSS, which quantization does not lower
    if "bf16" in peak and any(peak[m] >= peak["bf16"] for m in ("int8", "int4") if m in peak):
        print(f"quantized modes should need less GPU memory than bf16: {peak}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
