"""BitNet b1.58 versions of Megatron Core's tensor-parallel linear layers.

The layers keep Megatron's forward (returns `(output, bias)`, gather_output, input_is_parallel,
sequence parallel, async gradient all-reduce): they override only `_forward_impl`, the matmul
step, and hand it the fake-quantised input and weight.

Tensor parallelism does not change the model (unlike Megatron-LM PR 3002, which quantises each
shard with its own mean):
- the weight scale is the mean |W| of the FULL weight: each rank's float64 `[sum|W|, numel]`
  is all-reduced over the TP group before quantising;
- activation scales are per token over the full feature dimension: the column layer sees full
  tokens; the row layer's input is sharded along features, so the per-token absmax is
  all-reduced (MAX) over the TP group.
Gradients are straight-through (identity through both quantisers).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from bitnet import kernels, reference

# Values allowed in `bitnet.layers` of the recipe.
ALLOWED_LAYERS = ("attention_qkv", "attention_out", "mamba_in", "mamba_out", "mlp", "lm_head")
# layer_type for select_linear -> the `bitnet.layers` entries that switch it on. The Falcon-H1
# fused mixer projections are quantised when either of their parts is.
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


@dataclass(frozen=True)
class BitNetLinearOptions:
    """Per-layer switches, taken from `recipes.config.BitNetConfig`."""

    fused: bool = True  # custom autograd STE (Triton on GPU); False: x + (q(x) - x).detach()
    int8_matmul: bool = False  # int8 x ternary forward GEMM (int8 tensor cores on CUDA)
    subln: bool = False  # non-learnable RMSNorm of the input before quantising it


def options_from_config(bitnet_cfg) -> BitNetLinearOptions:
    return BitNetLinearOptions(
        fused=bool(getattr(bitnet_cfg, "fused", True)),
        int8_matmul=bool(getattr(bitnet_cfg, "int8_matmul", False)),
        subln=bool(getattr(bitnet_cfg, "subln", False)),
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
        if self._pending and self._event.query():
            self._pending = False
            _raise_if_nonfinite(self._host.item(), label)
        if not self._pending:
            if self._host is None:
                self._host = torch.empty((), dtype=torch.float64, pin_memory=True)
                self._event = torch.cuda.Event()
            self._host.copy_(abs_sum, non_blocking=True)
            self._event.record()
            self._pending = True

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


class _Int8LinearSTE(torch.autograd.Function):
    """y = (x_q @ w_q^T) * scales on the int8 tensor cores; gradients as for the fake-quantised
    float GEMM with straight-through quantisers. Saves the int8 tensors (half the bytes of bf16)."""

    @staticmethod
    def forward(ctx, x, weight, x_q, x_scale, w_q, w_scale):
        ctx.save_for_backward(x_q, x_scale, w_q, w_scale)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return kernels.int8_linear(x_q, x_scale, w_q, w_scale, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_q, x_scale, w_q, w_scale = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ reference.dequantize_weights(w_q, w_scale, grad.dtype)
        if ctx.needs_input_grad[1]:
            x_fq = reference.dequantize_activations(x_q, x_scale, grad.dtype)
            grad_w = (grad.t() @ x_fq).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None, None


class _BitNetLinearMixin:
    """The quantised matmul shared by the column and row layers."""

    default_bitnet_options = BitNetLinearOptions()
    _input_sharded_along_features = False

    def _bitnet_setup(self, options: BitNetLinearOptions | None, name: str | None) -> None:
        self.bitnet_options = options if options is not None else self.default_bitnet_options
        self.bitnet_name = name
        self._finite_watch = _NonFiniteWeightWatch()
        self._frozen = False
        self._tp_size = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1

    # ------------------------------------------------------------------- quantisation pieces
    def _weight_label(self) -> str:
        if self.bitnet_name:
            return f"{self.bitnet_name}.weight"
        return (
            f"{type(self).__name__}(in={self.input_size}, out={self.output_size}).weight "
            "(call bitnet.label_bitnet_layers(model) for its full name)"
        )

    def weight_stats(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """float64 `[sum|W|, numel]` of the full (unsharded) weight; checks it is finite."""
        weight = self.weight if weight is None else weight
        with torch.no_grad():
            stats = kernels.weight_stats(weight)
            if self._tp_size > 1:
                dist.all_reduce(stats, group=self.tp_group)
        self._finite_watch.check(stats[0], self._weight_label)
        return stats

    def quantized_weight(self):
        """(ternary int8 of this rank's shard, 0-d scale of the full weight)."""
        if self._frozen:
            return self.frozen_ternary, self.frozen_scale
        with torch.no_grad():
            stats = self.weight_stats()
            self._finite_watch.flush(self._weight_label)
            return kernels.quantize_weights(self.weight, stats)

    def _ste(self, x, fake_quant, *args):
        if not x.requires_grad:
            with torch.no_grad():
                return fake_quant(x, *args)
        ste = kernels.ste_fused if self.bitnet_options.fused else kernels.ste_reference
        return ste(x, fake_quant, *args)

    def _input_absmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token absmax over the full feature dimension when this rank holds a slice of it;
        None when the kernel may take it from the local row."""
        if not (self._input_sharded_along_features and self._tp_size > 1):
            return None
        with torch.no_grad():
            absmax = kernels.activation_absmax(x)
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=self.tp_group)
        return absmax

    def _subln(self, x: torch.Tensor) -> torch.Tensor:
        """Non-learnable RMSNorm over the full feature dimension (all ranks' slices)."""
        xf = x.float()
        sum_sq = (xf * xf).sum(dim=-1, keepdim=True)
        if self._input_sharded_along_features and self._tp_size > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, self.tp_group)
        return (xf * torch.rsqrt(sum_sq / self.input_size + self.config.layernorm_epsilon)).to(x.dtype)

    # ------------------------------------------------------------------------------ forward
    def _forward_impl(self, input, weight, **kwargs):
        # Megatron's fused wgrad accumulation writes into `weight.main_grad` of the tensor it is
        # given; the fake-quantised weight is a temporary without one, so the gradient takes the
        # ordinary path (param.grad), which Megatron's DDP hooks add to main_grad.
        kwargs["gradient_accumulation_fusion"] = False
        x = self._subln(input) if self.bitnet_options.subln else input
        if self.bitnet_options.int8_matmul:
            return self._int8_forward(x, weight, **kwargs)
        x_fq = self._ste(x, kernels.fake_quantize_activations, self._input_absmax(x))
        if self._frozen:
            w_fq = self.weight  # holds ternary * scale already
        else:
            w_fq = self._ste(weight, kernels.fake_quantize_weights, self.weight_stats(weight))
        return super()._forward_impl(input=x_fq, weight=w_fq, **kwargs)

    def _int8_forward(self, x, weight, *, bias=None, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, **_):
        group = tp_group if tp_group is not None else self.tp_group
        # The communication Megatron's linear function would do around the GEMM.
        if sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
        elif allreduce_dgrad:
            x = copy_to_tensor_model_parallel_region(x, group=group)
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            x_q, x_scale = kernels.quantize_activations(x2, self._input_absmax(x2))
            if self._frozen:
                w_q, w_scale = self.frozen_ternary, self.frozen_scale
            else:
                w_q, w_scale = kernels.quantize_weights(weight, self.weight_stats(weight))
        y = _Int8LinearSTE.apply(x2, weight, x_q, x_scale, w_q, w_scale)
        y = y.reshape(*x.shape[:-1], w_q.shape[0])
        return y + bias if bias is not None else y

    # ----------------------------------------------------------------------- frozen export
    def freeze_quantized(self, ternary: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        """Run from fixed ternary weights (an export) instead of quantising the trainable weight.

        `weight` then holds `ternary * scale` (exactly what training fed the GEMM) and is no
        longer trained; without arguments the current weight is quantised."""
        if ternary is None:
            ternary, scale = self.quantized_weight()
        if tuple(ternary.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"freeze_quantized of {self._weight_label()}: ternary shape {tuple(ternary.shape)}, "
                f"expected {tuple(self.weight.shape)} (this rank's shard)"
            )
        device = self.weight.device
        ternary = ternary.to(device=device, dtype=torch.int8)
        scale = scale.to(device=device).reshape(())
        self.register_buffer("frozen_ternary", ternary, persistent=False)
        self.register_buffer("frozen_scale", scale, persistent=False)
        with torch.no_grad():
            self.weight.data = reference.dequantize_weights(ternary, scale, self.weight.dtype)
        self.weight.requires_grad_(False)
        self._frozen = True

    def extra_repr(self) -> str:
        o = self.bitnet_options
        return (
            super().extra_repr()
            + f", bitnet(fused={o.fused}, int8_matmul={o.int8_matmul}, subln={o.subln}"
            + (", frozen)" if self._frozen else ")")
        )


class BitNetColumnParallelLinear(_BitNetLinearMixin, ColumnParallelLinear):
    """ColumnParallelLinear with ternary weights and int8 per-token activations (fake-quantised,
    straight-through gradients). Extra keyword: `bitnet_options`."""

    def __init__(self, input_size, output_size, *, bitnet_options: BitNetLinearOptions | None = None,
                 **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._bitnet_setup(bitnet_options, kwargs.get("name"))


class BitNetRowParallelLinear(_BitNetLinearMixin, RowParallelLinear):
    """RowParallelLinear with ternary weights and int8 per-token activations; the per-token
    absmax (and SubLN's sum of squares) is reduced over the TP group. Extra keyword:
    `bitnet_options`."""

    _input_sharded_along_features = True

    def __init__(self, input_size, output_size, *, bitnet_options: BitNetLinearOptions | None = None,
                 **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._bitnet_setup(bitnet_options, kwargs.get("name"))


BITNET_LINEAR_TYPES = (BitNetColumnParallelLinear, BitNetRowParallelLinear)


# ----------------------------------------------------------------------------- selection
def validate_bitnet_layers(bitnet_cfg) -> list[str]:
    layers = getattr(bitnet_cfg, "layers", None)
    if layers is None or isinstance(layers, str):
        raise ValueError(
            f"bitnet.layers must be a list of layer types, got {layers!r}; "
            f"allowed values: {list(ALLOWED_LAYERS)}"
        )
    for value in layers:
        if value not in ALLOWED_LAYERS:
            raise ValueError(
                f"bitnet.layers: {value!r} is not a quantisable layer type; "
                f"allowed values: {list(ALLOWED_LAYERS)}"
            )
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


def select_linear(bitnet_cfg, layer_type: str, parallel: str) -> type:
    """The linear class for one projection: a BitNet layer if `bitnet_cfg` quantises
    `layer_type`, else Megatron's plain ColumnParallelLinear / RowParallelLinear.

    bitnet_cfg: recipes.config.BitNetConfig or None. layer_type: one of LAYER_TYPES.
    parallel: "column" or "row"."""
    plain, _ = _parallel_bases(parallel)
    if layer_type not in LAYER_TYPES:
        raise ValueError(
            f"select_linear: layer_type={layer_type!r}; allowed: {list(LAYER_TYPES)}"
        )
    if bitnet_cfg is None:
        return plain
    enabled_types = set(validate_bitnet_layers(bitnet_cfg))
    if not getattr(bitnet_cfg, "enabled", False) or not (LAYER_TYPES[layer_type] & enabled_types):
        return plain
    return bitnet_linear_class(parallel, options_from_config(bitnet_cfg))


def bitnet_layers(model: torch.nn.Module):
    """(qualified name, module) of every BitNet linear in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BitNetLinearMixin)]


def label_bitnet_layers(model: torch.nn.Module) -> None:
    """Give each BitNet linear its qualified name, for error messages."""
    for name, module in bitnet_layers(model):
        module.bitnet_name = name
