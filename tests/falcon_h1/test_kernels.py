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


def test_triton_kernels_match_float64_in_interpreter():
    """The Triton conv+SiLU and SwiGLU kernels (forward and backward) run on CPU under
    Triton's interpreter in a subprocess (the variable must be set before triton loads)."""
    from pathlib import Path

    from tests.conftest import run_in_triton_interpreter

    run_in_triton_interpreter(Path(__file__).with_name("triton_interpret_worker.py"))


def test_folded_multipliers_gradients_match_transformers(megatron_single, tmp_path):
    """With the µP multipliers folded into weight rows / the conv output / the scan's
    gating (the path taken without the gated RMSNorm), every parameter's gradient still
    equals transformers' FalconH1 (fp32, all multipliers != 1)."""
    import falcon_h1
    from falcon_h1.weights import gather_hf_state
    from tests.falcon_h1.hf_reference import make_hf_model

    hf = make_hf_model(seed=5, mamba_rms_norm=False)
    hf.save_pretrained(tmp_path)
    for fused in (True, False):
        ours = falcon_h1.from_hf(tmp_path, fused_projections=fused)
        assert all(layer.mixer._scales_in_weights() for layer in ours.layers)
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, 97, (2, 21), generator=g)
        probe = torch.randn(2, 21, 97, generator=g)
        hf.zero_grad(set_to_none=True)
        (hf(ids).logits * probe).sum().backward()
        (ours(ids) * probe).sum().backward()
        pieces = {}
        for name, grad in gather_hf_state(ours, grads=True):
            pieces.setdefault(name.split(":")[0], []).append(grad)
        for name, param in hf.named_parameters():
            got = torch.cat(pieces[name]).reshape(param.shape).double()
            want = param.grad.double()
            assert ((got - want).norm() / want.norm()).item() <= 1e-5, (fused, name)
