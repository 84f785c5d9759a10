"""Reference kernels against independent float64 / loop computations."""

import pytest
import torch

from falcon_h1.kernels import causal_attention
from falcon_h1.kernels.conv_reference import causal_conv1d_silu_reference
from falcon_h1.kernels.ssd_reference import ssd_chunk_scan_reference, ssd_sequential_float64


@pytest.mark.parametrize("length,chunk", [(32, 8), (37, 8), (5, 16)])
def test_chunked_ssd_equals_sequential_recurrence(length, chunk):
    g = torch.Generator().manual_seed(length)
    b, h, p, groups, n = 2, 4, 3, 2, 5
    x = torch.randn(b, length, h, p, generator=g)
    dt = torch.rand(b, length, h, generator=g) * 0.5
    A = -torch.rand(h, generator=g) * 2
    B, C = torch.randn(b, length, groups, n, generator=g), torch.randn(b, length, groups, n, generator=g)
    D = torch.randn(h, generator=g)
    got = ssd_chunk_scan_reference(x, dt, A, B, C, chunk, D).double()
    want = ssd_sequential_float64(x, dt, A, B, C, D)
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_causal_conv_equals_explicit_sum():
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(2, 9, 6, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    want = torch.zeros(2, 9, 6, dtype=torch.float64)
    for t in range(9):
        for j in range(4):  # output t sees inputs t-3..t, weight tap j multiplies x[t-3+j]
            src = t - 3 + j
            if src >= 0:
                want[:, t] += x[:, src].double() * w[:, j].double()
    want = torch.nn.functional.silu(want + bias.double())
    assert torch.allclose(causal_conv1d_silu_reference(x, w, bias).double(), want, atol=1e-6)


def test_attention_backends_agree_with_gqa():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    kk, vv = k.repeat_interleave(2, 1).double(), v.repeat_interleave(2, 1).double()
    scores = q.double() @ kk.transpose(-1, -2) * 0.3
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(scores, -1) @ vv
    for backend in ("sdpa", "unfused"):
        assert torch.allclose(causal_attention(q, k, v, 0.3, backend).double(), want, atol=1e-5)
