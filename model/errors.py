"""Errors that reach users: one line saying what was wrong, where, and what to do."""


class CheckpointError(ValueError):
    """A checkpoint or model source cannot be loaded (missing file, bad shape, unknown type)."""
