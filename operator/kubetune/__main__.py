"""`kubetune` command line: `crd [--check]`, `operator [--namespace NS ...]`, `selftest`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune", description="KubeTune: fine-tune LLMs on Kubernetes")
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

    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
