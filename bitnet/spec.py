"""BitNet for the Falcon-H1 model: the linear spec (falcon_h1.linears) whose projections are
BitNet layers where the BitNet config asks for them, for `falcon_h1.model.build_model(...,
linears=...)`. The model never sees the BitNet config; `bitnet.gpt` does the same for Megatron's
GPT through its layer spec."""

from __future__ import annotations

import functools

from bitnet.layers import label_bitnet_layers, select_linear, select_segmented_linear, validate_bitnet_layers
from falcon_h1.linears import MEGATRON_LINEARS, LinearSpec


def falcon_h1_linear_spec(bitnet_cfg) -> LinearSpec:
    """Megatron's linears when `bitnet_cfg` is None or not enabled; otherwise each projection
    listed in `bitnet_cfg.layers` (fused projections segment by segment) as a BitNet layer with
    the config's options, the rest Megatron's. bitnet_cfg: recipes.config.BitNetConfig."""
    if bitnet_cfg is None or not bitnet_cfg.enabled:
        return MEGATRON_LINEARS
    validate_bitnet_layers(bitnet_cfg)
    return LinearSpec(
        linear=functools.partial(select_linear, bitnet_cfg),
        fused_linear=functools.partial(select_segmented_linear, bitnet_cfg),
        finish=label_bitnet_layers,  # so BitNet errors name the parameter
    )
