"""CPU benchmark of the trainer on the tiny local backbone: tokens/s and peak RSS per quantization.

    python hack/bench_trainer.py [--steps 30] [--modes none,int8,int4]

Each mode runs the real trainer (``python -m kubetune_trainer``) in its own process, so the peak
resident memory is that mode's own. Prints figures; asserts nothing about absolute speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run_trainer(config: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """Run the trainer CLI on ``config``; return its summary (from the termination message)."""
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    summary_path = work / f"{name}.summary.json"
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(summary_path), "KUBETUNE_CACHE_DIR": str(work / "cache")}
    env.pop("KUBETUNE_REPORT_URL", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(cfg_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": f"exit {proc.returncode}", "wallSeconds": time.perf_counter() - started}
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    summary["wallSeconds"] = time.perf_counter() - started
    return summary


def print_table(rows: list[tuple[str, dict[str, Any]]], memory_label: str) -> None:
    print(f"{'mode':<10} {'tokens/s':>10} {memory_label:>16} {'final loss':>11} {'eval loss':>10} {'wall s':>8}")
    for mode, s in rows:
        if "error" in s:
            print(f"{mode:<10} {'failed: ' + s['error']:>10}")
            continue
        m = s["metrics"]
        print(
            f"{mode:<10} {m['tokensPerSecond'] or 0:>10.0f} {m['peakMemoryBytes'] / 2**20:>13.0f} MiB "
            f"{m['trainLoss']:>11.3f} {m['evalLoss']:>10.3f} {s['wallSeconds']:>8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", default="none,int8,int4")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import tiny

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        tiny.build_tiny_backbone(work / "backbone")
        tiny.write_dataset(work / "train.jsonl", 512, seed=0)
        tiny.write_dataset(work / "validation.jsonl", 16, seed=1)
        rows = []
        for mode in args.modes.split(","):
            config = {
                "runName": mode,
                "model": {"source": str(work / "backbone")},
                "dataset": {"train": str(work / "train.jsonl"), "validation": str(work / "validation.jsonl"),
                            "maxLength": 32},
                "training": {"maxSteps": args.steps, "batchSize": 8, "learningRate": 0.01,
                             "evalEverySteps": args.steps, "checkpointEverySteps": args.steps,
                             "gradientCheckpointing": False},
                "lora": {"r": 8, "alpha": 16},
                "quantization": mode,
                "output": {"location": str(work / "out")},
            }
            rows.append((mode, run_trainer(config, work, mode)))
        print(f"tiny Llama backbone on the CPU, {args.steps} steps, batch 8, torch threads {os.cpu_count()}")
        print_table(rows, "peak RSS")


if __name__ == "__main__":
    main()
