"""The BitNet GEMM function (bitnet.quantized_gemm) on CPU: straight-through gradients against
float64 formulas; keeping the int8 input for the backward changes no bit of the gradients and
halves the bytes kept; a BitNet layer keeps no float copy of its input or weight."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bitnet_testutil import tiny_config  # noqa: E402

from bitnet import reference  # noqa: E402
from bitnet.quantized_gemm import QuantizedInput, QuantizedWeight, quantized_gemm  # noqa: E402
from bitnet.segments import SegmentLayout, single_segment  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def megatron_cpu():
    from falcon_h1.megatron_compat.parallel import initialize_parallel

    initialize_parallel(1, 1, 1234)


def _saved(fn):
    """(result of fn, the tensors autograd keeps for its backward)."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, kept


def _operands(dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, layout.size, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(20, layout.size, generator=g) * 0.05).to(dtype).requires_grad_(True)
    grad = torch.randn(4, 3, 20, generator=g).to(dtype)
    return x, w, grad


LAYOUTS = {"one": single_segment(24, 1), "two": SegmentLayout([("y_ssm", 9), ("o_attn", 15)], 1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_int8_input_kept_for_backward_gives_the_same_bits(dtype, layout_name):
    layout = LAYOUTS[layout_name]
    results = []
    for keep_int8 in (True, False):
        x, w, grad = _operands(dtype, layout)
        q, scale, fq = reference.quantize_and_dequantize_activations(x, layout=layout)
        w_fq = reference.fake_quantize_weights(w)
        x_quantized = QuantizedInput(q, scale, fq, layout) if keep_int8 else QuantizedInput(None, None, fq, layout)
        y, kept = _saved(lambda: quantized_gemm(x, w, x_quantized, QuantizedWeight(fq=w_fq), False, "reference"))
        y.backward(grad)
        results.append((y, x.grad, w.grad, kept))
    (y, gx, gw, kept_int8), (y_f, gx_f, gw_f, kept_float) = results
    assert torch.equal(y, y_f) and torch.equal(gx, gx_f) and torch.equal(gw, gw_f)
    # what each keeps: int8 values + float32 scales + the weight handed in, or the float input + weight
    assert [t.dtype for t in kept_int8] == [torch.int8, torch.float32, dtype]
    assert [t.dtype for t in kept_float] == [dtype, dtype]
    input_bytes = lambda kept: sum(t.numel() * t.element_size() for t in kept[:-1])
    per_token = 4 * len(layout)  # the scales
    assert input_bytes(kept_int8) == x.numel() + 12 * per_token
    assert input_bytes(kept_float) == x.numel() * x.element_size()
    # Straight through, in float64: dy/dx = g @ W_fq, dy/dW = g^T @ x_fq.
    x64, w64, g64 = fq.double().reshape(12, -1), w_fq.double(), grad.double().reshape(12, 20)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double().reshape(12, 20), x64 @ w64.t(), **tol)
    torch.testing.assert_close(gx.double().reshape(12, -1), g64 @ w64, **tol)
    torch.testing.assert_close(gw.double(), g64.t() @ x64, **tol)


def test_int8_gemm_forward_is_the_exact_integer_product():
    layout = single_segment(24, 1)
    x, w, grad = _operands(torch.float32, layout, seed=1)
    q, scale = reference.quantize_activations(x, layout=layout)
    w_q, w_scale = reference.quantize_weights(w)
    y = quantized_gemm(x, w, QuantizedInput(q, scale, None, layout), QuantizedWeight(q=w_q, scale=w_scale),
                       True, "reference")
    acc = q.reshape(12, 24).double() @ w_q.double().t()  # integers, exact in float64
    expected = (acc * scale.reshape(12, 1).double() * w_scale.double()).reshape(4, 3, 20)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-7)
    y.backward(grad)
    x_fq = reference.dequantize_activations(q, scale, torch.float64, layout).reshape(12, 24)
    w_fq = reference.dequantize_weights(w_q, w_scale, torch.float64)
    g = grad.double().reshape(12, 20)
    torch.testing.assert_close(x.grad.double().reshape(12, 24), g @ w_fq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), g.t() @ x_fq, rtol=1e-5, atol=1e-6)


def test_int8_gemm_needs_one_segment_of_int8():
    layout = LAYOUTS["two"]
    x, w, _ = _operands(torch.float32, layout)
    q, scale, fq = reference.quantize_and_dequantize_activations(x, layout=layout)
    with pytest.raises(ValueError, match=r"int8 GEMM needs int8 activations of one segment; got layout"):
        quantized_gemm(x, w, QuantizedInput(q, scale, fq, layout), QuantizedWeight(q=q), True, "reference")


# ---------------------------------------------------------------------- what a layer keeps
def _layers(dtype, **options):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from bitnet.layers import BitNetColumnParallelLinear, BitNetLinearOptions

    config = tiny_config(params_dtype=dtype)
    kwargs = dict(config=config, init_method=torch.nn.init.normal_, bias=False, gather_output=False)
    return (ColumnParallelLinear(64, 96, **kwargs),
            BitNetColumnParallelLinear(64, 96, bitnet_options=BitNetLinearOptions(**options), **kwargs))


def _kept_bytes(layer, x):
    y, kept = _saved(lambda: layer(x)[0])
    activations = [t for t in kept if t.shape[:2] == x.shape[:2]]
    return y, kept, sum(t.numel() * t.element_size() for t in activations)


@pytest.mark.parametrize("options", [dict(keep_int8_input=True), dict(int8_matmul=True), dict()],
                         ids=["float_gemm_int8_kept", "int8_gemm", "float_gemm_default"])
def test_a_layer_keeps_its_input_and_the_cached_weight(options):
    """Against Megatron's own linear on the same input: int8 kept, half its activation bytes (+
    scales); by default (bitnet.saved_input = auto) the fake-quantised bf16 input, as many bytes
    as Megatron keeps; and no weight copy beside the one quantised weight the layer caches anyway."""
    plain, bitnet = _layers(torch.bfloat16, **options)
    x = torch.randn(32, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    _, kept_plain, plain_bytes = _kept_bytes(plain, x)
    y, kept, bitnet_bytes = _kept_bytes(bitnet, x)
    assert plain_bytes == x.numel() * 2
    assert bitnet_bytes == (x.numel() + 64 * 4 if options else x.numel() * 2)
    cached = bitnet._weight_cache._value
    weights = [t for t in kept if t.shape[:2] != x.shape[:2]]
    from_cache = [cached.q, cached.scale] if options.get("int8_matmul") else [cached.fq]  # int8: ternary, row scales
    assert [t.data_ptr() for t in weights] == [t.data_ptr() for t in from_cache]
    y.float().sum().backward()  # and the backward works from them
    assert x.grad is not None and bitnet.weight.grad is not None


def test_full_precision_input_segments_keep_the_float_input():
    """A row linear whose input has a full-precision segment cannot rebuild it from int8."""
    from bitnet.layers import BitNetRowParallelLinear

    layer = BitNetRowParallelLinear(40, 24, config=tiny_config(), init_method=torch.nn.init.normal_, bias=False,
                                    input_is_parallel=True, skip_bias_add=False,
                                    bitnet_segments=[("y_ssm", 16, False), ("o_attn", 24)])
    x = torch.randn(5, 2, 40, requires_grad=True)
    _, kept, _ = _kept_bytes(layer, x)
    assert [t.dtype for t in kept if t.shape[:2] == x.shape[:2]] == [torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ternary_dequantisation_in_one_pass_is_the_reference(dtype):
    from bitnet.quantized_gemm import _dequantize_ternary

    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3)) * 0.05
    w_q, scale = reference.quantize_weights(w)
    rows = torch.rand(64, generator=torch.Generator().manual_seed(4)) + 1e-3  # one scale per output row
    assert torch.equal(_dequantize_ternary(w_q, scale, dtype), reference.dequantize_weights(w_q, scale, dtype))
    assert torch.equal(_dequantize_ternary(w_q, rows, dtype),
                       reference.dequantize_weights(w_q, rows.unsqueeze(-1), dtype))
    assert _dequantize_ternary(w_q, scale, dtype).dtype == dtype
