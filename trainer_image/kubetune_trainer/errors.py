"""Errors that carry an exit code: the Job's retry policy depends on them (see docs/trainer.md)."""

from __future__ import annotations

from kubetune_contract.config import (
    EXIT_ERROR,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_OUT_OF_MEMORY,
    EXIT_REGISTRY_UNAVAILABLE,
    EXIT_SOURCE_UNAVAILABLE,
    EXIT_STORE_UNAVAILABLE,
    EXIT_TERMINATED,
)

# The codes are defined in config.py, which the operator imports (podFailurePolicy, status reasons).
EXIT_FAILED = EXIT_ERROR
EXIT_INVALID = EXIT_INVALID_INPUT

__all__ = ["EXIT_FAILED", "EXIT_INVALID", "EXIT_OK", "EXIT_OUT_OF_MEMORY", "EXIT_REGISTRY_UNAVAILABLE",
           "EXIT_SOURCE_UNAVAILABLE", "EXIT_STORE_UNAVAILABLE", "EXIT_TERMINATED", "InvalidInput", "OutOfMemory",
           "RegistryUnavailable", "RunFailed", "SourceUnavailable", "StoreUnavailable", "Terminated", "TrainerError"]


class TrainerError(Exception):
    """Base of the trainer's own errors; ``exit_code`` is the process exit status."""

    exit_code = EXIT_FAILED


class InvalidInput(TrainerError):
    """The config or the data is wrong; the message names the file and the field or column."""

    exit_code = EXIT_INVALID


class SourceUnavailable(TrainerError):
    """A source does not exist or cannot be reached (object store, hub, local path)."""

    exit_code = EXIT_SOURCE_UNAVAILABLE


class StoreUnavailable(TrainerError):
    """The artifact store stopped answering after this pod had written to it, and stayed away for the
    whole retry window: an outage, not a wrong endpoint; the checkpoints written so far are intact."""

    exit_code = EXIT_STORE_UNAVAILABLE


class RegistryUnavailable(TrainerError):
    """output.oci's registry answered when the run started, then stayed away for the whole retry
    window while the published run was pushed: an outage; a replacement pod pushes again."""

    exit_code = EXIT_REGISTRY_UNAVAILABLE


class OutOfMemory(TrainerError):
    """The accelerator ran out of memory: the same settings fail again, so the Job does not retry."""

    exit_code = EXIT_OUT_OF_MEMORY


class Terminated(TrainerError):
    """SIGTERM (pod deletion, preemption, node drain): the run stopped and can be resumed."""

    exit_code = EXIT_TERMINATED


class RunFailed(TrainerError):
    """A rank of a distributed run failed before training and every rank stops with its exit code
    (see ``World.agree``): whichever process the launcher sees exit first, the code is the same."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
