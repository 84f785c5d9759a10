"""The RoPE settings (`model.rope_scaling`, Hugging Face's rope_parameters) and their check,
without torch: `falcon_h1.config.validate` runs before any job starts. The frequencies
themselves are computed in `falcon_h1.rope`."""

from __future__ import annotations

from typing import Optional

from falcon_h1.errors import ConfigValueError

# type -> (required keys, optional keys), as transformers validates them (rope_theta lives in
# model.rope_theta; "type" is the legacy spelling of "rope_type").
ROPE_TYPES: dict[str, tuple[frozenset, frozenset]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "yarn": (frozenset({"factor"}), frozenset({"original_max_position_embeddings", "attention_factor", "beta_fast",
                                               "beta_slow", "mscale", "mscale_all_dim", "truncate"})),
    "longrope": (frozenset({"short_factor", "long_factor"}),
                 frozenset({"original_max_position_embeddings", "attention_factor", "factor"})),
    "llama3": (frozenset({"factor", "low_freq_factor", "high_freq_factor"}),
               frozenset({"original_max_position_embeddings"})),
    "proportional": (frozenset(), frozenset({"factor", "partial_rotary_factor"})),
}
_COMMON_KEYS = frozenset({"rope_type", "type", "partial_rotary_factor"})


def _fail(value, allowed: str) -> None:
    raise ConfigValueError("model.rope_scaling", value, allowed)


def scaling_type(scaling: Optional[dict]) -> str:
    """The rope_type that `model.rope_scaling` names ("default" for None)."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def validate_rope_scaling(scaling, head_dim: int) -> None:
    """Refuse `model.rope_scaling` values this implementation (and Hugging Face's FalconH1) cannot
    run, for heads of `head_dim` channels."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        _fail(scaling, "null or a dict of Hugging Face rope_parameters (rope_type and its keys)")
    kind = scaling_type(scaling)
    if kind not in ROPE_TYPES:
        _fail(scaling, f"rope_type one of {sorted(ROPE_TYPES)}")
    if "rope_theta" in scaling:
        _fail(scaling, "no rope_theta key (it is model.rope_theta)")
    required, optional = ROPE_TYPES[kind]
    missing = sorted(required - set(scaling))
    if missing:
        _fail(scaling, f"rope_type {kind!r} needs the keys {missing}")
    unknown = sorted(set(scaling) - required - optional - _COMMON_KEYS)
    if unknown:
        _fail(scaling, f"rope_type {kind!r} takes only {sorted(required | optional)} (unknown: {unknown})")
    partial = scaling.get("partial_rotary_factor", 1.0)
    if kind != "proportional" and partial != 1.0:
        _fail(scaling, "partial_rotary_factor 1.0 (Falcon-H1 rotates whole heads; only rope_type "
                       "'proportional' rotates part of each head)")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
                "mscale", "mscale_all_dim"):
        value = scaling.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            _fail(scaling, f"{key} a number")
    half = head_dim // 2
    for key in ("short_factor", "long_factor"):
        if key in scaling and (not isinstance(scaling[key], (list, tuple)) or len(scaling[key]) != half):
            _fail(scaling, f"{key} a list of head_dim / 2 = {half} numbers")
