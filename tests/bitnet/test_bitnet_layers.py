"""BitNet Megatron layers on CPU (one process): layer selection, the forward and backward
against float64 formulas, SubLN, errors, the GPT toggle and a tiny training run."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bitnet_testutil import (  # noqa: E402
    gpt_loss,
    np_activation_quant,
    np_weight_quant,
    tiny_batch,
    tiny_config,
    tiny_gpt,
)

from recipes.config import BitNetConfig  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def megatron_cpu():
    from falcon_h1.megatron_compat.parallel import initialize_parallel

    initialize_parallel(1, 1, 1234)


def _layers():
    from bitnet import layers

    return layers


# ------------------------------------------------------------------------- select_linear
def test_select_linear_by_layer_type():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    L = _layers()
    cfg = BitNetConfig(enabled=True, layers=["attention_qkv", "mamba_out"])
    assert issubclass(L.select_linear(cfg, "attention_qkv", "column"), L.BitNetColumnParallelLinear)
    assert L.select_linear(cfg, "attention_out", "row") is RowParallelLinear
    assert L.select_linear(cfg, "mlp", "column") is ColumnParallelLinear
    # Fused Falcon-H1 projections: quantised when either part is.
    assert issubclass(L.select_linear(cfg, "fused_in", "column"), L.BitNetColumnParallelLinear)
    assert issubclass(L.select_linear(cfg, "fused_out", "row"), L.BitNetRowParallelLinear)
    only_mlp = BitNetConfig(enabled=True, layers=["mlp"])
    assert L.select_linear(only_mlp, "fused_in", "column") is ColumnParallelLinear
    assert L.select_linear(only_mlp, "fused_out", "row") is RowParallelLinear
    # Off: plain Megatron classes.
    assert L.select_linear(None, "mlp", "column") is ColumnParallelLinear
    assert L.select_linear(BitNetConfig(enabled=False), "mlp", "row") is RowParallelLinear


def test_select_linear_binds_options():
    L = _layers()
    cls = L.select_linear(BitNetConfig(enabled=True, subln=True, fused=False), "mlp", "row")
    assert issubclass(cls, L.BitNetRowParallelLinear)
    assert cls.default_bitnet_options == L.BitNetLinearOptions(fused=False, int8_matmul=False, subln=True)
    assert cls is L.select_linear(BitNetConfig(enabled=True, subln=True, fused=False), "mlp", "row")
    assert L.select_linear(BitNetConfig(enabled=True), "mlp", "row") is L.BitNetRowParallelLinear


def test_kernel_backend_is_fixed_when_the_layer_is_built():
    L = _layers()
    cfg = BitNetConfig(enabled=True, layers=["mlp", "mamba_in"])
    row = L.select_linear(cfg, "mlp", "row", kernel_backend="reference")
    assert row.default_bitnet_options.kernel_backend == "reference"
    assert L.select_linear(cfg, "mlp", "row").default_bitnet_options.kernel_backend == "auto"
    fused = L.select_segmented_linear(cfg, [("qkv", 8, "attention_qkv"), ("zx", 8, "mamba_in")], "column",
                                      kernel_backend="reference")
    assert fused.func.default_bitnet_options.kernel_backend == "reference"
    with pytest.raises(ValueError, match=r"kernel_backend='fast'; allowed: \['auto', 'reference', 'triton'\]"):
        L.BitNetLinearOptions(kernel_backend="fast")
    with pytest.raises(ValueError, match=r"kernel_backend='fast'; allowed"):
        L.select_linear(cfg, "mlp", "column", kernel_backend="fast")
    # The Triton kernels need CUDA tensors: a CPU layer asked for them says so at its first forward.
    layer = _column(L.BitNetLinearOptions(kernel_backend="triton"))
    with pytest.raises(ValueError, match=r"kernel_backend='triton' got a torch.float32 tensor on cpu"):
        layer(torch.randn(2, 1, 24))


def test_bitnet_linears_refuse_weight_scaling():
    """The model folds µP multipliers into a weight only where the linear allows it: a BitNet
    weight scaled per row would be quantised with another absmean."""
    L = _layers()
    cfg = BitNetConfig(enabled=True, layers=["mlp", "attention_qkv"], subln=True)
    classes = [L.select_linear(cfg, "mlp", "column"), L.select_linear(cfg, "mlp", "row"),
               L.select_linear(BitNetConfig(enabled=True), "mlp", "row"),
               L.select_segmented_linear(cfg, [("qkv", 8, "attention_qkv"), ("zx", 8, "mamba_in")], "column").func]
    assert all(issubclass(c, (L.BitNetColumnParallelLinear, L.BitNetRowParallelLinear)) for c in classes)
    assert all(c.supports_weight_scaling is False for c in classes)


def test_select_linear_errors():
    L = _layers()
    with pytest.raises(ValueError, match=r"bitnet\.layers: 'mlp_in' .*allowed values: \['attention_qkv'"):
        L.select_linear(BitNetConfig(enabled=True, layers=["mlp", "mlp_in"]), "mlp", "column")
    with pytest.raises(ValueError, match=r"bitnet\.layers: 'embedding'"):  # even when disabled
        L.select_linear(BitNetConfig(enabled=False, layers=["embedding"]), "mlp", "column")
    with pytest.raises(ValueError, match=r"layer_type='mlp_up'; allowed: \['attention_qkv'"):
        L.select_linear(BitNetConfig(enabled=True), "mlp_up", "column")
    with pytest.raises(ValueError, match=r"parallel='col'; allowed: 'column', 'row'"):
        L.select_linear(BitNetConfig(enabled=True), "mlp", "col")


# ------------------------------------------------------------------- forward / backward
def _column(options=None, bias=False, skip_bias_add=False, in_f=24, out_f=40):
    L = _layers()
    return L.BitNetColumnParallelLinear(
        in_f, out_f, config=tiny_config(), init_method=torch.nn.init.normal_, bias=bias,
        gather_output=False, skip_bias_add=skip_bias_add, bitnet_options=options,
    )


def _row(options=None, in_f=40, out_f=24):
    L = _layers()
    return L.BitNetRowParallelLinear(
        in_f, out_f, config=tiny_config(), init_method=torch.nn.init.normal_, bias=False,
        input_is_parallel=True, skip_bias_add=False, bitnet_options=options,
    )


def _expected(x, w, subln_eps=None):
    """float64 numpy: y = q(x) @ q(W)^T with the spec formulas (optional SubLN first)."""
    x = x.detach().double().numpy()
    if subln_eps is not None:
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + subln_eps)
    qx, sx, _ = np_activation_quant(x)
    qw, m, _ = np_weight_quant(w.detach().double().numpy())
    x_fq, w_fq = qx * sx[..., None], qw * m
    return x_fq @ w_fq.T, x_fq, w_fq


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("subln", [False, True])
def test_layer_forward_backward_against_formula(kind, fused, subln):
    L = _layers()
    options = L.BitNetLinearOptions(fused=fused, subln=subln)
    layer = _column(options) if kind == "column" else _row(options)
    x = torch.randn(5, 2, layer.input_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y, bias = layer(x)
    assert bias is None and y.shape == (5, 2, layer.output_size)
    eps = layer.config.layernorm_epsilon if subln else None
    y_exp, x_fq, w_fq = _expected(x, layer.weight, eps)
    np.testing.assert_allclose(y.detach().double().numpy(), y_exp, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(y)
    y.backward(grad)
    g = grad.double().numpy()
    # Straight-through: the weight gradient is g^T @ q(x); the input gradient g @ q(W) (times
    # the SubLN Jacobian when SubLN is on, checked through autograd of the formula).
    np.testing.assert_allclose(
        layer.weight.grad.double().numpy(), g.reshape(-1, g.shape[-1]).T @ x_fq.reshape(-1, x_fq.shape[-1]),
        rtol=1e-4, atol=1e-4,
    )
    if not subln:
        np.testing.assert_allclose(x.grad.double().numpy(), g @ w_fq, rtol=1e-4, atol=1e-4)
    else:
        x64 = x.detach().double().requires_grad_(True)
        normed = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps)
        (normed * (torch.from_numpy(g @ w_fq))).sum().backward()
        np.testing.assert_allclose(x.grad.double().numpy(), x64.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_column_bias_and_skip_bias_add():
    layer = _column(bias=True)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, 40))
    x = torch.randn(3, 1, 24)
    y, bias = layer(x)
    y_exp, _, _ = _expected(x, layer.weight)
    np.testing.assert_allclose(y.detach().numpy(), y_exp + np.linspace(-1, 1, 40), rtol=1e-4, atol=1e-4)
    skip = _column(bias=True, skip_bias_add=True)
    skip.load_state_dict(layer.state_dict())
    y2, b2 = skip(x)
    assert torch.equal(b2, layer.bias)
    torch.testing.assert_close(y2 + b2, y)


def test_quantized_weight_and_frozen_forward():
    layer = _column()
    ternary, scale = layer.quantized_weight()
    qw, m, v = np_weight_quant(layer.weight.detach().double().numpy())
    assert (ternary.numpy() == qw).all() and scale.item() == pytest.approx(m, rel=1e-6)
    x = torch.randn(4, 2, 24)
    y_train, _ = layer(x)
    layer.freeze_quantized()
    assert not layer.weight.requires_grad
    y_frozen, _ = layer(x)
    assert torch.equal(y_frozen, y_train)
    assert torch.equal(layer.quantized_weight()[0], ternary)
    with pytest.raises(ValueError, match=r"ternary shape \(3, 3\), expected \(40, 24\)"):
        _column().freeze_quantized(torch.zeros(3, 3, dtype=torch.int8), torch.tensor(1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_names_the_parameter(bad):
    L = _layers()
    model = torch.nn.ModuleDict({"proj": _row()})
    L.label_bitnet_layers(model)
    with torch.no_grad():
        model["proj"].weight[3, 1] = bad
    with pytest.raises(L.NonFiniteWeightError, match=r"parameter proj\.weight holds non-finite"):
        model["proj"](torch.randn(2, 1, 40))
    unlabelled = _column()
    with torch.no_grad():
        unlabelled.weight[0, 0] = bad
    with pytest.raises(L.NonFiniteWeightError, match=r"BitNetColumnParallelLinear\(in=24, out=40\)\.weight"):
        unlabelled(torch.randn(2, 1, 24))


# -------------------------------------------------------------------------------- GPT
def test_gpt_spec_swaps_selected_projections():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from bitnet.gpt import bitnet_gpt_layer_spec

    L = _layers()
    spec = bitnet_gpt_layer_spec(BitNetConfig(enabled=True, layers=["mlp", "attention_out"]))
    attn = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.keywords["submodules"]
    assert attn.linear_qkv is ColumnParallelLinear
    assert attn.linear_proj is L.BitNetRowParallelLinear
    assert mlp.linear_fc1 is L.BitNetColumnParallelLinear and mlp.linear_fc2 is L.BitNetRowParallelLinear
    off = bitnet_gpt_layer_spec(None)
    assert off.submodules.self_attention.submodules.linear_proj is RowParallelLinear
    with pytest.raises(ValueError, match=r"'lm_head' is not supported by the GPT layer spec"):
        bitnet_gpt_layer_spec(BitNetConfig(enabled=True, layers=["mlp", "lm_head"]))


def test_tiny_bitnet_gpt_trains():
    L = _layers()
    torch.manual_seed(0)
    model = tiny_gpt(BitNetConfig(enabled=True))
    assert len(L.bitnet_layers(model)) == 8  # 2 layers x (qkv, proj, fc1, fc2)
    batch = tiny_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = gpt_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------- output row scales (µP)
@pytest.mark.parametrize("options", [dict(), dict(int8_matmul=True), dict(fused=False), dict(subln=True)],
                         ids=["float_gemm", "int8_gemm", "reference_ste", "subln"])
@pytest.mark.parametrize("segments", [None, [("a", 10), ("b", 20, False), ("c", 10)]], ids=["plain", "mixed"])
def test_output_row_scale_against_formula(options, segments):
    """y = (q(x) @ q(W)^T) * s per output row (a full-precision run: (x @ W^T) * s), with the
    gradients of that formula: what the model computes with µP multipliers on the output."""
    L = _layers()
    layer = L.BitNetColumnParallelLinear(24, 40, config=tiny_config(), init_method=torch.nn.init.normal_, bias=False,
                                         gather_output=False, bitnet_options=L.BitNetLinearOptions(**options),
                                         bitnet_segments=segments)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 2, 24, generator=g, requires_grad=True)
    scale = torch.rand(40, 1, generator=g) + 0.25
    y, _ = layer(x, output_row_scale=scale)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)

    eps = layer.config.layernorm_epsilon if options.get("subln") else None
    x64 = x.detach().double().numpy()
    _, x_fq, _ = _expected(x, layer.weight, eps)
    w = layer.weight.detach().double().numpy()
    rows = [(0, 40, True)] if segments is None else [(0, 10, True), (10, 30, False), (30, 40, True)]
    w_used, x_used = np.zeros_like(w), []
    for start, end, quantized in rows:
        qw, m, _ = np_weight_quant(w[start:end])
        w_used[start:end] = qw * m if quantized else w[start:end]
        x_used.append(x_fq if quantized else x64)
    s = scale.double().numpy().reshape(-1)
    y_exp = np.concatenate([xs @ w_used[a:b].T for (a, b, _), xs in zip(rows, x_used)], -1) * s
    np.testing.assert_allclose(y.detach().double().numpy(), y_exp, rtol=1e-4, atol=1e-4)
    gs = grad.double().numpy() * s  # the gradient of the unscaled product
    for (start, end, _), xs in zip(rows, x_used):
        np.testing.assert_allclose(layer.weight.grad[start:end].double().numpy(),
                                   gs[..., start:end].reshape(-1, end - start).T @ xs.reshape(-1, 24),
                                   rtol=1e-4, atol=1e-4)
    if not options.get("subln"):
        x_grad = sum(gs[..., a:b] @ w_used[a:b] for a, b, _ in rows)
        np.testing.assert_allclose(x.grad.double().numpy(), x_grad, rtol=1e-4, atol=1e-4)


def test_output_row_scale_is_part_of_the_cached_quantisation():
    layer = _column()
    x = torch.randn(3, 2, 24)
    plain = layer(x)[0]
    scale = torch.full((40,), 2.0)
    torch.testing.assert_close(layer(x, output_row_scale=scale)[0], 2 * plain)
    scale.fill_(3.0)  # the same tensor changed in place
    torch.testing.assert_close(layer(x, output_row_scale=scale)[0], 3 * plain)
    torch.testing.assert_close(layer(x, output_row_scale=torch.full((40, 1), 0.5))[0], 0.5 * plain)
    assert torch.equal(layer(x)[0], plain)  # and without, the quantised weight as it is
    with pytest.raises(ValueError, match=r"output_row_scale of shape \(39,\).*one value per output row of this "
                                         r"rank \(40\)"):
        layer(x, output_row_scale=torch.ones(39))
    with pytest.raises(ValueError, match=r"requires_grad=True.*allowed: a constant"):
        layer(x, output_row_scale=torch.ones(40, requires_grad=True))


def test_megatron_features_of_its_own_linear_function_are_refused():
    """Deferred embedding weight gradients (with pipeline parallelism) live in Megatron's linear
    function, which BitNet linears replace: refused when the layer is built, not ignored."""
    config = tiny_config()
    config.defer_embedding_wgrad_compute = True  # TransformerConfig allows it only with pipeline parallelism
    with pytest.raises(ValueError, match=r"BitNetColumnParallelLinear: config.defer_embedding_wgrad_compute is on"):
        _layers().BitNetColumnParallelLinear(24, 40, config=config, init_method=torch.nn.init.normal_, bias=False,
                                             gather_output=False)
