"""The one error for a configuration value that cannot work.

Raised by every layer that checks settings (the model config, BitNet, the data, the recipe,
the executors) before any job starts; the CLI prints it as one line. It is a ValueError, so
callers that catch ValueError keep working.
"""

from __future__ import annotations

from typing import Any


class ConfigValueError(ValueError):
    """`key` (the dotted config path, e.g. "train.lr") has `value`, which is not allowed;
    `allowed` says what is. The message is "KEY = VALUE is not allowed: ALLOWED." unless a
    sentence that relates two settings (`message`) says it better; it still names both."""

    def __init__(self, key: str, value: Any, allowed: str, message: str | None = None):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(message if message is not None else f"{key} = {value!r} is not allowed: {allowed}.")

    def __reduce__(self):
        # Rebuilt with all four fields when it travels between processes (pickled by
        # torch.distributed.broadcast_object_list, multiprocessing), not from the message alone.
        return type(self), (self.key, self.value, self.allowed, str(self))


def is_int_at_least(value: Any, minimum: int) -> bool:
    """Whether `value` is an integer (a bool is not one) of at least `minimum`: the test behind
    every count setting (sizes, steps, intervals)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
