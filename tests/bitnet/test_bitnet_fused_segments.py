"""Fused BitNet projections with per-segment quantisation (bitnet_segments), on CPU.

- the segmented column / row layers against float64 numpy formulas (each segment quantised as
  its own projection; full-precision segments untouched);
- the Falcon-H1 micro model: fused == unfused (logits, loss, gradients), all BitNet layers and
  a partial `bitnet.layers`; TP=2 == TP=1 for the fused model (torchrun, 2 gloo processes);
- export -> load_frozen_bitnet reproduces the fused model's logits exactly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bitnet_testutil import (  # noqa: E402
    assert_same_forward_and_grads, np_activation_quant, np_weight_quant, tiny_config)

from recipes.config import BitNetConfig  # noqa: E402
from tests.conftest import torchrun  # noqa: E402

ALL = ["attention_qkv", "attention_out", "mamba_in", "mamba_out", "mlp"]
PARTIAL = ["attention_qkv", "mlp"]


@pytest.fixture(scope="module", autouse=True)
def megatron_cpu():
    from falcon_h1.megatron_compat.parallel import initialize_parallel

    initialize_parallel(1, 1, 1234)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------ the layers alone
def _column(segments, options=None, in_f=24):
    from bitnet.layers import BitNetColumnParallelLinear

    out_f = sum(s[1] for s in segments)
    return BitNetColumnParallelLinear(
        in_f, out_f, config=tiny_config(), init_method=torch.nn.init.normal_, bias=False,
        gather_output=False, bitnet_options=options, bitnet_segments=segments,
    )


def _row(segments, options=None, out_f=24):
    from bitnet.layers import BitNetRowParallelLinear

    in_f = sum(s[1] for s in segments)
    return BitNetRowParallelLinear(
        in_f, out_f, config=tiny_config(), init_method=torch.nn.init.normal_, bias=False,
        input_is_parallel=True, skip_bias_add=False, bitnet_options=options, bitnet_segments=segments,
    )


def _bounds(segments):
    edges = np.cumsum([0] + [s[1] for s in segments])
    return [(a, b, s[2] if len(s) > 2 else True) for s, a, b in zip(segments, edges[:-1], edges[1:])]


def _subln(x, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


COLUMN_SEGMENTS = {
    "all_quantised": [("qkv", 16), ("zx", 24)],
    "mixed": [("a", 10, True), ("b", 20, False), ("c", 10, True)],  # runs: q, fp, q
}


@pytest.mark.parametrize("name", list(COLUMN_SEGMENTS))
@pytest.mark.parametrize("subln", [False, True])
def test_segmented_column_against_formula(name, subln):
    from bitnet.layers import BitNetLinearOptions

    segments = COLUMN_SEGMENTS[name]
    layer = _column(segments, BitNetLinearOptions(subln=subln))
    x = torch.randn(5, 2, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, _ = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    w = layer.weight.detach().double().numpy()
    x64 = x.detach().double().numpy()
    xq_in = _subln(x64, layer.config.layernorm_epsilon) if subln else x64
    qx, sx, _ = np_activation_quant(xq_in)
    x_fq = qx * sx[..., None]
    y_exp, w_used, x_used = [], [], []
    for start, end, quantized in _bounds(segments):
        if quantized:  # its own absmean over its own rows
            qw, m, _ = np_weight_quant(w[start:end])
            w_seg, x_seg = qw * m, x_fq
        else:  # a plain projection: raw input, raw weight
            w_seg, x_seg = w[start:end], x64
        y_exp.append(x_seg @ w_seg.T)
        w_used.append(w_seg)
        x_used.append(x_seg)
    np.testing.assert_allclose(y.detach().double().numpy(), np.concatenate(y_exp, -1), rtol=1e-4, atol=1e-4)
    # Straight-through: each segment's weight gradient is g_seg^T @ (the input it saw).
    g = grad.double().numpy()
    for (start, end, _), x_seg in zip(_bounds(segments), x_used):
        np.testing.assert_allclose(
            layer.weight.grad[start:end].double().numpy(),
            g[..., start:end].reshape(-1, end - start).T @ x_seg.reshape(-1, 24), rtol=1e-4, atol=1e-4,
        )
    # Input gradient: through the quantised segments' SubLN (autograd of the formula), plus the
    # full-precision segments' plain path.
    xt = x.detach().double().requires_grad_(True)
    normed = xt / torch.sqrt((xt * xt).mean(-1, keepdim=True) + layer.config.layernorm_epsilon) if subln else xt
    total = 0
    for (start, end, quantized), w_seg in zip(_bounds(segments), w_used):
        src = normed if quantized else xt
        total = total + (src @ torch.from_numpy(w_seg).T * grad[..., start:end].double()).sum()
    total.backward()
    np.testing.assert_allclose(x.grad.double().numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-4)


ROW_SEGMENTS = {
    "all_quantised": [("y_ssm", 16), ("o_attn", 24)],
    "mixed": [("y_ssm", 16, False), ("o_attn", 24, True)],
}


@pytest.mark.parametrize("name", list(ROW_SEGMENTS))
@pytest.mark.parametrize("subln", [False, True])
def test_segmented_row_against_formula(name, subln):
    """y = sum over segments of q_seg(x_seg) @ q(W[:, seg])^T: own per-token absmax, own weight
    absmean, own SubLN per segment; a full-precision segment is a plain projection."""
    from bitnet.layers import BitNetLinearOptions

    segments = ROW_SEGMENTS[name]
    layer = _row(segments, BitNetLinearOptions(subln=subln))
    g = torch.Generator().manual_seed(2)
    # Segments of very different magnitude: one shared absmax would crush the small one.
    x = torch.cat([torch.randn(5, 2, 16, generator=g) * 0.01, torch.randn(5, 2, 24, generator=g) * 3], -1)
    x.requires_grad_(True)
    y, _ = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    w = layer.weight.detach().double().numpy()
    x64 = x.detach().double().numpy()
    y_exp = 0
    g64 = grad.double().numpy()
    for start, end, quantized in _bounds(segments):
        x_seg, w_seg = x64[..., start:end], w[:, start:end]
        if quantized:
            if subln:
                x_seg = _subln(x_seg, layer.config.layernorm_epsilon)
            qx, sx, _ = np_activation_quant(x_seg)
            x_seg = qx * sx[..., None]
            qw, m, _ = np_weight_quant(w_seg)
            w_seg = qw * m
        y_exp = y_exp + x_seg @ w_seg.T
        np.testing.assert_allclose(
            layer.weight.grad[:, start:end].double().numpy(),
            g64.reshape(-1, g64.shape[-1]).T @ x_seg.reshape(-1, end - start), rtol=1e-4, atol=1e-4,
        )
        if not subln or not quantized:
            np.testing.assert_allclose(x.grad[..., start:end].double().numpy(), g64 @ w_seg, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y.detach().double().numpy(), y_exp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_int8_path_equals_fake_quant_path(kind):
    """The int8 GEMM path (per-row weight scales for a column, one GEMM per segment for a row;
    its CPU reference computes the exact integer product) = the fake-quantised float path."""
    from bitnet.layers import BitNetLinearOptions

    make, segments = (_column, COLUMN_SEGMENTS["mixed"]) if kind == "column" else (_row, ROW_SEGMENTS["mixed"])
    fake, int8 = make(segments), make(segments, BitNetLinearOptions(int8_matmul=True))
    x = torch.randn(6, 2, fake.input_size, generator=torch.Generator().manual_seed(3))
    assert_same_forward_and_grads(fake, int8, x)


def test_frozen_segmented_layer_reproduces_training_forward():
    from bitnet.layers import BitNetLinearOptions

    for make, segments in ((_column, COLUMN_SEGMENTS["mixed"]), (_row, ROW_SEGMENTS["mixed"])):
        for options in (None, BitNetLinearOptions(int8_matmul=True)):
            layer = make(segments, options)
            x = torch.randn(4, 2, layer.input_size, generator=torch.Generator().manual_seed(4))
            ternary, scales = layer.quantized_weight()
            assert scales.shape == (len(segments),)
            with torch.no_grad():
                y_train = layer(x)[0]
            layer.freeze_quantized()
            assert not layer.weight.requires_grad
            with torch.no_grad():
                assert torch.equal(layer(x)[0], y_train)
            assert torch.equal(layer.quantized_weight()[0], ternary)


def test_segment_errors():
    from bitnet.layers import select_segmented_linear

    with pytest.raises(ValueError, match=r"cover 30 output rows; allowed: exactly this rank's 40"):
        from bitnet.layers import BitNetColumnParallelLinear

        BitNetColumnParallelLinear(24, 40, config=tiny_config(), init_method=torch.nn.init.normal_,
                                   bias=False, bitnet_segments=[("a", 10), ("b", 20)])
    with pytest.raises(ValueError, match=r"segment 'b' has size 0; allowed: a positive int"):
        _row([("a", 10), ("b", 0)])
    with pytest.raises(ValueError, match=r"duplicate segment names"):
        _row([("a", 10), ("a", 10)])
    with pytest.raises(ValueError, match=r"layer type in \['attention_qkv'"):
        select_segmented_linear(BitNetConfig(enabled=True), [("q", 4, "attn")], "column")
    layer = _column(COLUMN_SEGMENTS["mixed"])
    with pytest.raises(ValueError, match=r"2 scales; allowed: one per segment \(3"):
        layer.freeze_quantized(torch.zeros(40, 24, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match=r"full_precision None; allowed: \(20, 24\)"):
        layer.freeze_quantized(torch.zeros(40, 24, dtype=torch.int8), torch.ones(3))


# ------------------------------------------------------------------- the Falcon-H1 mixer
def _micro(fused: bool, bitnet: BitNetConfig | None, seed: int = 3, dtype=torch.float64):
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    cfg = get_preset("falcon_h1_micro").replace(fused_projections=fused)
    return build_model(cfg, linears=falcon_h1_linear_spec(bitnet, cfg.kernel_backend), seed=seed).to(dtype)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)


def test_mixer_builds_fused_segmented_projections():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from bitnet.layers import BitNetColumnParallelLinear, BitNetRowParallelLinear

    mixer = _micro(True, BitNetConfig(enabled=True, layers=ALL)).layers[0].mixer
    assert mixer.fused
    assert isinstance(mixer.in_proj, BitNetColumnParallelLinear)
    assert isinstance(mixer.out_proj, BitNetRowParallelLinear)
    # micro: q 64 + k 32 + v 32 rows; z 64 + x 64 + B 16 + C 16 + dt 4 rows.
    assert [(s.name, s.size, s.quantized) for s in mixer.in_proj.bitnet_segments.segments] == [
        ("qkv", 128, True), ("zxbcdt", 164, True)]
    assert [(s.name, s.size, s.quantized) for s in mixer.out_proj.bitnet_segments.segments] == [
        ("y_ssm", 64, True), ("o_attn", 64, True)]
    partial = _micro(True, BitNetConfig(enabled=True, layers=PARTIAL)).layers[0].mixer
    assert partial.in_proj.bitnet_segments.quantized == (True, False)
    assert type(partial.out_proj) is RowParallelLinear  # neither attention_out nor mamba_out
    plain = _micro(True, BitNetConfig(enabled=True, layers=["mlp"])).layers[0].mixer
    assert type(plain.in_proj) is ColumnParallelLinear and type(plain.out_proj) is RowParallelLinear


def _run(model):
    from falcon_h1.weights import gather_hf_state

    ids, labels = _batch()
    logits = model(ids)
    loss = model(ids, labels=labels).mean()
    loss.backward()
    return logits.detach(), loss.detach(), dict(gather_hf_state(model, grads=True))


@pytest.mark.parametrize("bitnet", [
    dict(layers=ALL), dict(layers=PARTIAL), dict(layers=["attention_qkv", "mamba_out", "mlp"], subln=True),
    dict(layers=["mamba_in", "attention_out"], int8_matmul=True),
], ids=["all", "partial", "partial_subln", "partial_int8"])
def test_fused_equals_unfused_model(bitnet):
    """Same HF-layout weights (the init is layout independent): same logits, loss, gradients.
    float64: the two GEMM layouts differ by float64 rounding only, which cannot move a value
    across a quantisation boundary (see fused_segments_tp_worker.py)."""
    cfg = BitNetConfig(enabled=True, **bitnet)
    fused_logits, fused_loss, fused_grads = _run(_micro(True, cfg))
    logits, loss, grads = _run(_micro(False, cfg))
    assert rel(fused_logits, logits) <= 1e-9
    assert rel(fused_loss, loss) <= 1e-9
    assert fused_grads.keys() == grads.keys()
    for name in grads:
        assert rel(fused_grads[name], grads[name]) <= 1e-9, name


def test_fused_projections_equal_separate_ones_in_float32():
    """In the training dtype, projection by projection on the same inputs: the fused
    in-projection is the concatenation, the fused out-projection the sum, of the separate ones."""
    cfg = BitNetConfig(enabled=True, layers=ALL)
    fused = _micro(True, cfg, dtype=torch.float32).layers[0].mixer
    split = _micro(False, cfg, dtype=torch.float32).layers[0].mixer
    g = torch.Generator().manual_seed(6)
    u = torch.randn(16, 2, 64, generator=g)
    ua, ub = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
    ya = fused.in_proj(ua)[0]
    yb = torch.cat([split.attn_in_proj(ub)[0], split.mamba_in_proj(ub)[0]], -1)
    assert rel(ya, yb) <= 1e-6
    grad = torch.randn(ya.shape, generator=g)
    ya.backward(grad)
    yb.backward(grad)
    assert rel(ua.grad, ub.grad) <= 1e-6
    assert rel(fused.in_proj.weight.grad, torch.cat([split.attn_in_proj.weight.grad,
                                                      split.mamba_in_proj.weight.grad])) <= 1e-6
    # Out: [y_ssm (64), o_attn (64)] of very different scales, as the branches can be.
    h = torch.cat([torch.randn(16, 2, 64, generator=g) * 0.05, torch.randn(16, 2, 64, generator=g)], -1)
    ha, hb = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    oa = fused.out_proj(ha)[0]
    ob = split.mamba_out_proj(hb[..., :64])[0] + split.attn_out_proj(hb[..., 64:])[0]
    assert rel(oa, ob) <= 1e-6
    grad = torch.randn(oa.shape, generator=g)
    oa.backward(grad)
    ob.backward(grad)
    assert rel(ha.grad, hb.grad) <= 1e-6
    assert rel(fused.out_proj.weight.grad, torch.cat([split.mamba_out_proj.weight.grad,
                                                       split.attn_out_proj.weight.grad], 1)) <= 1e-6


# ----------------------------------------------------------------------------- TP=2 vs TP=1
@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_tp") / "results.pt"
    torchrun(Path(__file__).with_name("fused_segments_tp_worker.py"), 2, str(out), timeout=240)
    return torch.load(out)


@pytest.mark.parametrize("variant", ["all", "partial_sp", "partial_subln_sp"])
def test_fused_bitnet_tp2_equals_tp1(tp_results, variant):
    tp1, tp2 = tp_results[f"{variant}_tp1"], tp_results[f"{variant}_tp2"]
    assert rel(tp2["logits"], tp1["logits"]) <= 1e-9
    assert rel(tp2["loss"], tp1["loss"]) <= 1e-9
    assert tp2["grads"].keys() == tp1["grads"].keys()
    for name in tp1["grads"]:
        assert rel(tp2["grads"][name], tp1["grads"][name]) <= 1e-9, name
    # Each segment's scale is the GLOBAL absmean: same ternary weights at both TP sizes (a
    # per-shard mean would change them), scales equal up to float64 summation order.
    for name, w1 in tp1["quantized"].items():
        w2 = tp2["quantized"][name]
        assert torch.equal(torch.sign(w2), torch.sign(w1)), name
        assert rel(w2, w1) <= 1e-12, name
    if variant != "all":
        assert any(":fp" in layout for layout in tp2["segments"].values())


# ---------------------------------------------------------------------------------- export
@pytest.mark.parametrize("layers", [ALL, PARTIAL], ids=["all", "partial"])
def test_export_then_frozen_fused_model_gives_same_logits(tmp_path, layers):
    from bitnet.export import (
        SEGMENTED_FORMAT,
        TernaryWeight,
        export_bitnet_state_dict,
        load_bitnet_export,
        load_frozen_bitnet,
        save_bitnet_state_dict,
    )
    from recipes.bitnet_export import main

    cfg = BitNetConfig(enabled=True, layers=layers)
    model = _micro(True, cfg, seed=8, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # move off the init a little
    ids, labels = _batch(1)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=labels).mean().backward()
        opt.step()
    model.eval()
    path = str(tmp_path / "fused.safetensors")
    export_bitnet_state_dict(model, path)
    export = load_bitnet_export(path)
    entry = export["layers.0.mixer.in_proj.weight"]
    assert isinstance(entry, TernaryWeight) and entry.scale.shape == (2,)
    assert entry.layout == model.layers[0].mixer.in_proj.bitnet_segments
    ternary, scales = model.layers[0].mixer.in_proj.quantized_weight()
    assert torch.equal(entry.ternary, ternary) and torch.equal(entry.scale, scales)
    # Per-segment scales are each segment's own absmean (float64 of the formula).
    w = model.layers[0].mixer.in_proj.weight.detach().double()
    for i, (start, end) in enumerate(entry.layout.ranges()):
        if entry.layout.quantized[i]:
            assert entry.scale[i].item() == pytest.approx(w[start:end].abs().mean().item(), rel=1e-6)
        else:  # full precision: kept as is, ternary and scale 0
            assert entry.scale[i].item() == 0 and not entry.ternary[start:end].any()
            assert torch.equal(entry.full_precision, model.layers[0].mixer.in_proj.weight[start:end])
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == SEGMENTED_FORMAT

    with torch.no_grad():
        expected = model(ids)
    fresh = _micro(True, cfg, seed=99, dtype=torch.float32).eval()  # other weights
    load_frozen_bitnet(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids), expected)

    # The CLI on a saved state dict writes the same export.
    saved = tmp_path / "state.pt"
    save_bitnet_state_dict(model, str(saved))
    main([str(saved), str(tmp_path / "cli.safetensors")])
    via_cli = load_bitnet_export(str(tmp_path / "cli.safetensors"))
    for key, value in export.items():
        if isinstance(value, TernaryWeight):
            other = via_cli[key]
            assert torch.equal(value.ternary, other.ternary) and torch.equal(value.scale, other.scale), key
            assert value.layout == other.layout, key
            assert (value.full_precision is None) == (other.full_precision is None), key
            if value.full_precision is not None:
                assert torch.equal(value.full_precision, other.full_precision), key
        else:
            assert torch.equal(value, via_cli[key]), key


def test_frozen_load_refuses_another_segment_layout(tmp_path):
    from bitnet.export import export_bitnet_state_dict, load_frozen_bitnet

    path = str(tmp_path / "all.safetensors")
    export_bitnet_state_dict(_micro(True, BitNetConfig(enabled=True, layers=ALL), dtype=torch.float32), path)
    other = _micro(True, BitNetConfig(enabled=True, layers=["attention_qkv", "attention_out", "mamba_in",
                                                            "mlp"]), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.out_proj\.weight has segments .* in the export"):
        load_frozen_bitnet(other, path)
