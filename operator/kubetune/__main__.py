"""`kubetune` command line: `crd [--check]`, `operator [--namespace NS ...]`, `selftest`,
`estimate -f FILE [--gpu-memory 80Gi] [--json]`, `pull NAME [-n NS] [--to DIR] [--print-serving]`,
`watch NAME`, `describe NAME`, `logs NAME [-f] [--rank N | --all]` (each with `-n NS`).
Installed also as the kubectl plugin `kubectl kubetune`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    prog = "kubectl kubetune" if Path(sys.argv[0]).name == "kubectl-kubetune" else "kubetune"
    parser = argparse.ArgumentParser(prog=prog, description="KubeTune: fine-tune LLMs on Kubernetes")
    sub = parser.add_subparsers(dest="command", required=True)

    crd = sub.add_parser("crd", help="write the generated CRD, its chart copy and docs/api.md")
    crd.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: cwd)")
    crd.add_argument("--check", action="store_true", help="fail if a committed generated file differs")

    op = sub.add_parser("operator", help="run the operator in the foreground (current kubeconfig)")
    op.add_argument("--namespace", "-n", action="append", default=[],
                    help="watch only this namespace (repeatable); all namespaces when omitted")

    test = sub.add_parser("selftest", help="check that a running operator reconciles (helm test)")
    test.add_argument("--namespace", "-n", default="default", help="namespace to create the test object in")
    test.add_argument("--timeout", type=float, default=120, help="seconds to wait for the operator")

    est = sub.add_parser("estimate", help="estimate the peak GPU memory of a FineTuneJob or trainer config; "
                                          "exit 1 when it does not fit")
    est.add_argument("-f", "--file", type=Path, required=True, help="FineTuneJob manifest or trainer config")
    est.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80Gi (default: the manifest's "
                                          "resources.gpuMemory or nvidia.com/gpu.memory node selector)")
    est.add_argument("--model-config", type=Path,
                     help="the backbone's config.json (or its directory) instead of reading model.source")
    est.add_argument("--world-size", type=int, help="training processes (default: the manifest's resources.gpus)")
    est.add_argument("--strategy", choices=["ddp", "fsdp"],
                     help="ddp replicates the model on every GPU, fsdp shards it (default: the manifest's "
                          "resources.distribution.strategy, or the config's distribution.strategy)")
    est.add_argument("--json", action="store_true", help="print the estimate as JSON (total in peakBytes)")
    est.add_argument("--data", type=Path, help="also count a local training data file with the backbone's "
                                               "tokenizer: samples, tokens per sample, truncation, steps")

    from kubetune import follow, pull

    pull.add_parser(sub)
    follow.add_parsers(sub)

    args = parser.parse_args(argv)
    if args.command == "pull":
        return pull.command(args)
    if args.command in ("watch", "describe", "logs"):
        return follow.command(args)
    if args.command == "estimate":
        return estimate_command(args)
    if args.command == "crd":
        from kubetune import crd as crd_module

        if args.check:
            stale = crd_module.drift(args.root)
            for path in stale:
                print(f"{path}: differs from the models; run `make crd` (kubetune crd)", file=sys.stderr)
            return 1 if stale else 0
        for path in crd_module.write(args.root):
            print(f"wrote {path}")
        return 0
    if args.command == "operator":
        from kubetune.handlers import run

        return run(namespaces=args.namespace)
    if args.command == "selftest":
        from kubetune.selftest import selftest

        return selftest(args.namespace, args.timeout)
    return 2


def estimate_command(args: argparse.Namespace) -> int:
    """`kubetune estimate`: 0 fits (or no GPU memory given), 1 does not fit, 2 bad input."""
    import json

    from pydantic import ValidationError

    from kubetune import preflight
    from kubetune_contract.estimate import ModelConfigError, ModelShape, estimate_run, parse_quantity

    try:
        run, processes, memory = preflight.load_run(args.file)
        if args.gpu_memory:
            memory = parse_quantity(args.gpu_memory)
        source = str(args.model_config) if args.model_config else run.model.source
        config = preflight.local_config(source)
        if config is None:
            config = preflight.credentialed_config(source, run.storage, run.model.revision)
        shape = ModelShape.from_config(config)
        world = args.world_size or processes
        strategy = args.strategy or preflight.run_strategy(run)
        if world < 1:
            raise ValueError("--world-size must be 1 or more")
        got = estimate_run(shape, run, world_size=world, strategy=strategy, gpu_memory=memory)
        counted = preflight.data_statistics(run, args.data, world) if args.data else None
    except ValidationError as err:
        print(f"{args.file}: invalid: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError, ModelConfigError, preflight.ConfigUnavailable) as err:
        print(f"kubetune estimate: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**got.as_json(), **({"dataset": counted[0]} if counted else {})}, indent=2))
    else:
        print("\n".join(got.lines()))
        if counted:
            print("\n".join(["data:", *counted[1]]))
        if got.fits is False:
            print(preflight.suggestions(run, world))
    return 1 if got.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
