"""Errors of a run that started: importable without torch, for the CLI."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient norm (exit code 3)."""
