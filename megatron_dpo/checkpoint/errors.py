"""Errors of checkpoint writing: importable without torch, for the CLI."""


class CheckpointSaveError(RuntimeError):
    """A step directory could not be written (e.g. the disk is full); nothing
    complete was touched, and the run can resume from its newest step (exit code 4)."""
