"""BitNet b1.58 quantisers in plain PyTorch: the readable definition the Triton kernels match.

Numerics (the Triton kernels in `triton_kernels.py` reproduce every rounding step):

Weights, one scale for the whole tensor (`/work/shared/specs/bitnet.md`):
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

`stats` arguments: a float64 tensor `[sum(|W|), N]`, given when the sum runs over more than
the tensor at hand (a tensor-parallel shard: the layer all-reduces it over the TP group).
`absmax` arguments: per-row max|x| (before the 1e-5 clamp), given when the row is sharded.

The `*_segmented` functions (fused projections, see `bitnet.segments`) apply the functions
above to each segment's slice: stats [n, 2], one weight scale per segment, activations
quantised per row and per segment of the last dimension (absmax [..., n]).
"""

from __future__ import annotations

import torch

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


# ----------------------------------------------------------------------------- weights
def weight_stats(w: torch.Tensor) -> torch.Tensor:
    """float64 `[sum(|w|), numel]` of this tensor (shard)."""
    abs_sum = w.detach().abs().sum(dtype=torch.float64)
    return torch.stack([abs_sum, abs_sum.new_tensor(float(w.numel()))])


def weight_scales(w: torch.Tensor, stats: torch.Tensor | None = None):
    """(m, s) in the compute dtype of `w`: dequantisation scale and its reciprocal."""
    if stats is None:
        stats = weight_stats(w)
    mean = torch.clamp(true_div(stats[0], stats[1]), min=WEIGHT_EPS)  # float64
    c = compute_dtype(w)
    return mean.to(c), true_div(1.0, mean).to(c)


def quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None):
    """-> (ternary int8 tensor shaped like w, 0-d scale); dequantised = ternary * scale."""
    m, s = weight_scales(w, stats)
    q = torch.clamp(round_half_up(w.detach().to(m.dtype) * s), -1, 1)
    return q.to(torch.int8), m


def fake_quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantised ternary weight, in w's dtype."""
    q, m = quantize_weights(w, stats)
    return dequantize_weights(q, m, w.dtype)


def dequantize_weights(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(scale.dtype) * scale).to(dtype)


# ------------------------------------------------------------------------- activations
def activation_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row max|x| over the last dimension, in the compute dtype (no clamp)."""
    return x.detach().abs().amax(dim=-1).to(compute_dtype(x))


def quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None):
    """-> (int8 tensor shaped like x, scale per row shaped x.shape[:-1]);
    dequantised = int8 * scale[..., None]."""
    if x.dim() < 1:
        raise ValueError(f"quantize_activations: x must have rank >= 1, got shape {tuple(x.shape)}")
    c = compute_dtype(x)
    if absmax is None:
        absmax = activation_absmax(x)
    a = torch.clamp(absmax.to(c), min=ACTIVATION_EPS)
    s = true_div(ACTIVATION_LEVELS, a)
    q = torch.clamp(round_half_up(x.detach().to(c) * s.unsqueeze(-1)), -128, 127)
    return q.to(torch.int8), true_div(a, ACTIVATION_LEVELS)


def fake_quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantised int8 activations, in x's dtype."""
    q, scale = quantize_activations(x, absmax)
    return dequantize_activations(q, scale, x.dtype)


def dequantize_activations(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(scale.dtype) * scale.unsqueeze(-1)).to(dtype)


# ------------------------------------------------------------------------------ matmul
def int8_linear(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """y = (x_q @ w_q^T) * x_scale * w_scale for 2-D x_q [M, K], w_q [N, K]; float32 result.

    The integer product is exact in float64 (|sum| <= 128 * K < 2**53), so this is the exact
    value the int8 tensor-core GEMM computes in int32, before the float rescale."""
    acc = x_q.to(torch.float64) @ w_q.to(torch.float64).t()
    return (acc.to(torch.float32) * x_scale.to(torch.float32).unsqueeze(-1)) * w_scale.to(torch.float32)


# ---------------------------------------------------------------- segmented (fused) linears
# `layout` is a `bitnet.segments.SegmentLayout`. Each quantised segment is quantised exactly as
# the functions above quantise a separate tensor (they are called on the segment's slice);
# full-precision segments pass through (fake quantisers) or become 0 (int8 / ternary outputs).
def segment_weight_stats(w: torch.Tensor, layout) -> torch.Tensor:
    """float64 [n, 2]: `[sum(|w|), numel]` of every segment of this tensor (shard)."""
    return torch.stack([weight_stats(part) for part in layout.split(w, layout.dim)])


def quantize_weights_segmented(w: torch.Tensor, layout, stats: torch.Tensor | None = None):
    """-> (ternary int8 like w, scales [n]): dequantised segment i = ternary * scales[i].
    Full-precision segments: ternary 0 and scale 0 (their weights are kept elsewhere)."""
    if stats is None:
        stats = segment_weight_stats(w, layout)
    ternary, scales = [], []
    for i, (part, quantized) in enumerate(zip(layout.split(w, layout.dim), layout.quantized)):
        q, m = quantize_weights(part, stats[i])
        ternary.append(q if quantized else torch.zeros_like(q))
        scales.append(m if quantized else torch.zeros_like(m))
    return torch.cat(ternary, dim=layout.dim), torch.stack(scales)


def fake_quantize_weights_segmented(w: torch.Tensor, layout, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Quantised segments dequantised (each with its own scale), full-precision ones as they are."""
    if stats is None:
        stats = segment_weight_stats(w, layout)
    parts = [
        fake_quantize_weights(part, stats[i]) if quantized else part.detach()
        for i, (part, quantized) in enumerate(zip(layout.split(w, layout.dim), layout.quantized))
    ]
    return torch.cat(parts, dim=layout.dim)


def dequantize_weights_segmented(q: torch.Tensor, scales: torch.Tensor, layout, dtype: torch.dtype) -> torch.Tensor:
    """ternary * (its segment's scale), as `dequantize_weights` does per segment."""
    return (q.to(scales.dtype) * layout.along_weight(scales)).to(dtype)


def segment_activation_absmax(x: torch.Tensor, layout) -> torch.Tensor:
    """[..., n]: per-row max|x| over each segment of the last dimension (no clamp)."""
    return torch.stack([activation_absmax(part) for part in layout.split(x, -1)], dim=-1)


def quantize_activations_segmented(x: torch.Tensor, layout, absmax: torch.Tensor | None = None):
    """-> (int8 like x, scales [..., n]): every segment of the last dim quantised per row with
    its own absmax. Full-precision segments: int8 0 (their scale is computed but unused)."""
    if absmax is None:
        absmax = segment_activation_absmax(x, layout)
    values, scales = [], []
    for i, (part, quantized) in enumerate(zip(layout.split(x, -1), layout.quantized)):
        q, scale = quantize_activations(part, absmax[..., i])
        values.append(q if quantized else torch.zeros_like(q))
        scales.append(scale)
    return torch.cat(values, dim=-1), torch.stack(scales, dim=-1)


def fake_quantize_activations_segmented(x: torch.Tensor, layout, absmax: torch.Tensor | None = None) -> torch.Tensor:
    if absmax is None:
        absmax = segment_activation_absmax(x, layout)
    parts = [
        fake_quantize_activations(part, absmax[..., i]) if quantized else part.detach()
        for i, (part, quantized) in enumerate(zip(layout.split(x, -1), layout.quantized))
    ]
    return torch.cat(parts, dim=-1)
