"""The project's own SSD scan kernels (kernels.ssd_fwd + kernels.ssd_bwd) on the GPU, in bf16, against
the float64 reference through autograd: every output and gradient must be as close to it as
mamba_ssm's kernels are (within 2x of mamba_ssm's own error, plus bf16 rounding), at the 0.5B and
34B head shapes (the 7B's head dim, state and chunk, two groups), a tiny shape (tiles padded to tl.dot's minimum), packed documents and a sequence
that is not a multiple of the chunk. (CPU: the interpreter tests in test_ssd_fwd.py and
test_ssd_bwd_*.py.)"""

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {  # batch, seqlen, heads, head dim, state, groups, chunk, packed
    "0.5b_heads_packed": (1, 1000, 24, 64, 128, 1, 128, True),
    "34b_heads_two_groups": (1, 600, 32, 128, 256, 2, 256, False),
    "tiny": (2, 77, 4, 16, 8, 2, 16, True),
}


def _inputs(dims, seed=0):
    b, l, h, p, n, g, q, packed = dims
    gen = torch.Generator(device="cuda").manual_seed(seed)
    width = 2 * h * p + 2 * g * n + h
    proj = torch.randn(l, b, width, device="cuda", generator=gen).to(torch.bfloat16).transpose(0, 1)
    z, x, B, C, dt_raw = proj.split([h * p, h * p, g * n, g * n, h], dim=-1)
    seq_idx = None
    if packed:
        cuts = torch.tensor([0, q // 2 + 3, q, 2 * q + 5], device="cuda")  # inside a chunk and on its edge
        seq_idx = (torch.arange(l, device="cuda")[:, None] >= cuts).sum(1).to(torch.int32)[None].expand(b, l)
        seq_idx = seq_idx.contiguous()
    return dict(x=x.unflatten(-1, (h, p)), z=z.unflatten(-1, (h, p)), B=B.unflatten(-1, (g, n)),
                C=C.unflatten(-1, (g, n)), dt_raw=dt_raw, A=-torch.rand(h, device="cuda", generator=gen) - 0.5,
                D=torch.randn(h, device="cuda", generator=gen), dt_bias=torch.randn(h, device="cuda", generator=gen) - 2,
                dout=torch.randn(b, l, h, p, device="cuda", generator=gen).to(torch.bfloat16), chunk=q,
                seq_idx=seq_idx, limit=(0.0, math.inf))


@pytest.mark.parametrize("case", sorted(CASES))
def test_own_ssd_kernels_as_close_to_float64_as_mamba_ssm(case):
    from falcon_h1.kernels.ssd_triton import triton_available

    if not triton_available():
        pytest.skip("mamba_ssm's Triton kernels (the comparison) are not installed")
    from benchmarks.ssd_bench import _scan_fwd, backward_from_states, errors, reference_grads

    t = _inputs(CASES[case])
    want = reference_grads(t)
    own_fwd, mamba_fwd = _scan_fwd(t, own=True), _scan_fwd(t)
    ours = errors({"out": own_fwd[0], **backward_from_states(t, own_fwd, own=True)}, want)
    mamba = errors({"out": mamba_fwd[0], **backward_from_states(t, mamba_fwd, own=False)}, want)
    bad = {k: (ours[k], mamba[k]) for k in ours if not ours[k] <= 2 * mamba[k] + 4e-3}
    assert not bad, f"{case}: relative errors (ours, mamba_ssm's) vs float64: {bad}"
