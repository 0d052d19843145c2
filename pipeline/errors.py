"""Error kinds of a job, each mapped to a CLI exit code; messages are one line."""

from __future__ import annotations


class InputError(ValueError):
    """Bad usage, spec or input data, found before anything is written (exit code 2)."""

    exit_code = 2


class JobError(RuntimeError):
    """The job started but could not finish: model load, storage, lost rows (exit code 1)."""

    exit_code = 1
