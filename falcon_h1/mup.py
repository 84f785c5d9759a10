"""µP width transfer: the 14 Falcon-H1 forward multipliers of any width.

The published multipliers of Falcon-H1-0.5B, -1.5B-Deep, -7B and -34B all satisfy
these width relations (to the last bit, or one ulp), with H = hidden_size,
d = attention head_dim, h = attention heads, d_ssm = Mamba heads x head dim,
N = mamba_d_state and F = intermediate_size:

    embedding_multiplier     = 4 * sqrt(2)
    attention_in_multiplier  = 1
    lm_head_multiplier       = 40 / H
    ssm_in_multiplier        = 1280 / H
    mlp_multipliers          = [(1280 / H) / sqrt(2),  1228800 / (H * F)]          # gate, down
    attention_out_multiplier = 491520 / (H * h * d)
    key_multiplier           = (1 / (4 * sqrt(2))) * (1280 / H)^2 * sqrt(128 / d)
    ssm_out_multiplier       = 256 * sqrt(2) / d_ssm
    ssm_multipliers          = [1 / (2 sqrt(2)), 1/4, (1 / (4 sqrt(2))) * 256 / N, 1/2, 1 / (2 sqrt(2))]
                               # z, x, B, C, dt

The relations are fitted to the published values, not rules TII has published (TII says it
will publish how it scales them); for widths without a published config they are the best
available estimate. A branch a model does not have (no attention heads, no SSM) keeps its
multipliers at 1.
"""

from __future__ import annotations

import math

from falcon_h1.config import FalconH1Config

SCALAR_MULTIPLIERS = (
    "embedding_multiplier", "lm_head_multiplier", "key_multiplier", "attention_in_multiplier",
    "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier",
)
LIST_MULTIPLIERS = {"ssm_multipliers": 5, "mlp_multipliers": 2}
MULTIPLIER_FIELDS = SCALAR_MULTIPLIERS + tuple(LIST_MULTIPLIERS)
MODES = ("preset", "derived", "unit")

_SQRT2 = math.sqrt(2.0)


def unit_multipliers() -> dict:
    """Every multiplier 1 (standard parameterisation)."""
    return {**{name: 1.0 for name in SCALAR_MULTIPLIERS},
            **{name: [1.0] * n for name, n in LIST_MULTIPLIERS.items()}}


def derive_multipliers(cfg: FalconH1Config) -> dict:
    """The 14 multipliers the width relations give for `cfg`'s widths (field name -> value).

    Call it on the config the model is built from (after `apply_attention_ratio`): the
    attention and SSM widths enter the relations.
    """
    H, F = cfg.hidden_size, cfg.intermediate_size
    width_ratio = 1280 / H
    out = unit_multipliers()
    out.update(
        embedding_multiplier=4 * _SQRT2,
        lm_head_multiplier=40 / H,
        ssm_in_multiplier=width_ratio,
        mlp_multipliers=[width_ratio * _SQRT2 / 2, 1228800 / (H * F)],
    )
    attention_width = cfg.num_attention_heads * cfg.kv_channels if cfg.has_attention else 0
    if attention_width:
        out["attention_out_multiplier"] = 491520 / (H * attention_width)
        out["key_multiplier"] = (1 / (4 * _SQRT2)) * width_ratio ** 2 * math.sqrt(128 / cfg.kv_channels)
    if cfg.has_mamba and cfg.d_ssm:
        out["ssm_out_multiplier"] = 256 * _SQRT2 / cfg.d_ssm
        out["ssm_multipliers"] = [_SQRT2 / 4, 0.25, _SQRT2 / 8 * (256 / cfg.mamba_d_state), 0.5, _SQRT2 / 4]
    return out


def multipliers_of(cfg: FalconH1Config) -> dict:
    """The 14 multipliers a config carries (field name -> value)."""
    return {name: (list(getattr(cfg, name)) if name in LIST_MULTIPLIERS else getattr(cfg, name))
            for name in MULTIPLIER_FIELDS}


def with_derived_multipliers(cfg: FalconH1Config) -> FalconH1Config:
    """`cfg` with every multiplier replaced by the width relations' value for its widths."""
    from falcon_h1.config import apply_attention_ratio

    return cfg.replace(**derive_multipliers(apply_attention_ratio(cfg)))
