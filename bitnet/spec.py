"""BitNet for the Falcon-H1 model: the linear spec (falcon_h1.linears) whose projections are
BitNet layers where the BitNet config asks for them, for `falcon_h1.model.build_model(...,
linears=...)`. The model never sees the BitNet config; `bitnet.gpt` does the same for Megatron's
GPT through its layer spec."""

from __future__ import annotations

import functools

from bitnet.kernels import validate_kernel_backend
from bitnet.layers import label_bitnet_layers, select_linear, select_segmented_linear, validate_bitnet_config
from falcon_h1.linears import MEGATRON_LINEARS, LinearSpec


def falcon_h1_linear_spec(bitnet_cfg, kernel_backend: str) -> LinearSpec:
    """Megatron's linears when `bitnet_cfg` is None or not enabled; otherwise each projection
    listed in `bitnet_cfg.layers` (fused projections segment by segment) as a BitNet layer with
    the config's options, the rest Megatron's. bitnet_cfg: recipes.config.BitNetConfig;
    kernel_backend: the model's (model.kernel_backend: auto | reference | triton), which the
    BitNet layers' quantisers follow too."""
    if bitnet_cfg is None or not bitnet_cfg.enabled:
        return MEGATRON_LINEARS
    validate_bitnet_config(bitnet_cfg)
    validate_kernel_backend(kernel_backend)
    return LinearSpec(
        linear=functools.partial(_linear, bitnet_cfg, kernel_backend),
        fused_linear=functools.partial(_fused_linear, bitnet_cfg, kernel_backend),
        finish=label_bitnet_layers,  # so BitNet errors name the parameter
    )


def _linear(bitnet_cfg, kernel_backend: str, projection: str, parallel: str):
    return select_linear(bitnet_cfg, projection, parallel, kernel_backend)


def _fused_linear(bitnet_cfg, kernel_backend: str, segments, parallel: str):
    return select_segmented_linear(bitnet_cfg, segments, parallel, kernel_backend)
