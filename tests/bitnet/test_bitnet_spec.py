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


def _step(model):
    """(loss, {param: grad}, the dtypes of what autograd keeps at the token count) of one step."""
    import torch

    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {t.dtype for t in kept}


def test_saved_input_float_keeps_no_int8_and_gives_the_same_bits(megatron_single):
    """bitnet.saved_input: what the backward keeps changes, not one bit of the loss or gradients."""
    import torch

    layers = ["attention_qkv", "attention_out", "mamba_in", "mamba_out", "mlp"]
    loss_i, grads_i, kept_i = _step(_model(BitNetConfig(enabled=True, layers=layers, saved_input="int8")))
    loss_f, grads_f, kept_f = _step(_model(BitNetConfig(enabled=True, layers=layers, saved_input="float")))
    assert torch.int8 in kept_i and torch.int8 not in kept_f
    assert torch.equal(loss_i, loss_f)
    assert grads_i.keys() == grads_f.keys() and len(grads_i) > 0
    assert all(torch.equal(grads_i[n], grads_f[n]) for n in grads_i)


@pytest.mark.parametrize("fields, names", [
    (dict(saved_input="bf16"), ("bitnet.saved_input = 'bf16'", "'auto', 'int8', 'float'")),
    (dict(saved_input="int8", fused=False), ("bitnet.saved_input = 'int8'", "bitnet.fused = false")),
    (dict(saved_input="float", int8_matmul=True), ("bitnet.saved_input = 'float'", "bitnet.int8_matmul = true")),
])
def test_saved_input_the_gemm_cannot_honour_is_refused(fields, names):
    from bitnet.layers import validate_bitnet_config
    from falcon_h1.errors import ConfigValueError

    with pytest.raises(ConfigValueError) as err:
        validate_bitnet_config(BitNetConfig(enabled=True, **fields))
    assert err.value.key == "bitnet.saved_input" and all(n in str(err.value) for n in names)


def test_int8_saved_input_with_a_full_precision_segment_is_refused(megatron_single):
    """The out-projection's input [y_ssm | o_attn] with o_attn in full precision keeps its float
    form; asking for int8 there is an error, not a setting dropped."""
    from falcon_h1.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"bitnet.saved_input = 'int8'.*\['o_attn'\] in full precision"):
        _model(BitNetConfig(enabled=True, layers=["mamba_out"], saved_input="int8"))
    assert _quantised(_model(BitNetConfig(enabled=True, layers=["mamba_out"], saved_input="auto")))
