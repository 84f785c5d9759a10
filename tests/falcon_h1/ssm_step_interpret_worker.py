"""Runs the decode step's GPU SSM update (mamba_ssm's Triton selective_state_update, through
falcon_h1.generation.steps.ssm_step_triton) on CPU in Triton's interpreter (TRITON_INTERPRET=1,
set by the calling test) and compares state and output with a float64 recurrence. Exit 1 on
failure. The launcher enters torch.cuda.device(index), answered here with a null context."""

import contextlib
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
torch.cuda.device = lambda index: contextlib.nullcontext()

from falcon_h1.generation.steps import ssm_step_triton  # noqa: E402


def float64_step(state, x, dt, A, B, C, D):
    h, g = x.shape[1], B.shape[1]
    B, C = (t.double().repeat_interleave(h // g, dim=1) for t in (B, C))
    state = torch.exp(dt.double() * A.double())[..., None, None] * state.double() \
        + (dt.double()[..., None] * x.double())[..., None] * B[:, :, None, :]
    return state, torch.einsum("bhpn,bhn->bhp", state, C) + D.double()[:, None] * x.double()


def main() -> int:
    g = torch.Generator().manual_seed(0)
    failures = 0
    for b, h, p, groups, n in [(2, 4, 8, 2, 16), (3, 6, 4, 1, 8)]:
        state = torch.randn(b, h, p, n, generator=g)
        x, dt = torch.randn(b, h, p, generator=g), torch.rand(b, h, generator=g)
        A, D = -torch.rand(h, generator=g) * 3, torch.randn(h, generator=g)
        B, C = torch.randn(b, groups, n, generator=g), torch.randn(b, groups, n, generator=g)
        expected_state, expected_y = float64_step(state, x, dt, A, B, C, D)
        y = ssm_step_triton(state, x, dt, A, B, C, D)  # updates state in place
        err = max((y.double() - expected_y).abs().max().item(), (state.double() - expected_state).abs().max().item())
        ok = err <= 1e-5
        failures += not ok
        print(f"ssm_step_triton b={b} h={h} p={p} g={groups} n={n}: max error {err:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
