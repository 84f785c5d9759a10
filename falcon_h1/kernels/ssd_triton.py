"""GPU path of the SSD scan: mamba_ssm's Triton kernels (installed by `setup.sh`).

mamba_ssm 2.3.2's package __init__ imports its Mamba-1 CUDA extension
(`selective_scan_cuda`) unconditionally; the Triton SSD kernels do not use it, so
when the extension was not built (setup.sh installs mamba_ssm without its CUDA
extensions: MAMBA_SKIP_CUDA_BUILD) we register an empty module under that name before
importing. Later mamba_ssm releases guard that import themselves.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch


def make_mamba_ssm_importable() -> None:
    """Register the empty stand-in for mamba_ssm's unbuilt Mamba-1 extension (see above)."""
    if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")


def _import_chunk_scan():
    make_mamba_ssm_importable()
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        _import_chunk_scan()
    except Exception:
        return False
    return True


def ssd_chunk_scan_triton(x, dt_raw, A, B, C, chunk_size, D, dt_bias, dt_limit, z=None, seq_idx=None,
                          initial_states=None):
    """x [b,l,h,p], dt_raw [b,l,h] (before bias/softplus), B/C [b,l,g,n] -> y [b,l,h,p].

    Inputs may be strided views (last dimension contiguous): mamba_ssm's kernels take
    strides, so slices of the in-projection output need no copy. With z, the kernel
    returns y * silu(z) and its backward gives dz, saving the separate gating passes.
    seq_idx [b,l] int32 restarts the state at each packed document, forward and backward.
    initial_states [b,h,p,n] is the state before the first token (its gradient flows back).
    """
    scan = _import_chunk_scan()
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return scan(
        x, dt_raw, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
        dt_limit=(lo, hi), seq_idx=seq_idx, initial_states=initial_states,
    )
