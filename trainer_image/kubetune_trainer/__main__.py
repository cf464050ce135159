"""``python -m kubetune_trainer --config cfg.yaml [--set section.field=value ...]``
``python -m kubetune_trainer evaluate --config cfg.yaml --adapter <run>/adapter``: evaluate a published
adapter again (reevaluate.py), with the same exit codes.
``python -m kubetune_trainer pull --location <run> --to DIR [--manifest-sha256 HEX]``: download a
published run, every file checked against its manifest (serving init containers; docs/artifacts.md).

Exit codes (a contract: the operator's Job podFailurePolicy depends on them):

- 0: success; outputs published with their manifest.
- 3: invalid config or data (a missing column, an empty or unreadable file, a rejected field);
  retrying cannot help.
- 4: a source (model, tokenizer, dataset, output bucket, output.oci's registry) was not found or could not be reached
  (the object store: for the whole ``KUBETUNE_STORE_RETRY_SECONDS`` before this pod wrote to it).
- 5: the artifact store stopped answering after this pod had written to it and stayed away for
  ``KUBETUNE_STORE_RETRY_SECONDS``; the checkpoints are intact and a new pod resumes from them.
- 6: the accelerator ran out of memory; retrying the same settings cannot help (the message
  suggests int4, a smaller dataset.maxLength or training.batchSize, or more GPUs).
- 7: output.oci's registry answered when the run started, then stayed away for
  ``KUBETUNE_STORE_RETRY_SECONDS`` while the published run was pushed; a new pod pushes again.
- 1: anything else (a crash, a connection lost mid-run); worth retrying, and a retried run
  resumes from its newest complete checkpoint.
- 143: stopped by SIGTERM; inside the training loop a checkpoint of the current step is written
  first, so a retried run continues from there.

Logs go to stderr; the first ERROR line names the file and the field or column at fault.
Progress goes to stdout as JSON lines; the final summary (or the error) also goes to the
termination-message file (see ``report.py``).

Under torchrun (``RANK``/``WORLD_SIZE`` set) every process trains; only rank 0 prints and pushes
progress and writes the termination message.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .distributed import World, world_from_env
from .errors import EXIT_FAILED, EXIT_INVALID, EXIT_OK, RunFailed, TrainerError
from .report import Reporter, write_termination_message

CENSUS_ENV = "KUBETUNE_CENSUS_FILE"
"""Where rank 0 writes the memory census of the first steps (kubetune_trainer.census), when set."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    evaluate = bool(argv) and argv[0] == "evaluate"
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer" + (" evaluate" if evaluate else ""),
        description="Evaluate a published adapter again (evaluation.* of the config)." if evaluate else
        "Fine-tune a causal language model (LoRA, int8, int4 QLoRA or full).",
    )
    parser.add_argument("--config", required=True, help="trainer config file (YAML or JSON)")
    if evaluate:
        parser.add_argument("--adapter", required=True, help="the adapter of a published run: <run>/adapter")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set training.maxSteps=50 (repeatable)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv[1:] if evaluate else argv)
    args.evaluate = evaluate
    return args


def setup_logging(level: str, world: World) -> None:
    # No-op when the root logger already has handlers (embedding, tests): keep theirs.
    rank = f"[rank {world.rank}] " if world.distributed else ""
    logging.basicConfig(stream=sys.stderr, format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s")
    logging.getLogger().setLevel(level.upper())
    for noisy in ("urllib3", "httpx", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def describe_validation_error(path: str, err: Any) -> str:
    """One line per pydantic error, each naming the field by its camelCase path."""
    parts = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        parts.append(f"{field}: {item['msg']}")
    return f"{path}: invalid config: " + "; ".join(parts)


def pull_main(argv: list[str]) -> int:
    """``pull``: 0 when every file matched, 3 when the run is incomplete, altered or not the pinned one
    (or the target is not empty), 4 when the store cannot be reached."""
    from kubetune_contract.config import StorageSpec

    from .artifacts import IncompleteRun, pull_run

    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer pull",
        description="Download a published run into a new directory, every file checked against its manifest.json.")
    parser.add_argument("--location", required=True, help="the run: status.artifacts.location, or its OCI "
                                                          "artifact oci://status.artifacts.ociReference")
    parser.add_argument("--to", required=True, type=Path, help="directory to create (not a mount point itself)")
    parser.add_argument("--manifest-sha256", help="pin: the sha256 of the run's manifest.json (kubetune pull "
                                                  "prints it)")
    parser.add_argument("--include", action="append", default=[], help="only this file or directory (repeatable)")
    parser.add_argument("--endpoint", help="S3 endpoint host:port (credentials: AWS_ACCESS_KEY_ID and "
                                           "AWS_SECRET_ACCESS_KEY)")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to the endpoint or registry "
                                                                "(registry credentials: KUBETUNE_REGISTRY_AUTH)")
    parser.add_argument("--region", help="bucket region")
    args = parser.parse_args(argv)
    setup_logging("INFO", World())
    log = logging.getLogger("kubetune_trainer.pull")
    storage = StorageSpec(endpoint=args.endpoint, insecure=args.insecure, region=args.region)
    try:
        manifest = pull_run(args.location, args.to, storage, tuple(args.include), manifest_sha256=args.manifest_sha256,
                            insecure_registry=args.insecure)
    except (IncompleteRun, FileExistsError) as err:
        log.error("refused: %s; nothing was written to %s", err, args.to)
        return EXIT_INVALID
    except TrainerError as err:
        log.error("%s", err)
        return err.exit_code
    kept = [e for e in manifest["files"] if (args.to / e["path"]).is_file()]
    log.info("verified %d files (%d bytes) of %s in %s", len(kept), sum(int(e["size"]) for e in kept),
             args.location, args.to)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["pull"]:
        return pull_main(list(sys.argv[2:] if argv is None else argv[1:]))
    args = parse_args(argv)
    world = world_from_env()
    setup_logging(args.log_level, world)
    log = logging.getLogger("kubetune_trainer")

    import yaml
    from pydantic import ValidationError

    from kubetune_contract.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except ValidationError as err:
        return fail(log, describe_validation_error(args.config, err), EXIT_INVALID, world=world)
    except (OSError, ValueError, yaml.YAMLError) as err:  # unreadable file, YAML/JSON syntax, bad --set
        return fail(log, f"{args.config}: invalid config: {err}", EXIT_INVALID, world=world)

    from . import census
    from .train import Trainer

    # Only rank 0 reports: the other ranks' events would repeat its own.
    reporter = Reporter() if world.is_main else Reporter(url="", stream=open(os.devnull, "w"))  # noqa: SIM115
    trainer: Trainer | None = None
    if args.evaluate:
        return reevaluate(log, config, args.adapter, reporter, world)
    try:
        trainer = Trainer(config, reporter, world)
        if os.environ.get(CENSUS_ENV) and world.is_main:
            trainer.after_step = census.recorder(Path(os.environ[CENSUS_ENV]))
        result = trainer.run()
    except RunFailed as err:
        code = fail(log, str(err), err.exit_code, trainer, reporter, world=world)
        world.leave_together()
        return code
    except TrainerError as err:
        return fail(log, str(err), err.exit_code, trainer, reporter, world=world)
    except KeyboardInterrupt:
        return fail(log, "interrupted", EXIT_FAILED, trainer, reporter, world=world)
    except Exception as err:
        log.exception("training failed: %s: %s", type(err).__name__, err)
        return fail(log, f"{type(err).__name__}: {err}", EXIT_FAILED, trainer, reporter, logged=True, world=world)
    finally:
        if trainer is not None:
            trainer.close()
    if not world.is_main:
        reporter.close()
        return EXIT_OK
    summary = {"type": "summary", **result.summary}
    reporter.emit(summary, record=False)
    reporter.close()
    write_termination_message(result.summary)
    log.info("done: %s", result.summary["artifacts"]["location"])
    return EXIT_OK


def reevaluate(log: logging.Logger, config: Any, adapter: str, reporter: Reporter, world: World) -> int:
    """The evaluate command: evaluate a published adapter, print and record the summary."""
    from .reevaluate import evaluate_adapter

    try:
        summary = evaluate_adapter(config, adapter, world)
    except RunFailed as err:
        code = fail(log, str(err), err.exit_code, reporter=reporter, world=world)
        world.leave_together()
        return code
    except TrainerError as err:
        return fail(log, str(err), err.exit_code, reporter=reporter, world=world)
    except Exception as err:
        log.exception("evaluation failed: %s: %s", type(err).__name__, err)
        return fail(log, f"{type(err).__name__}: {err}", EXIT_FAILED, reporter=reporter, logged=True, world=world)
    finally:
        from . import distributed

        distributed.shutdown()
    if world.is_main:
        reporter.emit({"type": "summary", **summary}, record=False)
        write_termination_message(summary)
    reporter.close()
    return EXIT_OK


def fail(
    log: logging.Logger,
    message: str,
    code: int,
    trainer: Any = None,
    reporter: Reporter | None = None,
    logged: bool = False,
    world: World | None = None,
) -> int:
    """Log the error, report it, write it to the termination message (rank 0); return the exit code."""
    if not logged:
        log.error("%s", message)
    summary: dict[str, Any] = {"error": message, "exitCode": code}
    if trainer is not None:
        summary["step"] = trainer.progress.step
        summary["totalSteps"] = trainer.progress.total_steps
    if reporter is not None:
        reporter.emit({"type": "failed", **summary}, record=False)
        reporter.close()
    if world is None or world.is_main:
        write_termination_message(summary)
    return code


if __name__ == "__main__":
    sys.exit(main())
