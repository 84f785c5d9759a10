"""The one error type for a run that cannot go on (a checkpoint that cannot be read or written,
a diverged loss): its message says what happened and what to do, and `falcon-train` prints it
as one paragraph and exits 1 instead of showing a traceback. Kept free of heavy imports so the
CLI can catch it without importing torch."""

from __future__ import annotations


class RunError(Exception):
    """A training run stopped for a reason its message explains (no setting was wrong:
    those are falcon_h1.errors.ConfigValueError)."""

