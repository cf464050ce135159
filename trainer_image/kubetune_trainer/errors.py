"""Errors that carry an exit code: the Job's retry policy depends on them (see docs/trainer.md)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
"""Anything unexpected (out of memory, a crash, a lost connection mid-run): worth retrying."""
EXIT_INVALID = 3
"""Invalid config or data: retrying cannot help."""
EXIT_SOURCE_UNAVAILABLE = 4
"""A model, tokenizer or dataset source was not found or could not be reached."""


class TrainerError(Exception):
    """Base of the trainer's own errors; ``exit_code`` is the process exit status."""

    exit_code = EXIT_FAILED


class InvalidInput(TrainerError):
    """The config or the data is wrong; the message names the file and the field or column."""

    exit_code = EXIT_INVALID


class SourceUnavailable(TrainerError):
    """A source does not exist or cannot be reached (object store, hub, local path)."""

    exit_code = EXIT_SOURCE_UNAVAILABLE
