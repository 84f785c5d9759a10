"""Falcon-H1 (parallel hybrid attention + Mamba-2) on Megatron Core."""

from falcon_h1.config import FalconH1Config, apply_attention_ratio, resolve, validate
from falcon_h1.errors import ConfigValueError
from falcon_h1.presets import PRESETS, get_preset

__all__ = [
    "ConfigValueError", "FalconH1Config", "PRESETS", "apply_attention_ratio", "build_model", "from_hf",
    "generate", "get_preset", "resolve", "to_hf", "validate",
]


def __getattr__(name):
    # Megatron-dependent entry points load lazily so config/preset use stays cheap.
    if name == "build_model":
        from falcon_h1.model import build_model

        return build_model
    if name == "generate":
        from falcon_h1.generation import generate

        return generate
    if name in ("from_hf", "to_hf"):
        from falcon_h1 import hf

        return getattr(hf, name)
    raise AttributeError(name)
