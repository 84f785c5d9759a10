"""Third-party notices about optional accelerators, folded into one line.

Importing Megatron Core on a machine without Transformer Engine, Apex or CUDA prints a dozen
warnings (one per module that falls back, an experimental class, Megatron-FSDP's set-up
messages) before training starts; none asks the user to do anything. `quiet_fallbacks()`
silences exactly those messages, matched by their text, and returns the one line that says
which fallbacks are in use. Every other warning and log record still shows.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

# The start of each UserWarning silenced (warnings.filterwarnings matches the start).
_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "MimoModelConfig is experimental",  # a class Megatron defines on import; training never uses it
    "full scope is deprecated",  # from Megatron's TransformerConfig checks; no setting of this project
)
# logger -> the start of each record silenced on it.
_LOG_RECORDS = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision": ("Using Megatron-FSDP without",),
    "megatron.core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer": ("Detected Megatron Core",),
    "megatron.core.distributed.fsdp.src.megatron_fsdp.megatron_fsdp": ("Detected Megatron Core",),
    "megatron.core.rerun_state_machine": ("Implicit initialization of Rerun State Machine",
                                          "RerunStateMachine initialized in mode RerunMode.DISABLED"),
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
}


class _DropByPrefix(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_fallbacks() -> str:
    """Silence the fallback notices (call before Megatron is imported); returns the line to print."""
    for prefix in _WARNINGS:
        warnings.filterwarnings("ignore", message=prefix, category=UserWarning)
    for name, prefixes in _LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropByPrefix) for f in logger.filters):
            logger.addFilter(_DropByPrefix(prefixes))
    return fallback_line()


def announce_fallbacks() -> None:
    """quiet_fallbacks(), and its line on stderr from the first process of a job (call before
    Megatron is imported)."""
    import os
    import sys

    line = quiet_fallbacks()
    if line and os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def fallback_line() -> str:
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    import torch

    parts = []
    if missing:
        parts.append(f"no {' / '.join(missing)}: PyTorch optimizers and norms")
    if not torch.cuda.is_available():
        parts.append("no CUDA device: training on the CPU")
    return f"falcon-train: fallbacks in use: {'; '.join(parts)}" if parts else ""
