"""Runs kernels.mamba_branch (mamba_ssm's Triton SSD forward/backward + this package's Triton
conv, one autograd function writing its gradients in place) on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set by test_mamba_branch.py before this process imports triton) and compares
it, in float64, with the pure-PyTorch reference path: causal conv + chunked SSD scan + gating.
Packed rows (seq_idx) go through the fused branch and through the unfused GPU path (Triton
conv, then mamba_ssm's gated scan) and must equal every document run alone on the reference
path; the same rows run as one sequence must not. Prints one line per check; exit 1 on failure.
(mamba_ssm's launchers get CPU answers to their GPU queries: tests/falcon_h1/interpreter_stand_ins.py.)"""

import sys

import torch
import torch.nn.functional as F

from tests.falcon_h1.interpreter_stand_ins import run_mamba_ssm_in_interpreter

run_mamba_ssm_in_interpreter()

from falcon_h1.kernels import causal_conv1d_silu, ssd_scan  # noqa: E402
from falcon_h1.kernels.documents import documents_from_position_ids  # noqa: E402
from falcon_h1.kernels import mamba_branch  # noqa: E402
from falcon_h1.kernels.mamba_branch import mamba_conv_scan, split_in_projection  # noqa: E402
from tests.falcon_h1.packed_rows import documents, position_ids  # noqa: E402

TOLERANCE = 1e-5  # the kernels compute in fp32 whatever the input dtype: fp32 rounding (seen: ~1e-6)
LEAK_MARGIN = 1e-2  # how far the packed rows run as one sequence must be from the documents alone
LIMIT = (0.0, float("inf"))


def run(path, proj, w, bias, scale, A, D, dt_bias, dy, dims, seq_idx=None, keep_states=True, own=False,
        d_first=None, keep_conv=False, streaming=False):
    """path: "fused" (kernels.mamba_branch; keep_states: its scan backward from the forward's
    chunk states; own: the scan forward and backward on this project's kernels, kernels.ssd_fwd /
    kernels.ssd_bwd, instead of mamba_ssm's), "fused_shared" (the same, its input the Mamba columns
    of split_in_projection, writing its gradient into the projection's whole gradient), "split"
    (Triton conv, then the gated Triton scan) or "reference" (pure PyTorch). d_first: a gradient
    for the projection's columns before the Mamba ones (the attention branch's). streaming: the
    conv's row-walking kernels (KernelOptions.streaming_conv). -> [y,
    d_projection, d_params...]"""
    d, bc, h, groups, extra, chunk = dims
    leaf = proj.clone().requires_grad_()
    params = [t.clone().requires_grad_() if t is not None else None for t in (w, bias, A, D, dt_bias)]
    gradient = None
    if path == "fused_shared":
        first, mamba_columns, gradient = split_in_projection(leaf, extra)
    else:
        first, mamba_columns = leaf[..., :extra], leaf[..., extra:]
    zxbcdt = mamba_columns.transpose(0, 1)  # strided [b, s, .] view of an [s, b, .] projection
    if path in ("fused", "fused_shared"):
        y = mamba_conv_scan(zxbcdt, params[0], params[1], scale, *params[2:], d, bc, h, groups, chunk, LIMIT,
                            seq_idx=seq_idx, keep_forward_states=keep_states, own_forward=own, own_backward=own,
                            in_projection_gradient=gradient, keep_conv_output=keep_conv, streaming_conv=streaming)
    else:
        fast = path == "split"
        z, xBC, dt = zxbcdt.split([d, d + 2 * bc, h], dim=-1)
        x, B, C = causal_conv1d_silu(xBC, params[0], params[1], fast, out_scale=scale, seq_idx=seq_idx,
                                     streaming=streaming).split([d, bc, bc], dim=-1)
        y = ssd_scan(x.unflatten(-1, (h, -1)), dt, params[2], B.unflatten(-1, (groups, -1)),
                     C.unflatten(-1, (groups, -1)), chunk, params[3], params[4], LIMIT, fast,
                     z=z.unflatten(-1, (h, -1)) if fast else None, seq_idx=seq_idx)
        y = y.flatten(-2) if fast else y.flatten(-2) * F.silu(z)
    if d_first is None:
        y.backward(dy)
    else:
        torch.autograd.backward([y, first], [dy, d_first])
    return [y, leaf.grad] + [p.grad for p in params if p is not None]


def documents_alone(proj, w, bias, scale, A, D, dt_bias, dy, dims, rows):
    """Every document of the packed rows run alone on the reference path, assembled like `run`'s
    result for the packed rows (outputs and input gradients in place, parameter gradients summed)."""
    y, d_proj, d_params = torch.zeros_like(dy), torch.zeros_like(proj), None
    for row, start, end in documents(rows):
        alone = run("reference", proj[start:end, row:row + 1], w, bias, scale, A, D, dt_bias,
                    dy[row:row + 1, start:end], dims)
        y[row, start:end] = alone[0][0].detach()
        d_proj[start:end, row] = alone[1][:, 0]
        d_params = alone[2:] if d_params is None else [a + b for a, b in zip(d_params, alone[2:])]
    return [y, d_proj, *d_params]


def inputs(batch, length, heads, head_dim, groups, state, chunk, with_scale, g, with_bias):
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
    return proj, w, bias, scale, A, D, dt_bias, dy, dims


def errors_of(got, want, with_bias):
    names = ["y", "d_in_projection", "d_conv_weight"] + ["d_conv_bias"] * with_bias + ["dA", "dD", "ddt_bias"]
    return {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(names, got, want)}


def check(batch, length, heads, head_dim, groups, state, chunk, with_scale, g, keep_states, with_bias=True,
          own=False):
    args = inputs(batch, length, heads, head_dim, groups, state, chunk, with_scale, g, with_bias)
    want = run("reference", *args)
    got = run("fused", *args, keep_states=keep_states, own=own)
    errors = errors_of(got, want, with_bias)
    errors["attention_columns_untouched"] = got[1][..., :args[-1][4]].abs().max().item()
    label = (f"b={batch} l={length} h={heads} p={head_dim} g={groups} n={state} chunk={chunk} "
             f"scale={with_scale} bias={with_bias} own_kernels={own}")
    print(label, {k: f"{v:.1e}" for k, v in errors.items()})
    return max(errors.values()) <= TOLERANCE


def check_packed(path, rows, heads, head_dim, groups, state, chunk, g, keep_states=True, own=False,
                 streaming=False):
    """Packed rows with seq_idx == each document alone; the rows as one sequence (SSM state
    and conv window leaking across documents; on the reference path, which computes the same
    function faster) must be far from it in every output, so the comparison sees a leak."""
    args = inputs(len(rows), sum(rows[0]), heads, head_dim, groups, state, chunk, True, g, True)
    seq_idx = documents_from_position_ids(position_ids(rows)).seq_idx
    want = documents_alone(*args, rows)
    errors = errors_of(run(path, *args, seq_idx=seq_idx, keep_states=keep_states, own=own, streaming=streaming),
                       want, True)
    leaks = errors_of(run("reference", *args), want, True)
    print(f"packed {path} own_kernels={own} streaming_conv={streaming} rows={rows} h={heads} p={head_dim} g={groups} n={state} chunk={chunk}",
          {k: f"{v:.1e}" for k, v in errors.items()},
          f"as one sequence (must exceed {LEAK_MARGIN:.0e}):", {k: f"{v:.1e}" for k, v in leaks.items()})
    return max(errors.values()) <= TOLERANCE and min(leaks.values()) >= LEAK_MARGIN


def check_shared(g, own=False):
    """The fused branch on split_in_projection's Mamba columns, writing its gradient into the
    projection's whole gradient: equal to the reference, the attention columns' gradient exactly
    the one given (and zero when none is)."""
    args = inputs(2, 40, 4, 8, 2, 8, 16, True, g, True)
    extra = args[-1][4]
    d_first = torch.randn(*args[0].shape[:-1], extra, generator=g, dtype=torch.float64)
    want = run("reference", *args)
    got = run("fused_shared", *args, own=own, d_first=d_first)
    errors = errors_of(got, want, True)
    errors["d_in_projection"] = ((got[1][..., extra:] - want[1][..., extra:]).norm() / want[1].norm()).item()
    errors["attention_columns"] = (got[1][..., :extra] - d_first).abs().max().item()
    errors["attention_columns_unused"] = run("fused_shared", *args, own=own)[1][..., :extra].abs().max().item()
    print(f"shared in-projection gradient own_kernels={own}", {k: f"{v:.1e}" for k, v in errors.items()})
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
        # documents of uneven lengths (none a multiple of the chunk; several crossing chunk
        # boundaries, one shorter than the conv window), different splits per row
        check_packed("fused", [[11, 14, 15], [3, 24, 13]], 4, 8, 2, 8, 16, g, keep_states),
    ])
ok &= check_packed("split", [[11, 14, 15], [3, 24, 13]], 4, 8, 2, 8, 16, g)
# the conv's row-walking kernels in the fused branch (on their own: triton_interpret_worker.py)
print("streaming conv kernels")
ok &= check_packed("fused", [[11, 14, 15], [3, 24, 13]], 4, 8, 2, 8, 16, g, streaming=True)
# the scan on this project's own forward and backward kernels (their own tests: test_ssd_fwd.py, test_ssd_bwd_*.py)
print("own SSD kernels")
ok &= check_packed("fused", [[11, 14, 15], [3, 24, 13]], 4, 8, 2, 8, 16, g, own=True)
ok &= check_shared(g) and check_shared(g, own=True)


def check_kept_conv_output(g):
    """The backward reading the forward's conv output instead of recomputing it: the same
    gradients bit for bit (the recompute is the same kernel on the same input), packed rows too."""
    rows = [[11, 14, 15], [3, 24, 13]]
    args = inputs(len(rows), sum(rows[0]), 4, 8, 2, 8, 16, True, g, True)
    seq_idx = documents_from_position_ids(position_ids(rows)).seq_idx
    forward = mamba_branch.conv_silu_forward
    calls = []
    mamba_branch.conv_silu_forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    recomputed = run("fused", *args, seq_idx=seq_idx)
    recomputing_calls = len(calls)
    kept = run("fused", *args, seq_idx=seq_idx, keep_conv=True)
    mamba_branch.conv_silu_forward = forward
    differ = [i for i, (a, b) in enumerate(zip(recomputed, kept)) if not torch.equal(a, b)]
    print("conv output kept for the backward: outputs differing from the recomputing backward's", differ,
          f"conv forwards {recomputing_calls} recomputing, {len(calls) - recomputing_calls} kept")
    return not differ and (recomputing_calls, len(calls) - recomputing_calls) == (2, 1)


ok &= check_kept_conv_output(g)
sys.exit(0 if ok else 1)
