"""bitnet.spec: the Falcon-H1 model gets BitNet layers exactly where `bitnet.layers` lists them
(fused projections segment by segment), named for error messages; off, Megatron's linears."""

import pytest

from recipes.config import BitNetConfig


def _model(bitnet, fused=True):
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    cfg = get_preset("falcon_h1_micro").replace(fused_projections=fused)
    return build_model(cfg, linears=falcon_h1_linear_spec(bitnet, cfg.kernel_backend), seed=1)


def _quantised(model) -> dict[str, object]:
    """qualified name -> the quantised segments' names (or True for a whole projection)."""
    from bitnet.layers import bitnet_layers

    out = {}
    for name, module in bitnet_layers(model):
        layout = module.bitnet_segments
        out[name] = True if layout is None else [s.name for s in layout.segments if s.quantized]
    return out


def test_off_gives_megatron_linears(megatron_single):
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.linears import MEGATRON_LINEARS

    assert falcon_h1_linear_spec(None, "auto") is MEGATRON_LINEARS
    assert falcon_h1_linear_spec(BitNetConfig(enabled=False, layers=["mlp"]), "auto") is MEGATRON_LINEARS
    assert _quantised(_model(BitNetConfig(enabled=False))) == {}


def test_layers_listed_are_quantised_and_named(megatron_single):
    model = _model(BitNetConfig(enabled=True, layers=["mamba_out", "mlp", "lm_head"]))
    n = len(model.layers)
    want = {"output_layer": True}
    for i in range(n):
        want[f"layers.{i}.mixer.out_proj"] = ["y_ssm"]   # o_attn stays full precision
        want[f"layers.{i}.mlp.linear_fc1"] = True
        want[f"layers.{i}.mlp.linear_fc2"] = True
    assert _quantised(model) == want
    from bitnet.layers import bitnet_layers

    assert all(module.bitnet_name == name for name, module in bitnet_layers(model))
    # µP scales fold into Megatron's plain in-projection (no segment quantised) and into BitNet's
    # fc1 (as its output_row_scale)
    assert all(layer.mixer.scales_in_weights and layer.mlp.scales_in_weights for layer in model.layers)


def test_unfused_projections_follow_their_own_switch(megatron_single):
    model = _model(BitNetConfig(enabled=True, layers=["attention_qkv", "mamba_in"]), fused=False)
    assert set(_quantised(model)) == {f"layers.{i}.mixer.{p}" for i in range(len(model.layers))
                                      for p in ("attn_in_proj", "mamba_in_proj")}


def test_unknown_layer_is_refused_before_the_model_is_built():
    from bitnet.spec import falcon_h1_linear_spec

    with pytest.raises(ValueError, match=r"bitnet.layers: 'mamba' is not a quantisable layer type"):
        falcon_h1_linear_spec(BitNetConfig(enabled=True, layers=["mamba"]), "auto")


def test_the_model_kernel_backend_reaches_the_bitnet_layers(megatron_single):
    """model.kernel_backend = 'reference' (what train.force_reference_kernels sets) also puts the
    BitNet quantisers on their pure-PyTorch reference; an unknown backend is refused."""
    from bitnet.layers import bitnet_layers
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    cfg = get_preset("falcon_h1_micro").replace(kernel_backend="reference")
    model = build_model(cfg, linears=falcon_h1_linear_spec(BitNetConfig(enabled=True), cfg.kernel_backend), seed=1)
    backends = {module.bitnet_options.kernel_backend for _, module in bitnet_layers(model)}
    assert backends == {"reference"}
    with pytest.raises(ValueError, match=r"kernel_backend='cuda'; allowed: \['auto', 'reference', 'triton'\]"):
        falcon_h1_linear_spec(BitNetConfig(enabled=True), "cuda")
