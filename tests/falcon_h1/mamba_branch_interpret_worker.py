"""Runs kernels.mamba_branch (mamba_ssm's Triton SSD forward/backward + this package's Triton
conv, one autograd function writing its gradients in place) on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set by test_mamba_branch.py before this process imports triton) and compares
it, in float64, with the pure-PyTorch reference path: causal conv + chunked SSD scan + gating.
Prints one line per check; exit 1 on failure.

mamba_ssm's launchers assume a GPU in three places, which are answered for the CPU here: they
enter `torch.cuda.device(index)`, read the SM count, and autotune over several configurations
(timing needs a GPU driver); each kernel keeps its first configuration."""

import contextlib
import importlib
import os
import pkgutil
import sys
import types

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
torch.cuda.device = lambda index: contextlib.nullcontext()
torch.cuda.get_device_properties = lambda *args: types.SimpleNamespace(multi_processor_count=132)

from triton.runtime.autotuner import Autotuner  # noqa: E402

from falcon_h1.kernels import causal_conv1d_silu, ssd_scan  # noqa: E402
from falcon_h1.kernels.mamba_branch import _ssd_functions, mamba_conv_scan  # noqa: E402

_ssd_functions()
import mamba_ssm.ops.triton as mamba_triton  # noqa: E402

for info in pkgutil.iter_modules(mamba_triton.__path__):
    for value in vars(importlib.import_module(f"mamba_ssm.ops.triton.{info.name}")).values():
        if isinstance(value, Autotuner):
            value.configs = value.configs[:1]

TOLERANCE = 1e-5  # the kernels compute in fp32 whatever the input dtype: fp32 rounding (seen: ~1e-6)
LIMIT = (0.0, float("inf"))


def run(fused, proj, w, bias, scale, A, D, dt_bias, dy, dims, keep_states):
    d, bc, h, groups, extra, chunk = dims
    leaf = proj.clone().requires_grad_()
    params = [t.clone().requires_grad_() if t is not None else None for t in (w, bias, A, D, dt_bias)]
    zxbcdt = leaf[..., extra:].transpose(0, 1)  # strided [b, s, .] view of an [s, b, .] projection
    if fused:
        y = mamba_conv_scan(zxbcdt, params[0], params[1], scale, *params[2:], d, bc, h, groups, chunk, LIMIT,
                            keep_forward_states=keep_states)
    else:
        z, xBC, dt = zxbcdt.split([d, d + 2 * bc, h], dim=-1)
        x, B, C = causal_conv1d_silu(xBC, params[0], params[1], False, out_scale=scale).split([d, bc, bc], dim=-1)
        y = ssd_scan(x.unflatten(-1, (h, -1)), dt, params[2], B.unflatten(-1, (groups, -1)),
                     C.unflatten(-1, (groups, -1)), chunk, params[3], params[4], LIMIT, False)
        y = y.flatten(-2) * F.silu(z)
    y.backward(dy)
    return [y, leaf.grad] + [p.grad for p in params if p is not None]


def check(batch, length, heads, head_dim, groups, state, chunk, with_scale, g, keep_states, with_bias=True):
    d, bc, extra = heads * head_dim, groups * state, 5
    width = 2 * d + 2 * bc + heads
    proj = torch.randn(length, batch, extra + width, generator=g, dtype=torch.float64)
    w = torch.randn(d + 2 * bc, 4, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(d + 2 * bc, generator=g, dtype=torch.float64) * 0.1 if with_bias else None
    scale = torch.rand(d + 2 * bc, generator=g, dtype=torch.float64) + 0.5 if with_scale else None
    A = -torch.rand(heads, generator=g, dtype=torch.float64) * 2 - 0.5
    D = torch.randn(heads, generator=g, dtype=torch.float64)
    dt_bias = torch.rand(heads, generator=g, dtype=torch.float64)
    dy = torch.randn(batch, length, d, generator=g, dtype=torch.float64)
    dims = (d, bc, heads, groups, extra, chunk)
    want = run(False, proj, w, bias, scale, A, D, dt_bias, dy, dims, keep_states)
    got = run(True, proj, w, bias, scale, A, D, dt_bias, dy, dims, keep_states)
    names = ["y", "d_in_projection", "d_conv_weight"] + ["d_conv_bias"] * with_bias + ["dA", "dD", "ddt_bias"]
    errors = {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(names, got, want)}
    errors["attention_columns_untouched"] = got[1][..., :extra].abs().max().item()
    label = (f"b={batch} l={length} h={heads} p={head_dim} g={groups} n={state} chunk={chunk} "
             f"scale={with_scale} bias={with_bias}")
    print(label, {k: f"{v:.1e}" for k, v in errors.items()})
    return max(errors.values()) <= TOLERANCE


ok = True
# the scan's backward from the forward's chunk states (kernels.ssd_backward), then mamba_ssm's own
for keep_states in (True, False):
    print(f"ssd_keep_forward_states={keep_states}")
    g = torch.Generator().manual_seed(0)
    ok &= all([
        check(2, 40, 4, 8, 2, 8, 16, True, g, keep_states),   # length not a multiple of the chunk, 2 groups
        check(1, 32, 2, 16, 1, 16, 16, False, g, keep_states),
        check(1, 24, 2, 8, 1, 8, 16, True, g, keep_states, with_bias=False),  # mamba_conv_bias = false
    ])
sys.exit(0 if ok else 1)
