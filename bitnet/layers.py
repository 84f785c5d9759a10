"""BitNet b1.58 versions of Megatron Core's tensor-parallel linear layers.

The layers keep Megatron's forward (returns `(output, bias)`, gather_output, input_is_parallel,
sequence parallel, gradient all-reduce): they override only `_forward_impl`, the matmul step,
which quantises the input, takes the quantised weight and runs the GEMM as one autograd function
(`bitnet.quantized_gemm`: fake-quantised float or int8 GEMM, straight-through gradients, the int8
input kept for the backward). The weight is quantised once per optimizer step and reused by every
forward, backward and recompute until it changes (`bitnet.weight_cache`). How a layer computes is
fixed when it is built (`BitNetLinearOptions`); nothing process-wide changes it.

Tensor parallelism does not change the model (unlike Megatron-LM PR 3002, which quantises each
shard with its own mean):
- the weight scale is the mean |W| of the FULL weight: each rank's float64 `[sum|W|, numel]`
  is all-reduced over the TP group before quantising;
- activation scales are per token over the full feature dimension: the column layer sees full
  tokens; the row layer's input is sharded along features, so the per-token absmax is
  all-reduced (MAX) over the TP group.
Gradients are straight-through (identity through both quantisers).

Fused projections (`bitnet_segments`, see `bitnet.segments`): a column linear whose output rows,
or a row linear whose input features, are the concatenation of several projections quantises
every segment as that projection alone would be (own global absmean, own per-token scale for
row-linear inputs, own on/off switch), so fusing does not change the model. A plain projection
is the one-segment layout: plain and fused layers run the same code.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from bitnet import kernels, reference
from bitnet.quantized_gemm import QuantizedInput, QuantizedWeight, quantized_gemm
from bitnet.segments import Segment, SegmentLayout, single_segment
from bitnet.weight_cache import QuantizedWeightCache
from falcon_h1.errors import ConfigValueError

# Values allowed in `bitnet.layers` of the recipe.
ALLOWED_LAYERS = ("attention_qkv", "attention_out", "mamba_in", "mamba_out", "mlp", "lm_head")
# layer_type for select_linear -> the `bitnet.layers` entries that switch it on. fused_in /
# fused_out: a whole fused mixer projection as ONE quantised weight, on when either part is
# (the Falcon-H1 mixer uses select_segmented_linear instead, which quantises part by part).
LAYER_TYPES = {
    "attention_qkv": {"attention_qkv"},
    "attention_out": {"attention_out"},
    "mamba_in": {"mamba_in"},
    "mamba_out": {"mamba_out"},
    "mlp": {"mlp"},
    "fused_in": {"attention_qkv", "mamba_in"},
    "fused_out": {"attention_out", "mamba_out"},
    "lm_head": {"lm_head"},
}


# Values of `bitnet.saved_input`: what the backward keeps of a quantised projection's input.
SAVED_INPUTS = ("auto", "int8", "float")
# What "auto" keeps on the fused float GEMM (the int8 GEMM reads and keeps int8 either way).
# Measured (benchmarks/NOTES.md, session 17): the 0.5B step is 6 ms faster keeping the bf16 input
# than dequantising int8 for the weight gradient, at 1.2% more memory than the bf16 model.
AUTO_SAVED_INPUT = "float"


@dataclass(frozen=True)
class BitNetLinearOptions:
    """Per-layer choices, fixed when the layer is built (from the BitNet config, see
    `options_from_config`)."""

    fused: bool = True  # the GEMM as one autograd function (bitnet.quantized_gemm); False: a float
    #                     GEMM of x + (q(x) - x).detach() and W + (q(W) - W).detach()
    int8_matmul: bool = False  # int8 x ternary forward GEMM (int8 tensor cores on CUDA)
    subln: bool = False  # non-learnable RMSNorm of the input before quantising it
    kernel_backend: str = "auto"  # bitnet.kernels.KERNEL_BACKENDS: Triton on CUDA, or the reference
    # The backward keeps the int8 input and its scales (1 byte an element) and dequantises it for
    # the weight gradient, instead of the fake-quantised float input (fused float GEMM only; the
    # int8 GEMM always keeps int8). Same gradients bit for bit.
    keep_int8_input: bool = AUTO_SAVED_INPUT == "int8"

    def __post_init__(self):
        kernels.validate_kernel_backend(self.kernel_backend)


def keeps_int8_input(bitnet_cfg) -> bool:
    """Whether the backward keeps int8 inputs under `bitnet_cfg.saved_input`, which is checked
    against the GEMM path first: "int8" needs the fused or int8 GEMM (the reference pattern keeps
    what autograd keeps, the float input), "float" the float GEMM (the int8 one reads int8)."""
    value = getattr(bitnet_cfg, "saved_input", "auto")
    if value not in SAVED_INPUTS:
        raise ConfigValueError("bitnet.saved_input", value, f"one of {list(SAVED_INPUTS)}")
    if value == "int8" and not (bitnet_cfg.fused or bitnet_cfg.int8_matmul):
        raise ConfigValueError(
            "bitnet.saved_input", value, "'auto' or 'float'",
            message="bitnet.saved_input = 'int8' needs the fused GEMM, but bitnet.fused = false (and "
                    "bitnet.int8_matmul = false): the reference pattern's autograd keeps the float input. "
                    "Set bitnet.fused=true, or bitnet.saved_input to 'auto' or 'float'.")
    if value == "float" and bitnet_cfg.int8_matmul:
        raise ConfigValueError(
            "bitnet.saved_input", value, "'auto' or 'int8'",
            message="bitnet.saved_input = 'float' with bitnet.int8_matmul = true: the int8 GEMM reads the "
                    "int8 input and keeps it for the backward. Set bitnet.int8_matmul=false, or "
                    "bitnet.saved_input to 'auto' or 'int8'.")
    if bitnet_cfg.int8_matmul:
        return True
    return (AUTO_SAVED_INPUT if value == "auto" else value) == "int8"


def options_from_config(bitnet_cfg, kernel_backend: str = "auto") -> BitNetLinearOptions:
    """bitnet_cfg: recipes.config.BitNetConfig; kernel_backend: the model's (auto | reference |
    triton)."""
    return BitNetLinearOptions(
        fused=bool(bitnet_cfg.fused),
        int8_matmul=bool(bitnet_cfg.int8_matmul),
        subln=bool(bitnet_cfg.subln),
        kernel_backend=kernel_backend,
        keep_int8_input=keeps_int8_input(bitnet_cfg),
    )


class NonFiniteWeightError(ValueError):
    pass


class _NonFiniteWeightWatch:
    """Raises when a weight's |W| sum is not finite, i.e. the weight holds an inf or NaN.

    CPU: checked at once. CUDA: reading the sum would stall the forward on a host
    synchronisation, so the sum is copied into pinned host memory asynchronously and read at the
    next forward of the layer, once the copy has landed (`event.query()` does not wait). The
    error therefore comes one forward late; a NaN weight stays NaN, so it is still caught."""

    def __init__(self):
        self._host = None
        self._event = None
        self._pending = False

    def check(self, abs_sum: torch.Tensor, label) -> None:
        if not abs_sum.is_cuda:
            _raise_if_nonfinite(float(abs_sum), label)
            return
        if torch.cuda.is_current_stream_capturing():
            return
        self.poll(label)
        if not self._pending:
            if self._host is None:
                self._host = torch.empty((), dtype=torch.float64, pin_memory=True)
                self._event = torch.cuda.Event()
            self._host.copy_(abs_sum, non_blocking=True)
            self._event.record()
            self._pending = True

    def poll(self, label) -> None:
        """Check the copy in flight if it has landed (a forward that reuses the cached
        quantisation makes no new sum, but still reports the last one). Not while a CUDA graph
        is captured, where querying an event is not allowed."""
        if self._pending and not torch.cuda.is_current_stream_capturing() and self._event.query():
            self._pending = False
            _raise_if_nonfinite(self._host.item(), label)

    def flush(self, label) -> None:
        """Wait for the copy in flight and check it."""
        if self._pending:
            self._event.synchronize()
            self._pending = False
            _raise_if_nonfinite(self._host.item(), label)


def _raise_if_nonfinite(abs_sum: float, label) -> None:
    if not math.isfinite(abs_sum):
        raise NonFiniteWeightError(
            f"BitNet: parameter {label()} holds non-finite values (sum |W| = {abs_sum}); "
            "its ternary quantisation is undefined. Allowed: finite weights only — lower the "
            "learning rate or resume from an earlier checkpoint."
        )


class _AllReduceSum(torch.autograd.Function):
    """All-reduce SUM whose backward is also an all-reduce SUM: every rank's output depends on
    every rank's input (the SubLN sum of squares of a feature-sharded row)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _part(t: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
    """t[start:end] along dim; the tensor itself when that is all of it (no slice for autograd
    to scatter back, as with a plain projection's one segment)."""
    if start == 0 and end == t.shape[dim]:
        return t
    return t.narrow(dim, start, end - start)


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class _BitNetLinearMixin:
    """The quantised matmul shared by the column and row layers.

    Every layer runs on a `SegmentLayout` (`_layout`): a plain projection's is one segment, a
    fused projection's the `bitnet_segments` it was built with. `_input_layout` holds the
    segments of the input features: the row linear's own; one segment for a column linear,
    whose input every output row shares."""

    default_bitnet_options = BitNetLinearOptions()
    # µP folding multiplies the weight by per-row multipliers before the GEMM; a quantised weight
    # would be re-quantised with another absmean (other ternary values). The column linear takes
    # the multipliers as `output_row_scale` instead, applied to the weight after quantising it.
    supports_weight_scaling = False
    _input_sharded_along_features = False
    _segment_dim = 0  # bitnet_segments run along the weight's output rows (column linear)
    _output_row_scale = None  # set for one forward (BitNetColumnParallelLinear.forward)

    def _bitnet_setup(self, options: BitNetLinearOptions | None, name: str | None, segments,
                      local_size: int) -> None:
        self.bitnet_options = options if options is not None else self.default_bitnet_options
        self.bitnet_name = name
        self._finite_watch = _NonFiniteWeightWatch()
        self._frozen = False
        self._tp_size = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        # The segments as built (None: a plain projection; the export format records which).
        self.bitnet_segments = None if segments is None else SegmentLayout(segments, self._segment_dim)
        self._layout = (single_segment(local_size, self._segment_dim) if self.bitnet_segments is None
                        else self.bitnet_segments)
        if self._layout.size != local_size:
            what = "output rows" if self._segment_dim == 0 else "input features"
            raise ValueError(
                f"{type(self).__name__}: bitnet_segments {self._layout} cover {self._layout.size} {what}; "
                f"allowed: exactly this rank's {local_size}"
            )
        self._input_layout = self._layout if self._segment_dim == 1 else single_segment(self.input_size, 1)
        self._weight_cache = QuantizedWeightCache()
        self._refuse_unsupported_megatron_features()

    def _refuse_unsupported_megatron_features(self) -> None:
        """Megatron features its own linear function implements and the BitNet GEMM does not."""
        unsupported = {
            "config.defer_embedding_wgrad_compute": bool(getattr(self.config, "defer_embedding_wgrad_compute", False)),
            "tensor-parallel weight rematerialisation (gtp_remat_size > 1)": getattr(self, "gtp_remat_size", 1) > 1,
        }
        for what, on in unsupported.items():
            if on:
                raise ValueError(f"{type(self).__name__}: {what} is on; BitNet linears compute their weight "
                                 "gradient in the backward of their own GEMM. Allowed: off")

    @property
    def _kernel_backend(self) -> str:
        return self.bitnet_options.kernel_backend

    # ------------------------------------------------------------------- quantisation pieces
    def _weight_label(self) -> str:
        if self.bitnet_name:
            return f"{self.bitnet_name}.weight"
        return (
            f"{type(self).__name__}(in={self.input_size}, out={self.output_size}).weight "
            "(call bitnet.layers.label_bitnet_layers(model) for its full name)"
        )

    def weight_stats(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """float64 [n_segments, 2] of `[sum|W|, numel]` of the full (unsharded) weight, one row
        per segment (one for a plain projection); checks the quantised weights are finite."""
        weight = self.weight if weight is None else weight
        with torch.no_grad():
            stats = kernels.weight_stats(weight, self._layout, self._kernel_backend)
            if self._tp_size > 1:
                dist.all_reduce(stats, group=self.tp_group)
            checked = self._quantized_abs_sum(stats)
        self._finite_watch.check(checked, self._weight_label)
        return stats

    def _quantized_abs_sum(self, stats: torch.Tensor) -> torch.Tensor:
        # Full-precision segments are not checked, as a plain linear's weight is not.
        sums = stats[:, 0]
        if not self._layout.all_quantized:
            quantized = self._layout.tables(sums.device).quantized
            sums = torch.where(quantized, sums, torch.zeros_like(sums))
        return sums[0] if len(sums) == 1 else sums.sum()  # one segment: no reduction kernel

    def _quantize_weight(self, weight: torch.Tensor):
        """(ternary int8, scales [n_segments]) of `weight` without gradient (see quantized_weight)."""
        with torch.no_grad():
            if self._frozen:
                return self.frozen_ternary, self.frozen_scale
            return kernels.quantize_weights(weight, self.weight_stats(weight), self._layout, self._kernel_backend)

    def quantized_weight(self):
        """(ternary int8 of this rank's shard, scale of the full weight): the scale is 0-d for a
        plain projection, one per segment ([n_segments]) with bitnet_segments (full-precision
        segments have ternary 0 and scale 0)."""
        ternary, scales = self._quantize_weight(self.weight)
        self._finite_watch.flush(self._weight_label)
        return ternary, (scales if self.bitnet_segments is not None else scales.reshape(()))

    # ------------------------------------------------------------------- the GEMM operands
    def _gemm_weight(self, weight: torch.Tensor) -> QuantizedWeight:
        """The quantised weight the GEMM multiplies (with this forward's output row scale folded
        in): from the cache while `weight` is the layer's unchanged parameter, else made now."""
        row_scale = self._output_row_scale
        if self._frozen:
            frozen = self._gemm_weight_from(self.frozen_ternary, self.frozen_scale, fake=self.weight)
            return frozen.with_row_scale(row_scale)
        self._finite_watch.poll(self._weight_label)
        make = lambda: self._make_gemm_weight(weight, row_scale)
        if weight is self.weight:
            return self._weight_cache.get(weight, make, also=row_scale)
        return make()

    def _make_gemm_weight(self, weight: torch.Tensor, row_scale: torch.Tensor | None) -> QuantizedWeight:
        with torch.no_grad():
            stats = self.weight_stats(weight)
            if self.bitnet_options.int8_matmul:
                ternary, scales = kernels.quantize_weights(weight, stats, self._layout, self._kernel_backend)
                return self._gemm_weight_from(ternary, scales).with_row_scale(row_scale)
            # full-precision segments pass through as they are; the row scale in the same pass
            fq = kernels.fake_quantize_weights(weight, stats, self._layout, self._kernel_backend, row_scale=row_scale)
            return QuantizedWeight(fq=fq, grad_row_scale=None if row_scale is None else row_scale.reshape(-1))

    def _gemm_weight_from(self, ternary, scales, fake=None) -> QuantizedWeight:
        """int8 GEMM: the ternary weight with its scales, one per output row (column linear) or
        per input segment (row linear, one GEMM a segment); float GEMM: the dequantised `fake`."""
        if not self.bitnet_options.int8_matmul:
            return QuantizedWeight(fq=fake)
        if self._segment_dim == 0:
            scales = self._layout.along_weight(scales).reshape(-1)
        return QuantizedWeight(q=ternary, scale=scales)

    def _quantized_input(self, x: torch.Tensor) -> QuantizedInput:
        """x quantised per token (and input segment) in the form the GEMM reads and the backward
        keeps."""
        layout, options = self._input_layout, self.bitnet_options
        absmax = self._input_absmax(x)
        if options.int8_matmul:
            q, scale = kernels.quantize_activations(x, absmax, layout, self._kernel_backend)
            return QuantizedInput(q, scale, None, layout)
        if options.fused and options.keep_int8_input and layout.all_quantized:
            q, scale, fq = kernels.quantize_and_dequantize_activations(x, absmax, layout, self._kernel_backend)
            return QuantizedInput(q, scale, fq, layout)
        return QuantizedInput(None, None, kernels.fake_quantize_activations(x, absmax, layout, self._kernel_backend),
                              layout)

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor, x_quantized: QuantizedInput,
                w_quantized: QuantizedWeight, sequence_group=None) -> torch.Tensor:
        """The quantised GEMM of `x` [..., K] and `weight` [N, K] (or the parts of them the
        quantised operands stand for), straight-through gradients to both. sequence_group: x
        holds this rank's tokens (see _forward_impl)."""
        options = self.bitnet_options
        if self._gathers_inside_gemm:
            return quantized_gemm(x, weight, x_quantized, w_quantized, options.int8_matmul, self._kernel_backend,
                                  sequence_group)
        # the reference pattern: autograd through two elementwise straight-through graphs (of the
        # row-scaled weight when a scale is folded in, so that its gradient carries the scale)
        s = w_quantized.grad_row_scale
        w = weight if s is None else weight * s.to(weight.dtype).unsqueeze(-1)
        return F.linear(x + (x_quantized.fq - x).detach(), w + (w_quantized.fq - w).detach())

    def _input_absmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token absmax of every input segment over the full feature dimension, [..., n],
        when this rank holds a slice of it; None when the kernel may take it from the local row."""
        if not (self._input_sharded_along_features and self._tp_size > 1):
            return None
        with torch.no_grad():
            absmax = kernels.activation_absmax(x, self._input_layout, self._kernel_backend)
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=self.tp_group)
        return absmax

    def _subln(self, x: torch.Tensor) -> torch.Tensor:
        """Non-learnable RMSNorm of each quantised input segment over its full features (all
        ranks' slices); full-precision segments as they are, as their own projections would
        see them."""
        layout = self._input_layout
        xf = x.to(reference.compute_dtype(x))  # float32 (float64 for float64 input)
        parts = layout.split(xf, -1)
        sum_sq = torch.stack([(p * p).sum(dim=-1) for p in parts], dim=-1)  # [..., n], one reduce
        shards = 1
        if self._input_sharded_along_features and self._tp_size > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, self.tp_group)
            shards = self._tp_size  # Megatron shards every segment evenly
        out = []
        for i, (segment, raw, part) in enumerate(zip(layout.segments, layout.split(x, -1), parts)):
            if not segment.quantized:
                out.append(raw)
                continue
            inv_rms = torch.rsqrt(sum_sq[..., i : i + 1] / (segment.size * shards) + self.config.layernorm_epsilon)
            out.append((part * inv_rms).to(x.dtype))
        return _cat(out, -1)

    # ------------------------------------------------------------------------------ forward
    def _forward_impl(self, input, weight, *, bias=None, allreduce_dgrad=False, sequence_parallel=False,
                      tp_group=None, **_megatron_kwargs):
        """The matmul step of Megatron's forward, with the communication Megatron's linear
        function does around its GEMM. The other keywords are Megatron's settings for its own
        function: gradient-accumulation fusion (off: the weight gradient takes the ordinary path,
        param.grad, which Megatron's DDP hooks add to main_grad) and the features refused when the
        layer is built."""
        group = tp_group if tp_group is not None else self.tp_group
        # Sequence parallel: the input holds this rank's tokens with every feature, and both
        # per-token quantisation and SubLN are token by token, so they run on the local tokens
        # and the GEMM function gathers (keeping the local int8 input, as Megatron keeps its
        # local bf16 one); the reference-STE pattern gathers first.
        local_tokens = sequence_parallel and self._gathers_inside_gemm and dist.get_world_size(group) > 1
        x = input if local_tokens else self._gather_input(input, allreduce_dgrad, sequence_parallel, tp_group)
        x_in = self._subln(x) if self.bitnet_options.subln else x
        y = self._gemm(x, x_in, weight, self._quantized_input(x_in), self._gemm_weight(weight),
                       group if local_tokens else None)
        return y + bias if bias is not None else y

    @property
    def _gathers_inside_gemm(self) -> bool:
        """Whether the GEMM is bitnet.quantized_gemm (which can gather the sequence itself)."""
        return self.bitnet_options.fused or self.bitnet_options.int8_matmul

    def _gather_input(self, x, allreduce_dgrad: bool, sequence_parallel: bool, tp_group):
        """The input's communication in Megatron's linear function: all-gathered over the
        sequence (gradient reduce-scattered), or its gradient all-reduced."""
        group = tp_group if tp_group is not None else self.tp_group
        if sequence_parallel:
            return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
        if allreduce_dgrad:
            return copy_to_tensor_model_parallel_region(x, group=group)
        return x

    # ----------------------------------------------------------------------- frozen export
    def freeze_quantized(self, ternary: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                         full_precision: torch.Tensor | None = None):
        """Run from fixed ternary weights (an export) instead of quantising the trainable weight.

        `weight` then holds `ternary * scale` (exactly what training fed the GEMM) and is no
        longer trained; without arguments the current weight is quantised. With bitnet_segments,
        `scale` has one entry per segment and `full_precision` holds the full-precision segments
        (concatenated along the segmented dimension; None when every segment is quantised)."""
        layout = self._layout
        if ternary is None:
            ternary, scale = self.quantized_weight()
            full_precision = layout.full_precision_part(self.weight.detach())
        if tuple(ternary.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"freeze_quantized of {self._weight_label()}: ternary shape {tuple(ternary.shape)}, "
                f"expected {tuple(self.weight.shape)} (this rank's shard)"
            )
        device = self.weight.device
        ternary = ternary.to(device=device, dtype=torch.int8)
        scale = scale.to(device=device).reshape(-1)
        if scale.numel() != len(layout):
            raise ValueError(
                f"freeze_quantized of {self._weight_label()}: {scale.numel()} scales; "
                f"allowed: one per segment ({len(layout)}: {layout})"
            )
        weight = reference.dequantize_weights(ternary, scale, self.weight.dtype, layout)
        weight = self._insert_full_precision(weight, full_precision)
        self.register_buffer("frozen_ternary", ternary, persistent=False)
        self.register_buffer("frozen_scale", scale, persistent=False)
        with torch.no_grad():
            self.weight.data = weight
        self.weight.requires_grad_(False)
        self._frozen = True

    def _insert_full_precision(self, weight: torch.Tensor, full_precision: torch.Tensor | None):
        layout = self._layout
        fp_sizes = [s.size for s in layout.segments if not s.quantized]
        expected = list(weight.shape)
        expected[layout.dim] = sum(fp_sizes)
        if not fp_sizes and full_precision is None:
            return weight
        if full_precision is None or list(full_precision.shape) != expected:
            got = None if full_precision is None else tuple(full_precision.shape)
            raise ValueError(
                f"freeze_quantized of {self._weight_label()}: full_precision {got}; allowed: "
                f"{tuple(expected)} (the full-precision segments of {layout})"
                if fp_sizes else f"freeze_quantized of {self._weight_label()}: full_precision {got} "
                f"given, but every segment of {layout} is quantised; allowed: None"
            )
        fp_parts = iter(full_precision.to(weight).split(fp_sizes, dim=layout.dim))
        parts = [p if q else next(fp_parts) for p, q in zip(layout.split(weight, layout.dim), layout.quantized)]
        return torch.cat(parts, dim=layout.dim)

    def extra_repr(self) -> str:
        o = self.bitnet_options
        return (
            super().extra_repr()
            + f", bitnet(fused={o.fused}, int8_matmul={o.int8_matmul}, subln={o.subln}, "
            + f"kernel_backend={o.kernel_backend}"
            + (f", segments={self.bitnet_segments}" if self.bitnet_segments is not None else "")
            + (", frozen)" if self._frozen else ")")
        )


class BitNetColumnParallelLinear(_BitNetLinearMixin, ColumnParallelLinear):
    """ColumnParallelLinear with ternary weights and int8 per-token activations (fake-quantised,
    straight-through gradients). Extra keywords: `bitnet_options`; `bitnet_segments`, segments
    of this rank's output rows (`bitnet.segments.Segment` or (name, rows[, quantized]))."""

    def __init__(self, input_size, output_size, *, bitnet_options: BitNetLinearOptions | None = None,
                 bitnet_segments=None, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._bitnet_setup(bitnet_options, kwargs.get("name"), bitnet_segments, self.output_size_per_partition)

    # The model may fold constant per-row multipliers of the output (µP) into the weight when
    # the linear scales the weight it quantised, not the one it is handed (supports_weight_scaling).
    supports_output_row_scale = True

    def forward(self, input_, weight=None, runtime_gather_output=None, output_row_scale=None):
        """Megatron's forward. output_row_scale: constant multipliers of this rank's output rows
        ([rows] or [rows, 1]): the output is (input @ q(W)^T) * output_row_scale, computed as
        input @ (output_row_scale * q(W))^T with the scaled quantised weight cached like the
        quantised one, so no activation-sized multiply is left (the weight gradient carries the
        scale, as autograd of a scaled weight would)."""
        if output_row_scale is not None:
            if output_row_scale.numel() != self.output_size_per_partition or output_row_scale.requires_grad:
                raise ValueError(
                    f"{type(self).__name__}: output_row_scale of shape {tuple(output_row_scale.shape)} "
                    f"(requires_grad={output_row_scale.requires_grad}); allowed: a constant with one value per "
                    f"output row of this rank ({self.output_size_per_partition}), requires_grad=False"
                )
        self._output_row_scale = output_row_scale
        try:
            return super().forward(input_, weight, runtime_gather_output)
        finally:
            self._output_row_scale = None

    def _gemm(self, x, x_in, weight, x_quantized: QuantizedInput, w_quantized: QuantizedWeight, sequence_group):
        """One GEMM per run of like output segments, concatenated: quantised runs multiply the
        quantised input, full-precision runs the raw one (all-gathered once when x holds this
        rank's tokens of `sequence_group`)."""
        outputs = []
        row_scale = self._output_row_scale
        x_raw = None
        for start, end, quantized in self._layout.runs():
            w_part = _part(weight, 0, start, end)
            if quantized:
                outputs.append(self._matmul(x_in, w_part, x_quantized, w_quantized.rows(start, end), sequence_group))
                continue
            if x_raw is None:
                x_raw = x if sequence_group is None else gather_from_sequence_parallel_region(
                    x, tensor_parallel_output_grad=True, group=sequence_group)
            if row_scale is not None:
                w_part = w_part * _part(row_scale.reshape(-1), 0, start, end).to(w_part.dtype).unsqueeze(-1)
            outputs.append(F.linear(x_raw, w_part))
        return _cat(outputs, -1)


class BitNetRowParallelLinear(_BitNetLinearMixin, RowParallelLinear):
    """RowParallelLinear with ternary weights and int8 per-token activations; the per-token
    absmax (and SubLN's sum of squares) is reduced over the TP group. Extra keywords:
    `bitnet_options`; `bitnet_segments`, segments of this rank's input features (each gets its
    own per-token activation scale and weight-column scale)."""

    _input_sharded_along_features = True
    _segment_dim = 1

    def __init__(self, input_size, output_size, *, bitnet_options: BitNetLinearOptions | None = None,
                 bitnet_segments=None, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._bitnet_setup(bitnet_options, kwargs.get("name"), bitnet_segments, self.input_size_per_partition)

    def _gemm(self, x, x_in, weight, x_quantized: QuantizedInput, w_quantized: QuantizedWeight, sequence_group):
        """Float: one GEMM (full-precision segments pass through the quantised operands). int8:
        one GEMM per input segment, each with its own per-token scale along K (float for
        full-precision segments), summed. (Megatron hands a row linear no sequence-parallel
        input: sequence_group is None.)"""
        if not self.bitnet_options.int8_matmul:
            return self._matmul(x_in, weight, x_quantized, w_quantized)
        y = None
        for i, ((start, end), quantized) in enumerate(zip(self._layout.ranges(), self._layout.quantized)):
            x_part, w_part = _part(x_in, -1, start, end), _part(weight, 1, start, end)
            if quantized:
                part = self._matmul(x_part, w_part, x_quantized.segment(i),
                                    w_quantized.columns(start, end, scale=w_quantized.scale[i]))
            else:
                part = F.linear(x_part, w_part)
            y = part if y is None else y + part
        return y


BITNET_LINEAR_TYPES = (BitNetColumnParallelLinear, BitNetRowParallelLinear)


# ----------------------------------------------------------------------------- selection
def validate_bitnet_config(bitnet_cfg) -> list[str]:
    """The config's fields checked, before anything is built: its layers (returned) and what
    the backward keeps of their inputs."""
    layers = validate_bitnet_layers(bitnet_cfg)
    keeps_int8_input(bitnet_cfg)
    return layers


def validate_bitnet_layers(bitnet_cfg) -> list[str]:
    layers = bitnet_cfg.layers
    if layers is None or isinstance(layers, str):
        raise ConfigValueError(
            "bitnet.layers", layers, f"a list of layer types from {list(ALLOWED_LAYERS)}",
            message=f"bitnet.layers must be a list of layer types, got {layers!r}; "
                    f"allowed values: {list(ALLOWED_LAYERS)}")
    for value in layers:
        if value not in ALLOWED_LAYERS:
            raise ConfigValueError(
                "bitnet.layers", value, f"one of {list(ALLOWED_LAYERS)}",
                message=f"bitnet.layers: {value!r} is not a quantisable layer type; "
                        f"allowed values: {list(ALLOWED_LAYERS)}")
    return list(layers)


@functools.lru_cache(maxsize=None)
def bitnet_linear_class(parallel: str, options: BitNetLinearOptions) -> type:
    """The BitNet layer class for "column"/"row" with `options` as its default (Megatron builds
    linear submodules from a class, so the options travel with the class)."""
    base = _parallel_bases(parallel)[1]
    if options == BitNetLinearOptions():
        return base
    return type(base.__name__, (base,), {"default_bitnet_options": options, "__module__": __name__})


def _parallel_bases(parallel: str):
    if parallel == "column":
        return ColumnParallelLinear, BitNetColumnParallelLinear
    if parallel == "row":
        return RowParallelLinear, BitNetRowParallelLinear
    raise ValueError(f"select_linear: parallel={parallel!r}; allowed: 'column', 'row'")


def select_linear(bitnet_cfg, layer_type: str, parallel: str, kernel_backend: str = "auto") -> type:
    """The linear class for one projection: a BitNet layer (one segment) if `bitnet_cfg`
    quantises `layer_type`, else Megatron's plain ColumnParallelLinear / RowParallelLinear.

    bitnet_cfg: recipes.config.BitNetConfig or None. layer_type: one of LAYER_TYPES.
    parallel: "column" or "row". kernel_backend: the model's (auto | reference | triton)."""
    plain, _ = _parallel_bases(parallel)
    if layer_type not in LAYER_TYPES:
        raise ValueError(
            f"select_linear: layer_type={layer_type!r}; allowed: {list(LAYER_TYPES)}"
        )
    if bitnet_cfg is None:
        return plain
    enabled_types = set(validate_bitnet_layers(bitnet_cfg))
    if not bitnet_cfg.enabled or not (LAYER_TYPES[layer_type] & enabled_types):
        return plain
    return bitnet_linear_class(parallel, options_from_config(bitnet_cfg, kernel_backend))


def select_segmented_linear(bitnet_cfg, segments, parallel: str, kernel_backend: str = "auto"):
    """The constructor of a fused projection that stands for several projections.

    segments: (name, local size, layer type) in order: the rows of a column linear's output,
    or the features of a row linear's input; layer type is one of LAYER_TYPES. A segment is
    quantised when `bitnet_cfg` quantises its layer type. Returns Megatron's plain linear class
    when no segment is quantised, else the BitNet class bound to the segments
    (`functools.partial(..., bitnet_segments=...)`, called like the class)."""
    plain, _ = _parallel_bases(parallel)
    for entry in segments:
        if len(entry) != 3 or entry[2] not in LAYER_TYPES:
            raise ValueError(
                f"select_segmented_linear: segment {entry!r}; allowed: (name, size, layer type) "
                f"with layer type in {list(LAYER_TYPES)}"
            )
    if bitnet_cfg is None:
        return plain
    enabled_types = set(validate_bitnet_layers(bitnet_cfg))
    if not bitnet_cfg.enabled:
        return plain
    parsed = [Segment(name, size, bool(LAYER_TYPES[t] & enabled_types)) for name, size, t in segments]
    if not any(s.quantized for s in parsed):
        return plain
    if (parallel == "row" and getattr(bitnet_cfg, "saved_input", "auto") == "int8" and not bitnet_cfg.int8_matmul
            and not all(s.quantized for s in parsed)):
        full = [s.name for s in parsed if not s.quantized]
        raise ConfigValueError(
            "bitnet.saved_input", "int8", "'auto' or 'float', or every segment of the input quantised",
            message=f"bitnet.saved_input = 'int8', but the fused projection's input {[s.name for s in parsed]} "
                    f"keeps {full} in full precision (bitnet.layers = {list(bitnet_cfg.layers)}), and int8 would "
                    "lose those features, so its backward keeps the float input. Quantise every segment, or set "
                    "bitnet.saved_input to 'auto' or 'float'.")
    cls = bitnet_linear_class(parallel, options_from_config(bitnet_cfg, kernel_backend))
    return functools.partial(cls, bitnet_segments=parsed)


def bitnet_layers(model: torch.nn.Module):
    """(qualified name, module) of every BitNet linear in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BitNetLinearMixin)]


def label_bitnet_layers(model: torch.nn.Module) -> None:
    """Give each BitNet linear its qualified name, for error messages."""
    for name, module in bitnet_layers(model):
        module.bitnet_name = name
