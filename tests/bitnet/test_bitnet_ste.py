"""Straight-through estimators and the int8 GEMM (CPU paths)."""

from __future__ import annotations

import pytest
import torch

from bitnet import kernels, reference


def _saved_tensor_count(fn):
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


QUANTISERS = [
    ("activations", kernels.fake_quantize_activations, (torch.float32, (3, 5, 16))),
    ("weights", kernels.fake_quantize_weights, (torch.float32, (12, 16))),
]


@pytest.mark.parametrize("ste", [kernels.ste_fused, kernels.ste_reference])
@pytest.mark.parametrize("name,fake_quant,spec", QUANTISERS)
def test_ste_gradient_is_identity(ste, name, fake_quant, spec):
    dtype, shape = spec
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape, dtype=dtype)
    y = ste(x, fake_quant)
    y.backward(grad)
    assert torch.equal(x.grad, grad)
    # The forward is the fake-quantised tensor (exactly for the fused path).
    if ste is kernels.ste_fused:
        assert torch.equal(y, fake_quant(x))
    else:
        torch.testing.assert_close(y, fake_quant(x), rtol=1e-6, atol=1e-7)


def test_fused_ste_saves_nothing():
    x = torch.randn(4, 16, requires_grad=True)
    assert _saved_tensor_count(lambda: kernels.ste_fused(x, kernels.fake_quantize_activations)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_equals_reference_ste(dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 6, 32, generator=g).to(dtype)
    w0 = (torch.randn(24, 32, generator=g) * 0.05).to(dtype)
    grad = torch.randn(2, 6, 24, generator=g).to(dtype)
    results = []
    for ste in (kernels.ste_fused, kernels.ste_reference):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y = torch.nn.functional.linear(
            ste(x, kernels.fake_quantize_activations), ste(w, kernels.fake_quantize_weights)
        )
        y.backward(grad)
        results.append((y, x.grad, w.grad))
    (y_f, gx_f, gw_f), (y_r, gx_r, gw_r) = results
    # x + (q - x) can differ from q by one rounding; everything downstream follows.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_f, y_r, **tol)
    torch.testing.assert_close(gx_f, gx_r, **tol)
    torch.testing.assert_close(gw_f, gw_r, **tol)
    # Independent check of the gradients: STE means d/dx = g @ W_fq, d/dW = g^T @ x_fq.
    x_fq = reference.fake_quantize_activations(x0).double()
    w_fq = reference.fake_quantize_weights(w0).double()
    torch.testing.assert_close(gx_f.double(), grad.double() @ w_fq, **tol)
    torch.testing.assert_close(
        gw_f.double(), grad.double().reshape(-1, 24).t() @ x_fq.reshape(-1, 32), **tol
    )


def test_int8_linear_cpu_is_exact():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 40, generator=g, dtype=torch.float64)
    w = torch.randn(12, 40, generator=g, dtype=torch.float64) * 0.1
    x_q, x_s = kernels.quantize_activations(x.float())
    w_q, w_s = kernels.quantize_weights(w.float())
    y = kernels.int8_linear(x_q, x_s, w_q, w_s)
    assert y.dtype == torch.float32
    # Independent: integer product in Python ints, rescaled in float64.
    acc = torch.tensor(
        [[sum(int(a) * int(b) for a, b in zip(row, col, strict=True)) for col in w_q.tolist()] for row in x_q.tolist()],
        dtype=torch.float64,
    )
    expected = acc * x_s.double().unsqueeze(-1) * w_s.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-7)
    fake = torch.nn.functional.linear(
        kernels.fake_quantize_activations(x.float()).double(), kernels.fake_quantize_weights(w.float()).double()
    )
    torch.testing.assert_close(y.double(), fake, rtol=1e-6, atol=1e-7)
    assert kernels.int8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_cpu_dispatches_to_reference():
    t = torch.randn(4, 4)
    assert kernels.backend(t) is reference


def test_kernel_backend_choice():
    t = torch.randn(4, 4)
    assert kernels.backend(t, "reference") is reference
    with pytest.raises(ValueError, match=r"kernel_backend='fast'; allowed: \['auto', 'reference', 'triton'\]"):
        kernels.quantize_weights(t, kernel_backend="fast")
    with pytest.raises(ValueError, match=r"kernel_backend='triton' got a torch.float32 tensor on cpu"):
        kernels.fake_quantize_activations(t, kernel_backend="triton")
    x_q, x_s = kernels.quantize_activations(t)
    w_q, w_s = kernels.quantize_weights(t)
    with pytest.raises(ValueError, match=r"kernel_backend='triton' got a torch.int8 tensor on cpu"):
        kernels.int8_linear(x_q, x_s, w_q, w_s, kernel_backend="triton")
