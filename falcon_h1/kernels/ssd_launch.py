"""Host-side pieces every launcher of the project's own SSD kernels (kernels.ssd_fwd, kernels.ssd_bwd_*)
shares: tile sizes, the layout policy, the optional packed-document argument, the step-size limits.

Layout policy: the kernels take any strides but a last one of 1. An input without it is copied (a
copy that shows in a profile, as mamba_ssm's wrappers do); an output the kernels write in place
is refused, since a copy would not be what the caller reads."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# torch's F.softplus default threshold: above it softplus is the identity (forward and backward)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


def tile_edge(size: int, cap: int | None = None, floor: int = 16) -> int:
    """The tile edge for a dimension of `size`: a power of two, at least `floor` (tl.dot's minimum
    on the GPU), at most `cap` (None: no cap), no larger than the dimension needs."""
    edge = triton.next_power_of_2(size)
    return max(floor, edge if cap is None else min(cap, edge))


def last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """An input as the kernels read it: itself, or a copy where its last stride is not 1."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def check_written_in_place(where: str, **outputs: torch.Tensor | None) -> None:
    """Refuses an output buffer (written in place) whose last stride is not 1."""
    for name, t in outputs.items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{where}: {name} is written in place and needs a last-dimension stride of 1 "
                             f"(got strides {tuple(t.stride())}); pass a buffer with a contiguous last dimension")


def seq_idx_args(seq_idx, fallback: torch.Tensor) -> tuple:
    """(pointer, batch stride, position stride) of seq_idx [b, l], or of `fallback` (never read:
    the kernels' HAS_SEQ flag is off) when there is none."""
    if seq_idx is None:
        return fallback, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def step_limits(dt_limit) -> tuple[float, float]:
    """(lo, hi) of the step-size clamp as floats; None: no clamp (softplus >= 0, so lo = 0 never cuts)."""
    if dt_limit is None:
        return 0.0, math.inf
    return float(dt_limit[0]), float(dt_limit[1])
