"""CPU benchmark of the trainer on the tiny local backbone against a transformers.Trainer baseline.

    python -m hack.bench_trainer [--steps 30] [--warmup-steps 15] [--repeat 1] [--modes none,int8,int4]

Each mode runs the KubeTune trainer (``python -m kubetune_trainer``) and the practitioners'
baseline (``hack/baseline_trainer.py``: transformers.Trainer + peft) on the same config, each in its
own process, so the peak resident memory is that side's own. Prints tokens/s over the steps after
the warm-up, peak memory, the ratios KubeTune / baseline and whether the targets (at least the
baseline's tokens/s, at most its peak memory) are met; asserts nothing about absolute speed.
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
TOKENS_TARGET = 1.0
"""KubeTune tokens/s at least this times the baseline's."""
MEMORY_TARGET = 1.0
"""KubeTune peak memory at most this times the baseline's."""


def write_config(config: dict[str, Any], work: Path, name: str) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_env(work: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "KUBETUNE_CACHE_DIR": str(work / "cache"), **extra}
    env.pop("KUBETUNE_REPORT_URL", None)
    return env


def run_json(command: list[str], result: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``command`` (stdout discarded); the JSON object it wrote to ``result``, with its wall time,
    or {"error": ...} when it failed (its stderr's tail is printed)."""
    started = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": f"exit {proc.returncode}", "wallSeconds": time.perf_counter() - started}
    found: dict[str, Any] = json.loads(result.read_text())
    found["wallSeconds"] = time.perf_counter() - started
    return found


def run_trainer(config: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """Run the trainer CLI on ``config``; return its summary (from the termination message)."""
    cfg_path = write_config(config, work, name)
    summary_path, census_path = work / f"{name}.summary.json", work / f"{name}.census.json"
    summary = run_json([sys.executable, "-m", "kubetune_trainer", "--config", str(cfg_path)], summary_path,
                       run_env(work, KUBETUNE_TERMINATION_LOG=str(summary_path), KUBETUNE_CENSUS_FILE=str(census_path)))
    return with_census(summary, census_path)


def with_census(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """The result with the memory census of its first steps (kubetune_trainer.census), when written."""
    return {**result, "census": json.loads(path.read_text())} if path.is_file() else result


def kubetune_result(summary: dict[str, Any]) -> dict[str, Any]:
    """The KubeTune side of a comparison: tokens/s of its last progress report, which covers the
    steps since the report before it (the warm-up's end when logEverySteps is the warm-up), and the
    run's peak memory."""
    if "error" in summary:
        return summary
    events = [json.loads(line) for line in
              (Path(summary["artifacts"]["location"]) / "metrics.jsonl").read_text().splitlines() if line]
    reports = [e for e in events if e.get("type") == "progress" and e["step"] > 0]
    last = reports[-1]
    first = reports[-2]["step"] + 1 if len(reports) > 1 else 1
    return {
        "side": "kubetune",
        "window": {"firstStep": first, "lastStep": last["step"]},
        "tokensPerSecond": last["tokensPerSecond"],
        "peakMemoryBytes": summary["metrics"]["peakMemoryBytes"],
        "evalLoss": summary["metrics"]["evalLoss"],
        "trainLoss": summary["metrics"]["trainLoss"],
        "wallSeconds": summary["wallSeconds"],
        "evaluationSeconds": (summary.get("evaluation") or {}).get("seconds"),
        **({"census": summary["census"]} if "census" in summary else {}),
    }


def run_baseline(config: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """Run hack/baseline_trainer.py (transformers.Trainer + peft) on ``config``; return its result."""
    cfg_path = write_config(config, work, f"{name}.baseline")
    out, census_path = work / f"{name}.baseline.json", work / f"{name}.baseline.census.json"
    result = run_json([sys.executable, str(HERE / "baseline_trainer.py"), "--config", str(cfg_path), "--out", str(out),
                       "--census", str(census_path)], out, run_env(work))
    return with_census(result, census_path)


def compare(config: dict[str, Any], work: Path, name: str, repeat: int = 1) -> dict[str, dict[str, Any]]:
    """Both sides on ``config``, one process each, ``repeat`` times in turn: {"kubetune": ...,
    "baseline": ...}, each the median run by tokens/s (every run under "runs")."""
    runs: dict[str, list[dict[str, Any]]] = {"kubetune": [], "baseline": []}
    for i in range(1, repeat + 1):
        # A run of its own name each time: the same name would resume from the last run's checkpoint.
        suffix = "" if repeat == 1 else f"-{i}"
        run_config = {**config, "runName": config["runName"] + suffix}
        runs["kubetune"].append(kubetune_result(run_trainer(run_config, work, name + suffix)))
        runs["baseline"].append(run_baseline(run_config, work, name + suffix))
    return {side: median_run(results) for side, results in runs.items()}


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median tokens/s (the first failure, if any run failed), with every run's
    tokens/s and peak memory under "runs"."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(results, key=lambda r: r["tokensPerSecond"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    if len(results) > 1:
        median["runs"] = [{k: r[k] for k in ("tokensPerSecond", "peakMemoryBytes")} for r in results]
    return median


def check_warmup(steps: int, warmup: int | None) -> int:
    """The warm-up length (default: half the steps). The KubeTune trainer's last progress report
    covers the steps since the one before; with logEverySteps = warm-up ≥ steps / 2, that is exactly
    the steps after the warm-up."""
    warmup = (steps + 1) // 2 if warmup is None else warmup
    if not 1 <= warmup < steps or 2 * warmup < steps:
        raise SystemExit(f"--warmup-steps {warmup}: must be at least half of --steps {steps} and less than it")
    return warmup


def print_comparison(rows: list[tuple[str, dict[str, dict[str, Any]]]], memory_label: str, unit: str) -> None:
    """A Markdown table: tokens/s and peak memory of both sides, KubeTune / baseline, targets."""
    scale = {"MiB": 2**20, "GiB": 2**30}[unit]
    digits = 0 if unit == "MiB" else 2

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def speed_of(side: dict[str, Any]) -> str:
        """tokens/s, and the range over the runs when there were several."""
        text = f"{side['tokensPerSecond']:,.0f}"
        if "runs" in side:
            speeds = [run["tokensPerSecond"] for run in side["runs"]]
            text += f" [{min(speeds):,.0f}-{max(speeds):,.0f}]"
        return text

    print(f"| mode | steps timed | tokens/s KubeTune | tokens/s baseline | ratio (target >= {TOKENS_TARGET:.1f}x) "
          f"| {memory_label} KubeTune | {memory_label} baseline | ratio (target <= {MEMORY_TARGET:.1f}x) "
          f"| eval loss KubeTune / baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, sides in rows:
        kt, base = sides["kubetune"], sides["baseline"]
        failed = [f"{side}: {r['error']}" for side, r in sides.items() if "error" in r]
        if failed:
            print(f"| {mode} | failed ({'; '.join(failed)}) | | | | | | | |")
            continue
        window = kt["window"]
        steps = f"{window['firstStep']}-{window['lastStep']}"
        if window != {k: base["window"][k] for k in ("firstStep", "lastStep")}:
            steps += f" (baseline {base['window']['firstStep']}-{base['window']['lastStep']})"
        speed = kt["tokensPerSecond"] / base["tokensPerSecond"]
        memory = kt["peakMemoryBytes"] / base["peakMemoryBytes"]
        peaks = [f"{side['peakMemoryBytes'] / scale:,.{digits}f} {unit}" for side in (kt, base)]
        print(
            f"| {mode} | {steps} | {speed_of(kt)} | {speed_of(base)} "
            f"| {speed:.2f}x {verdict(speed >= TOKENS_TARGET)} | {peaks[0]} | {peaks[1]} "
            f"| {memory:.2f}x {verdict(memory <= MEMORY_TARGET)} "
            f"| {kt['evalLoss']:.3f} / {base['evalLoss']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, help="steps left out of tokens/s (default: half of --steps)")
    parser.add_argument("--modes", default="none,int8,int4")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per side and mode, taken in turn; the table shows the median by tokens/s")
    args = parser.parse_args()
    warmup = check_warmup(args.steps, args.warmup_steps)
    from devcluster import tiny

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
                             "logEverySteps": warmup, "gradientCheckpointing": False},
                "lora": {"r": 8, "alpha": 16},
                "quantization": mode,
                "output": {"location": str(work / "out")},
            }
            rows.append((mode, compare(config, work, mode, args.repeat)))
        import torch

        print(f"tiny Llama backbone on the CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}), "
              f"{args.steps} steps of batch 8, tokens/s over the steps after a {warmup}-step warm-up"
              f"{f', median [range] of {args.repeat} runs' if args.repeat > 1 else ''}; "
              "baseline: transformers.Trainer + peft, same config")
        print_comparison(rows, "peak RSS", "MiB")


if __name__ == "__main__":
    main()
