"""The reference quantisers against the spec's test vectors, float64 formulas and onebitllms."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bitnet_testutil import near_tie, np_activation_quant, np_weight_quant  # noqa: E402

import bitnet  # noqa: E402
from bitnet import reference  # noqa: E402

# Test vectors computed in float64 from the BitNet b1.58 formulas (see bitnet/reference.py).
VECTORS = json.loads((Path(__file__).parent / "data" / "bitnet_vectors.json").read_text())


@pytest.mark.parametrize("case", range(len(VECTORS["weights"])))
def test_weight_vectors(case):
    v = VECTORS["weights"][case]
    w = torch.tensor(v["w"], dtype=torch.float32)
    ternary, scale = bitnet.quantize_weights(w)
    assert ternary.dtype == torch.int8 and ternary.shape == w.shape and scale.dim() == 0
    assert ternary.tolist() == v["ternary"]
    assert scale.item() == pytest.approx(v["scale"], rel=1e-6, abs=1e-12)
    dequant = bitnet.dequantize_weights(ternary, scale, torch.float64)
    np.testing.assert_allclose(dequant.numpy(), np.array(v["ternary"]) * v["scale"], rtol=1e-6)


@pytest.mark.parametrize("case", range(len(VECTORS["activations"])))
def test_activation_vectors(case):
    v = VECTORS["activations"][case]
    x = torch.tensor(v["x"], dtype=torch.float32)
    q, scale = bitnet.quantize_activations(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == x.shape[:-1]
    assert q.tolist() == v["int8"]
    np.testing.assert_allclose(scale.double().numpy(), np.array(v["scale_per_token"]), rtol=1e-6)
    np.testing.assert_allclose(
        bitnet.fake_quantize_activations(x).double().numpy(),
        np.array(v["int8"]) * np.array(v["scale_per_token"])[..., None],
        rtol=1e-6,
    )


def test_round_half_up_not_half_even():
    # s = 127 / 127 = 1: the values are their own scaled values.
    x = torch.tensor([127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997])
    q, _ = bitnet.quantize_activations(x)
    # floor(v + 0.5) in float32: 0.49999997 + 0.5 rounds to 1.0 (the spec's literal formula).
    assert q.tolist() == [127, 1, 0, 2, -1, 3, -2, 1]
    w = torch.tensor([0.5, -0.5, 1.5, -1.5])  # mean |w| = 1
    assert bitnet.quantize_weights(w)[0].tolist() == [1, 0, 1, -1]


def test_clamps_and_floors():
    w = torch.tensor([[100.0, -100.0, 0.0, 0.0]])  # outliers clamp to +-1
    assert bitnet.quantize_weights(w)[0].tolist() == [[1, -1, 0, 0]]
    q, m = bitnet.quantize_weights(torch.zeros(3, 3))
    assert (q == 0).all() and m.item() == pytest.approx(1e-5)
    q, s = bitnet.quantize_activations(torch.zeros(2, 4))
    assert (q == 0).all() and s.tolist() == pytest.approx([1e-5 / 127] * 2)
    # A given absmax smaller than the row (not produced by the layers) clamps to [-128, 127].
    q, _ = bitnet.quantize_activations(torch.tensor([[-4.0, 4.0, 1.0]]), torch.tensor([1.0]))
    assert q.tolist() == [[-128, 127, 127]]


@pytest.mark.parametrize("shape", [(9,), (4, 9), (2, 3, 9), (2, 2, 2, 9)])
def test_activation_any_rank(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q, s = bitnet.quantize_activations(x)
    q_rows, s_rows = bitnet.quantize_activations(x.reshape(-1, shape[-1]))
    assert s.shape == shape[:-1]
    assert torch.equal(q.reshape(-1, shape[-1]), q_rows) and torch.equal(s.reshape(-1), s_rows)
    with pytest.raises(ValueError, match="rank >= 1"):
        bitnet.quantize_activations(torch.tensor(1.0))


def _weights_with_ties(seed):
    # mean |w| = 2**-5 exactly; w / m lands on +-0.5, +-1.5 (exact ties) and -1, 0, 1, 2.
    base = torch.tensor([0.5, -0.5, 1.5, -1.5, 1.0, -1.0, 0.0, 2.0]) * 2.0**-5
    order = torch.randperm(48, generator=torch.Generator().manual_seed(seed)) % 8
    return base[order].reshape(6, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weights_against_float64_formula(dtype):
    g = torch.Generator().manual_seed(1)
    cases = [torch.randn(64, 48, generator=g, dtype=torch.float64) * 0.02]
    cases += [_weights_with_ties(s).to(torch.float64) for s in range(3)]
    ties_seen = False
    for w64 in cases:
        w = w64.to(dtype)
        ternary, scale = reference.quantize_weights(w)
        expect, m, v = np_weight_quant(w.double().numpy())
        assert scale.item() == pytest.approx(m, rel=1e-15 if dtype == torch.float64 else 1e-7)
        # Only values within rounding distance of a boundary may differ (none with exact ties).
        free = ~near_tie(v, rel=1e-12 if dtype == torch.float64 else 1e-6)
        assert (ternary.numpy()[free] == expect[free]).all()
        if (np.abs(v - np.floor(v)) == 0.5).any():  # the tie cases are exact
            ties_seen = True
            assert (ternary.numpy() == expect).all()
    assert ties_seen


def _activations_with_ties(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-4, 5, (8, 1), generator=g).double()
    x = (torch.randint(-60, 60, (8, 33), generator=g).double() + 0.5) * torch.exp2(-k)
    x[:, 3] = 127.0 * torch.exp2(-k[:, 0])  # absmax = 127 * 2**-k: s = 2**k, ties exact
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_activations_against_float64_formula(dtype):
    g = torch.Generator().manual_seed(2)
    for x in [torch.randn(5, 7, 40, generator=g, dtype=torch.float64).to(dtype) * 3,
              _activations_with_ties(0, dtype)]:
        q, scale = reference.quantize_activations(x)
        expect, s, v = np_activation_quant(x.double().numpy())
        np.testing.assert_allclose(scale.double().numpy(), s, rtol=1e-15 if dtype == torch.float64 else 1e-7)
        free = ~near_tie(v, rel=1e-12 if dtype == torch.float64 else 1e-6)
        assert (q.numpy()[free] == expect[free]).all()
    ties = _activations_with_ties(1, dtype)
    q, _ = reference.quantize_activations(ties)
    expect, _, v = np_activation_quant(ties.double().numpy())
    assert (np.abs(v - np.floor(v)) == 0.5).mean() > 0.9
    assert (q.numpy() == expect).all()


def test_matches_onebitllms_cpu_weight_quant():
    """onebitllms' CPU quantiser (`_weight_quant`, used by its HF export) rounds half to even
    and returns s = 1 / m; away from ties it agrees with ours. Its Triton kernels need CUDA
    (compared in test_triton_gpu.py)."""
    pytest.importorskip("onebitllms", reason="onebitllms not installed (pip install onebitllms)")
    from onebitllms.utils.quantization_utils import _weight_quant

    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(3)) * 0.02
    theirs, their_s = _weight_quant(w.clone())
    ours, m = reference.quantize_weights(w)
    assert torch.equal(theirs.to(torch.int8), ours)
    assert (1.0 / their_s).item() == pytest.approx(m.item(), rel=1e-6)
    ties = torch.tensor([0.5, -0.5, 1.5, -1.5])  # the documented difference: 0.5 -> 0 there
    assert _weight_quant(ties.clone())[0].tolist() == [0.0, 0.0, 1.0, -1.0]
    assert reference.quantize_weights(ties)[0].tolist() == [1, 0, 1, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantize_and_dequantize_activations_per_segment(dtype):
    """One quantisation gives both forms: the int8 values and scales of the float64 formula per
    segment, and the dequantised tensor, which int8 * scale rebuilds bit for bit."""
    from bitnet.segments import SegmentLayout

    layout = SegmentLayout([("y", 5), ("o", 11)], 1)
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[..., :5] *= 0.01  # a segment of another magnitude: a shared scale would misquantise it
    q, scale, fq = reference.quantize_and_dequantize_activations(x, layout=layout)
    assert q.dtype == torch.int8 and scale.shape == (3, 4, 2) and fq.dtype == dtype
    for i, (start, end) in enumerate(layout.ranges()):
        v_q, v_scale, v = np_activation_quant(x[..., start:end].double().numpy())
        exact = ~near_tie(v)
        assert (q[..., start:end].numpy()[exact] == v_q[exact]).all()
        np.testing.assert_allclose(scale[..., i].double().numpy(), v_scale, rtol=1e-6)
    assert torch.equal(fq, reference.fake_quantize_activations(x, layout=layout))
    assert all(torch.equal(a, b) for a, b in zip((q, scale), reference.quantize_activations(x, layout=layout)))
    assert torch.equal(reference.dequantize_activations(q, scale, dtype, layout), fq)
    q1, s1, fq1 = reference.quantize_and_dequantize_activations(x)  # no layout: one segment
    assert s1.shape == (3, 4) and torch.equal(reference.dequantize_activations(q1, s1, dtype), fq1)
