"""``python -m kubetune_trainer.launch [torchrun options] -m kubetune_trainer --config cfg.yaml``

torchrun itself, with one difference: when a worker fails, torchrun exits with 1 whatever the
worker's exit code was, which would erase the trainer's exit-code contract (3: invalid input,
4/5: store, 6: out of memory, 143: SIGTERM). This launcher runs torchrun's own agent in-process
and exits with the exit code of the first worker that failed (128 + N for a worker killed by
signal N), so a Job's podFailurePolicy sees what the trainer meant.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("kubetune_trainer.launch")


def exit_code_of(worker_exit_code: int) -> int:
    """A worker's exit code as a shell reports it: 128 + N for death by signal N."""
    return 128 - worker_exit_code if worker_exit_code < 0 else worker_exit_code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)  # type: ignore[no-untyped-call]
    try:
        run(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = exit_code_of(failure.exitcode)
        log.error("worker rank %d failed first, with exit code %d", rank, code)
        return code
    except SignalException as err:
        # The launcher itself was signalled (SIGTERM on pod deletion); the workers got it too.
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
