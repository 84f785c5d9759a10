"""Which linear layer classes a Falcon-H1 model's projections are built from.

The choice is made once, when the model is built (`build_model(..., linears=...)`): each layer
asks the spec for the class of each of its projections and never which kind of linear it got,
as Megatron-LM's layer specs swap linears without the layer knowing. The default is Megatron
Core's tensor-parallel linears; `bitnet.spec` makes the BitNet one.

Projections are named as `bitnet.layers` names them: attention_qkv, attention_out, mamba_in,
mamba_out, mlp, lm_head. A fused projection stands for several: its segments are
(name, local size, projection) in order along the output rows (column) or input features (row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

Segment = tuple[str, int, str]
LinearFactory = Callable[..., torch.nn.Module]  # called like Megatron's linear classes


def megatron_linear(projection: str, parallel: str) -> LinearFactory:
    """Megatron Core's ColumnParallelLinear ("column") or RowParallelLinear ("row")."""
    if parallel == "column":
        return ColumnParallelLinear
    if parallel == "row":
        return RowParallelLinear
    raise ValueError(f"linear for {projection!r}: parallel = {parallel!r}; allowed: 'column', 'row'.")


def megatron_fused_linear(segments: Sequence[Segment], parallel: str) -> LinearFactory:
    """One Megatron linear over all segments (a plain GEMM does not see where they meet)."""
    return megatron_linear("+".join(name for name, _, _ in segments), parallel)


def _nothing_to_finish(model: torch.nn.Module) -> None:
    return None


@dataclass(frozen=True)
class LinearSpec:
    """The linear classes of one model.

    linear(projection, parallel): the class (or constructor) of one projection.
    fused_linear(segments, parallel): the constructor of a fused projection (see module docstring).
    finish(model): run once on the built model (BitNet names its layers for error messages).
    """

    linear: Callable[[str, str], LinearFactory] = megatron_linear
    fused_linear: Callable[[Sequence[Segment], str], LinearFactory] = megatron_fused_linear
    finish: Callable[[torch.nn.Module], None] = _nothing_to_finish


MEGATRON_LINEARS = LinearSpec()


def supports_weight_scaling(linear: torch.nn.Module) -> bool:
    """Whether `linear(u, weight=W * s)` computes (u @ W^T) * s, so constant per-row scales may ride
    on the weight (µP folding). A linear that transforms the weight it is handed says no with a
    class attribute `supports_weight_scaling = False` (BitNet quantises it: a scaled weight would
    quantise differently); Megatron's linears carry no such attribute and multiply the weight as
    given, except under gradient-accumulation fusion, whose backward accumulates into the
    `main_grad` of the tensor it was handed, which a scaled copy of the parameter does not have."""
    return getattr(linear, "supports_weight_scaling", True) and not linear.gradient_accumulation_fusion


def supports_output_row_scale(linear: torch.nn.Module) -> bool:
    """Whether `linear(u, output_row_scale=s)` computes (u @ W^T) * s itself, for constant per-row
    scales s (a class attribute `supports_output_row_scale = True`: BitNet's column linear scales
    the weight it quantised, so the quantisation stays that of the unscaled weight)."""
    return bool(getattr(linear, "supports_output_row_scale", False))


def supports_row_scaling(linear: torch.nn.Module) -> bool:
    """Whether `project_row_scaled` can fold constant per-row output scales into this linear."""
    return supports_output_row_scale(linear) or supports_weight_scaling(linear)


def project_row_scaled(linear: torch.nn.Module, u: torch.Tensor, row_scale: torch.Tensor,
                       triton_row_scale: bool = False) -> torch.Tensor:
    """(u @ W^T) * s without an activation-sized multiply, forward or backward: the linear's own
    `output_row_scale` where it has one, else u @ (W * s)^T (autograd carries the scale into W's
    gradient; triton_row_scale: W * s and that gradient in kernels.row_scale's Triton pass).
    row_scale: constant [rows, 1]; the linear must pass `supports_row_scaling`."""
    if supports_output_row_scale(linear):
        return linear(u, output_row_scale=row_scale)[0]
    if triton_row_scale:
        from falcon_h1.kernels.row_scale import row_scaled_weight

        return linear(u, weight=row_scaled_weight(linear.weight, row_scale))[0]
    return linear(u, weight=linear.weight * row_scale)[0]
