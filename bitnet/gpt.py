"""BitNet toggle for Megatron's GPT: the local layer spec with BitNet projections."""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from bitnet.layers import select_linear, validate_bitnet_layers


def bitnet_gpt_layer_spec(bitnet_cfg, **local_spec_kwargs) -> ModuleSpec:
    """`get_gpt_layer_local_spec(**local_spec_kwargs)` with linear_qkv / linear_proj /
    linear_fc1 / linear_fc2 swapped for BitNet layers as `bitnet_cfg.layers` asks
    (attention_qkv, attention_out, mlp). lm_head is GPTModel's own output layer, not part of
    the layer spec: asking for it here is an error rather than silently full precision."""
    if bitnet_cfg is not None and getattr(bitnet_cfg, "enabled", False):
        if "lm_head" in validate_bitnet_layers(bitnet_cfg):
            raise ValueError(
                "bitnet.layers: 'lm_head' is not supported by the GPT layer spec "
                "(bitnet_gpt_layer_spec); allowed here: attention_qkv, attention_out, mlp"
            )
    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    layer = spec.submodules

    attention = layer.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(
            attention.submodules,
            linear_qkv=select_linear(bitnet_cfg, "attention_qkv", "column"),
            linear_proj=select_linear(bitnet_cfg, "attention_out", "row"),
        ),
    )

    # The dense MLP entry is `functools.partial(MLP.as_mlp_submodule, submodules=MLPSubmodules)`.
    mlp = layer.mlp
    mlp_submodules = dataclasses.replace(
        mlp.keywords["submodules"],
        linear_fc1=select_linear(bitnet_cfg, "mlp", "column"),
        linear_fc2=select_linear(bitnet_cfg, "mlp", "row"),
    )
    mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": mlp_submodules})

    return dataclasses.replace(
        spec, submodules=dataclasses.replace(layer, self_attention=attention, mlp=mlp)
    )
