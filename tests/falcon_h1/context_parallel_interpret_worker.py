"""The GPU path's Mamba-2 kernels under context parallelism, on CPU through Triton's interpreter:
every rank emulated in this process (ContextParallelLayout.emulated), the Triton conv reading
its halo and mamba_ssm's gated scan starting from the carried-in states, against the
pure-PyTorch reference path over the whole sequence in float64 (no context parallelism),
output and every gradient. Prints one line per check; exit 1 on failure."""

import sys

import torch
import torch.nn.functional as F

from tests.falcon_h1.interpreter_stand_ins import run_mamba_ssm_in_interpreter

run_mamba_ssm_in_interpreter()

from falcon_h1.context_parallel import ContextParallelLayout  # noqa: E402
from falcon_h1.context_parallel import mamba as cp_mamba  # noqa: E402
from falcon_h1.kernels import causal_conv1d_silu, ssd_scan  # noqa: E402

TOLERANCE = 1e-5  # the kernels compute in fp32 whatever the input dtype
LIMIT = (0.0, float("inf"))


def run(layout, proj, w, bias, scale, A, D, dt_bias, dy, dims):
    """layout None: the reference path over the whole sequence; else the Triton path on the
    layout's shards. proj [s, b, .] -> [y [b, s, d], d_proj, d_params...] in sequence order."""
    d, bc, h, groups, chunk = dims
    leaf = proj.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in (w, bias, A, D, dt_bias)]
    heads = lambda t, n: t.unflatten(-1, (n, -1))
    if layout is None:
        z, xBC, dt = leaf.transpose(0, 1).split([d, d + 2 * bc, h], dim=-1)
        x, B, C = causal_conv1d_silu(xBC, params[0], params[1], False, out_scale=scale).split([d, bc, bc], -1)
        y = ssd_scan(heads(x, h), dt, params[2], heads(B, groups), heads(C, groups), chunk, params[3], params[4],
                     LIMIT, False).flatten(-2) * F.silu(z)
    else:
        zx = cp_mamba.as_chunk_batch(layout.shard(leaf, dim=0), layout)
        z, xBC, dt = zx.split([d, d + 2 * bc, h], dim=-1)
        xBC = cp_mamba.causal_conv1d_silu(xBC, params[0], params[1], True, scale, layout)
        x, B, C = xBC.split([d, bc, bc], dim=-1)
        start = cp_mamba.carried_in_states(heads(x, h), dt, params[2], heads(B, groups), params[4], LIMIT, layout)
        y = ssd_scan(heads(x, h), dt, params[2], heads(B, groups), heads(C, groups), chunk, params[3], params[4],
                     LIMIT, True, z=heads(z, h), initial_states=start).flatten(-2)
        y = layout.in_sequence_order(cp_mamba.from_chunk_batch(y, layout), dim=0).transpose(0, 1)
    y.backward(dy)
    return [y, leaf.grad] + [p.grad for p in params]


def check(cp, batch, length, heads, head_dim, groups, state, chunk, g):
    d, bc = heads * head_dim, groups * state
    proj = torch.randn(length, batch, 2 * d + 2 * bc + heads, generator=g, dtype=torch.float64)
    w = torch.randn(d + 2 * bc, 4, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(d + 2 * bc, generator=g, dtype=torch.float64) * 0.1
    scale = torch.rand(d + 2 * bc, generator=g, dtype=torch.float64) + 0.5
    A = -torch.rand(heads, generator=g, dtype=torch.float64) * 2 - 0.5
    D = torch.randn(heads, generator=g, dtype=torch.float64)
    dt_bias = torch.rand(heads, generator=g, dtype=torch.float64)
    dy = torch.randn(batch, length, d, generator=g, dtype=torch.float64)
    args = (proj, w, bias, scale, A, D, dt_bias, dy, (d, bc, heads, groups, chunk))
    want, got = run(None, *args), run(ContextParallelLayout.emulated(cp), *args)
    names = ["y", "d_in_projection", "d_conv_weight", "d_conv_bias", "dA", "dD", "ddt_bias"]
    errors = {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(names, got, want)}
    print(f"cp={cp} b={batch} l={length} h={heads} p={head_dim} g={groups} n={state} chunk={chunk}",
          {k: f"{v:.1e}" for k, v in errors.items()})
    return max(errors.values()) <= TOLERANCE


g = torch.Generator().manual_seed(0)
ok = all([
    check(2, 2, 48, 4, 8, 2, 8, 8, g),  # shard chunks of 12: one and a half SSD chunks each
    check(3, 1, 24, 2, 8, 1, 8, 8, g),  # chunks of 4, shorter than an SSD chunk, just over the conv halo
])
sys.exit(0 if ok else 1)
