"""Errors that reach the user as one clear message and an exit code, never as a traceback."""

from __future__ import annotations

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_USAGE = 2
EXIT_GATE_REJECTED = 3
EXIT_ENVIRONMENT = 75  # sysexits' EX_TEMPFAIL: a full disk; free space, then resume
EXIT_INTERRUPTED = 130


class TrainpipeError(Exception):
    """Base for errors the CLI renders as a message; `exit_code` is what the process exits with."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(TrainpipeError):
    """A config file, key, override or value is wrong. Raised before anything is written."""


class DatasetError(TrainpipeError):
    """A dataset file or row is wrong. Raised before any model loads."""


class RunNotFound(TrainpipeError):
    pass


class IllegalTransition(TrainpipeError):
    """A trigger the state machine does not allow from the current state (e.g. resuming a succeeded run)."""


class RunOwned(TrainpipeError):
    """Another live process owns the run."""


class LedgerError(TrainpipeError):
    """The ledger cannot be opened, is not ours, is from a newer trainpipe, or cannot be written."""


class PreflightError(TrainpipeError):
    """A run cannot start: output dir, ledger, base model or Hub settings. Raised before any write."""


class EnvironmentChanged(TrainpipeError):
    """A resume would run in an environment that breaks resuming the run (`trainpipe resume --force`)."""
