"""BitNet b1.58 quantisers in plain PyTorch: the readable definition the Triton kernels match.

Numerics (the Triton kernels in `triton_kernels.py` reproduce every rounding step):

Weights, one scale for the whole tensor (BitNet b1.58, "absmean" quantisation):
    S     = sum(|W|) accumulated in float64, N = number of elements
    m     = max(S / N, 1e-5)                     (float64, then rounded to the compute dtype)
    s     = 1 / m                                (float64, then rounded to the compute dtype)
    W_q   = clamp(floor(W * s + 0.5), -1, 1)     (round half UP; W * s rounded first)
    W_fq  = W_q * m                              (what the GEMM uses)

Activations, one scale per row of the last dimension ("per token"):
    a     = max(max_j |x_j|, 1e-5)
    s     = 127 / a
    x_q   = clamp(floor(x * s + 0.5), -128, 127)
    x_fq  = x_q * (a / 127)

The compute dtype is float32, or float64 for float64 input. The float64 sum makes the weight
scale independent of the summation order (tensor-parallel size, kernel blocking) up to the final
rounding, which is what lets TP=1 and TP=2 produce the same ternary weights. The dequantised
values are `q * scale` (not `q / s` as in onebitllms) so that an exported (ternary, scale) pair
reproduces the training forward bit for bit; the two differ by at most one float rounding.

`layout` arguments (`bitnet.segments.SegmentLayout`, fused projections): each quantised
segment is quantised exactly as the formulas above quantise a separate tensor: one weight scale
per segment (stats [n, 2], scales [n]), activations per row and per segment of the last
dimension (absmax and scales [..., n]). Full-precision segments pass through the fake quantisers
and are 0 in the int8 / ternary outputs. Without a layout a tensor is one segment: stats [2], a
0-d weight scale, activation scales shaped x.shape[:-1].

`stats` arguments: float64 `[sum(|W|), N]` per segment, given when the sum runs over more than
the tensor at hand (a tensor-parallel shard: the layer all-reduces it over the TP group).
`absmax` arguments: per-row max|x| (before the 1e-5 clamp), given when the row is sharded.
"""

from __future__ import annotations

import torch

from bitnet.segments import feature_layout, weight_layout

WEIGHT_EPS = 1e-5
ACTIVATION_EPS = 1e-5
ACTIVATION_LEVELS = 127.0


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def true_div(num, den) -> torch.Tensor:
    """IEEE division, rounded once. `scalar / t` in PyTorch is `t.reciprocal() * scalar` (two
    roundings), and on CUDA `t / scalar` multiplies by the reciprocal; tensor / tensor divides."""
    if not isinstance(num, torch.Tensor):
        num = torch.full_like(den, num)
    if not isinstance(den, torch.Tensor):
        den = torch.full_like(num, den)
    return torch.div(num, den)


def round_half_up(v: torch.Tensor) -> torch.Tensor:
    # floor(v + 0.5), not torch.round (which rounds half to even).
    return torch.floor(v + 0.5)


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


# ----------------------------------------------------------------------------- weights
def _abs_sum_and_numel(w: torch.Tensor) -> torch.Tensor:
    abs_sum = w.detach().abs().sum(dtype=torch.float64)
    return torch.stack([abs_sum, abs_sum.new_tensor(float(w.numel()))])


def weight_scales(w: torch.Tensor, stats: torch.Tensor):
    """(m, s) in the compute dtype of `w`, from one segment's float64 `[sum|W|, N]`: the
    dequantisation scale and its reciprocal."""
    mean = torch.clamp(true_div(stats[0], stats[1]), min=WEIGHT_EPS)  # float64
    c = compute_dtype(w)
    return mean.to(c), true_div(1.0, mean).to(c)


def _quantize_weight_segment(w: torch.Tensor, stats: torch.Tensor):
    m, s = weight_scales(w, stats)
    return torch.clamp(round_half_up(w.detach().to(m.dtype) * s), -1, 1).to(torch.int8), m


def weight_stats(w: torch.Tensor, layout=None) -> torch.Tensor:
    """float64 `[sum(|w|), numel]` of this tensor (shard); [n, 2], one row per segment, with a
    layout."""
    w2, lay = weight_layout(w, layout)
    stats = torch.stack([_abs_sum_and_numel(part) for part in lay.split(w2, lay.dim)])
    return stats if layout is not None else stats[0]


def quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None, layout=None):
    """-> (ternary int8 shaped like w, scale): dequantised = ternary * scale, one scale per
    segment ([n]; 0 for full-precision segments, whose ternary is 0) or 0-d without a layout."""
    w2, lay = weight_layout(w, layout)
    stats = weight_stats(w2, lay) if stats is None else stats.reshape(len(lay), 2)
    ternary, scales = [], []
    for part, part_stats, quantized in zip(lay.split(w2, lay.dim), stats, lay.quantized):
        q, m = _quantize_weight_segment(part, part_stats)
        ternary.append(q if quantized else torch.zeros_like(q))
        scales.append(m if quantized else torch.zeros_like(m))
    ternary, scales = _cat(ternary, lay.dim), torch.stack(scales)
    return (ternary, scales) if layout is not None else (ternary.reshape(w.shape), scales[0])


def fake_quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None, layout=None,
                          row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantised ternary weight in w's dtype; full-precision segments as they are.
    row_scale: constant multipliers of w's rows ([rows]), applied after, in w's dtype."""
    if row_scale is not None:
        fq = fake_quantize_weights(w, stats, layout)
        return fq * row_scale.reshape(-1).to(fq.dtype).unsqueeze(-1)
    w2, lay = weight_layout(w, layout)
    stats = weight_stats(w2, lay) if stats is None else stats.reshape(len(lay), 2)
    parts = []
    for part, part_stats, quantized in zip(lay.split(w2, lay.dim), stats, lay.quantized):
        if quantized:
            q, m = _quantize_weight_segment(part, part_stats)
            parts.append(dequantize_weights(q, m, w.dtype))
        else:
            parts.append(part.detach())
    return _cat(parts, lay.dim).reshape(w.shape)


def dequantize_weights(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, layout=None) -> torch.Tensor:
    """ternary * scale (with a layout: * its segment's scale)."""
    if layout is not None:
        scale = layout.along_weight(scale)
    return (q.to(scale.dtype) * scale).to(dtype)


# ------------------------------------------------------------------------- activations
def _absmax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax(dim=-1).to(compute_dtype(x))


def _quantize_activation_segment(x: torch.Tensor, absmax: torch.Tensor):
    c = compute_dtype(x)
    a = torch.clamp(absmax.to(c), min=ACTIVATION_EPS)
    s = true_div(ACTIVATION_LEVELS, a)
    q = torch.clamp(round_half_up(x.detach().to(c) * s.unsqueeze(-1)), -128, 127)
    return q.to(torch.int8), true_div(a, ACTIVATION_LEVELS)


def activation_absmax(x: torch.Tensor, layout=None) -> torch.Tensor:
    """Per-row max|x| over the last dimension, in the compute dtype (no clamp); [..., n], per
    segment of the last dimension, with a layout."""
    lay = feature_layout(x, layout)
    absmax = torch.stack([_absmax(part) for part in lay.split(x, -1)], dim=-1)
    return absmax if layout is not None else absmax[..., 0]


def _activation_segments(x: torch.Tensor, absmax: torch.Tensor | None, layout):
    """(segment of x, its int8 values, its per-row scale, quantised flag) per segment of x's last
    dimension."""
    lay = feature_layout(x, layout)
    if absmax is None:
        absmax = activation_absmax(x, lay)
    elif layout is None:
        absmax = absmax.unsqueeze(-1)
    for i, (part, quantized) in enumerate(zip(lay.split(x, -1), lay.quantized)):
        q, scale = _quantize_activation_segment(part, absmax[..., i])
        yield part, q, scale, quantized


def _int8_and_scales(segments, layout):
    values, scales = [], []
    for _, q, scale, quantized in segments:
        values.append(q if quantized else torch.zeros_like(q))
        scales.append(scale)
    values, scales = _cat(values, -1), torch.stack(scales, dim=-1)
    return values, (scales if layout is not None else scales[..., 0])


def quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None, layout=None):
    """-> (int8 tensor shaped like x, scale per row shaped x.shape[:-1], or [..., n] per row and
    segment with a layout); dequantised = int8 * scale. Full-precision segments: int8 0 (their
    scale is computed but unused)."""
    return _int8_and_scales(list(_activation_segments(x, absmax, layout)), layout)


def fake_quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None, layout=None) -> torch.Tensor:
    """The dequantised int8 activations in x's dtype; full-precision segments as they are."""
    parts = [dequantize_activations(q, scale, x.dtype) if quantized else part.detach()
             for part, q, scale, quantized in _activation_segments(x, absmax, layout)]
    return _cat(parts, -1)


def quantize_and_dequantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None, layout=None):
    """-> (int8, scales, dequantised): `quantize_activations` and `fake_quantize_activations` of
    the same x from one quantisation. `dequantize_activations(int8, scales, x.dtype, layout)`
    rebuilds the dequantised tensor bit for bit where every segment is quantised (a
    full-precision segment is int8 0 but x as it is in the dequantised tensor)."""
    segments = list(_activation_segments(x, absmax, layout))
    fake = _cat([dequantize_activations(q, scale, x.dtype) if quantized else part.detach()
                 for part, q, scale, quantized in segments], -1)
    return (*_int8_and_scales(segments, layout), fake)


def dequantize_activations(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, layout=None) -> torch.Tensor:
    """int8 * its row's scale (scale shaped q.shape[:-1]; with a layout [..., n], one per row and
    segment)."""
    scale = scale.unsqueeze(-1) if layout is None else layout.along_features(scale)
    return (q.to(scale.dtype) * scale).to(dtype)


# ------------------------------------------------------------------------------ matmul
def int8_linear(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """y = (x_q @ w_q^T) * x_scale * w_scale for 2-D x_q [M, K], w_q [N, K]; float32 result.

    The integer product is exact in float64 (|sum| <= 128 * K < 2**53), so this is the exact
    value the int8 tensor-core GEMM computes in int32, before the float rescale."""
    acc = x_q.to(torch.float64) @ w_q.to(torch.float64).t()
    return (acc.to(torch.float32) * x_scale.to(torch.float32).unsqueeze(-1)) * w_scale.to(torch.float32)
