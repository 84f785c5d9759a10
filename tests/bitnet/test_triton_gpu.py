"""Triton BitNet kernels vs the PyTorch reference, bit for bit (needs CUDA; skipped without).

Run on a GPU machine: `python -m pytest tests/bitnet/test_triton_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tk():
    from bitnet import triton_kernels

    return triton_kernels


def _ref():
    from bitnet import reference

    return reference


def _tie_activations(rows: int, d: int, dtype) -> torch.Tensor:
    """Rows whose absmax is 127 * 2**-k, so s = 2**k exactly, with values (n + 0.5) * 2**-k:
    exact ties for every dtype here."""
    g = torch.Generator().manual_seed(3)
    k = torch.randint(-3, 4, (rows, 1), generator=g).to(torch.float32)
    n = torch.randint(-20, 20, (rows, d), generator=g).to(torch.float32) + 0.5
    x = n * torch.exp2(-k)
    x[:, 0] = 127.0 * torch.exp2(-k[:, 0]) * torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0)
    return x.to(dtype).cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 50), (2, 5, 129), (2, 2, 3, 64), (4, 5000), (1, 0, 8)])
def test_activation_quant_matches_reference(shape, dtype):
    tk, ref = _tk(), _ref()
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype).cuda()
    q_t, s_t = tk.quantize_activations(x)
    q_r, s_r = ref.quantize_activations(x)
    assert q_t.dtype == torch.int8 and q_t.shape == x.shape and s_t.shape == x.shape[:-1]
    assert torch.equal(q_t, q_r)
    assert torch.equal(s_t, s_r)
    assert torch.equal(tk.fake_quantize_activations(x), ref.fake_quantize_activations(x))
    assert torch.equal(tk.activation_absmax(x), ref.activation_absmax(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_quant_ties_and_given_absmax(dtype):
    tk, ref = _tk(), _ref()
    x = _tie_activations(64, 96, dtype)
    q_t, s_t = tk.quantize_activations(x)
    q_r, s_r = ref.quantize_activations(x)
    assert torch.equal(q_t, q_r) and torch.equal(s_t, s_r)
    # Half up: (n + 0.5) -> n + 1 for every tie, negative ones included.
    scaled = x.float() * ref.true_div(127.0, ref.activation_absmax(x)).unsqueeze(-1)  # 2**k, exact
    ties = (scaled - scaled.floor()) == 0.5
    assert ties.float().mean() > 0.5
    assert torch.equal(q_t[ties].float(), scaled[ties].floor() + 1)
    # A larger, externally supplied absmax (the row-parallel all-reduce) is honoured.
    absmax = ref.activation_absmax(x) * 2
    q_t, s_t = tk.quantize_activations(x, absmax)
    q_r, s_r = ref.quantize_activations(x, absmax)
    assert torch.equal(q_t, q_r) and torch.equal(s_t, s_r)
    assert torch.equal(tk.fake_quantize_activations(x, absmax), ref.fake_quantize_activations(x, absmax))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (6, 10), (33, 17), (512, 1000), (3000, 5000)])
def test_weight_quant_matches_reference(shape, dtype):
    tk, ref = _tk(), _ref()
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.02).to(dtype).cuda()
    stats_t = tk.weight_stats(w)
    stats_r = ref.weight_stats(w)
    assert stats_t[1].item() == w.numel()
    torch.testing.assert_close(stats_t, stats_r, rtol=1e-12, atol=0)
    q_t, m_t = tk.quantize_weights(w)
    q_r, m_r = ref.quantize_weights(w)
    assert q_t.dtype == torch.int8 and q_t.shape == w.shape and m_t.dtype == torch.float32
    assert torch.equal(m_t, m_r)
    assert torch.equal(q_t, q_r)
    assert torch.equal(tk.fake_quantize_weights(w), ref.fake_quantize_weights(w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_quant_ties_zero_and_given_stats(dtype):
    tk, ref = _tk(), _ref()
    # mean |w| = 2**-4 exactly; w / m in {+-0.5, +-1.5}: ties round up (-0.5 -> 0, 0.5 -> 1).
    base = torch.tensor([0.5, -0.5, 1.5, -1.5]) * 2.0**-4
    w = base[torch.randperm(4, generator=torch.Generator().manual_seed(0)).repeat(250)]
    w = w.reshape(20, 50).to(dtype).cuda()
    q_t, m_t = tk.quantize_weights(w)
    assert m_t.item() == 2.0**-4
    expected = {0.5: 1, -0.5: 0, 1.5: 1, -1.5: -1}
    for v, q in expected.items():
        assert (q_t[w.float() == v * 2.0**-4] == q).all()
    assert torch.equal(q_t, ref.quantize_weights(w)[0])
    # All-zero weight: the 1e-5 floor.
    z = torch.zeros(4, 8, dtype=dtype, device="cuda")
    q_z, m_z = tk.quantize_weights(z)
    assert (q_z == 0).all() and m_z.item() == torch.tensor(1e-5, dtype=torch.float32).item()
    # Stats of a larger tensor (the TP all-reduce) are used as given.
    stats = ref.weight_stats(w) * torch.tensor([3.0, 2.0], dtype=torch.float64, device="cuda")
    q_t, m_t = tk.quantize_weights(w, stats)
    q_r, m_r = ref.quantize_weights(w, stats)
    assert torch.equal(q_t, q_r) and torch.equal(m_t, m_r)


def test_weight_quant_has_no_host_sync():
    tk = _tk()
    w = torch.randn(256, 300, device="cuda")
    tk.quantize_weights(w)  # compile, and copy each layout's tables to the device, outside the check
    tk.fake_quantize_weights(w)
    tk.fake_quantize_activations(w)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tk.fake_quantize_weights(w)
        tk.quantize_weights(w)
        tk.fake_quantize_activations(w)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("m,k,n", [(5, 24, 8), (32, 64, 48), (300, 1000, 520), (4096, 4096, 1536)])
def test_int8_linear_matches_fake_quant(m, k, n):
    from bitnet import kernels

    x = torch.randn(m, k, device="cuda") * 2
    w = torch.randn(n, k, device="cuda") * 0.02
    x_q, x_s = kernels.quantize_activations(x)
    w_q, w_s = kernels.quantize_weights(w)
    y_int8 = kernels.int8_linear(x_q, x_s, w_q, w_s)
    # Exact integer product, same float rescale: identical to the float64 reference.
    assert torch.equal(y_int8, _ref().int8_linear(x_q, x_s, w_q, w_s))
    y_bf16 = kernels.int8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.bfloat16)
    assert torch.equal(y_bf16, y_int8.to(torch.bfloat16))
    y_float = torch.nn.functional.linear(
        kernels.fake_quantize_activations(x).double(), kernels.fake_quantize_weights(w).double()
    )
    torch.testing.assert_close(y_int8.double(), y_float, rtol=1e-5, atol=1e-5)


def test_against_onebitllms_triton():
    """onebitllms (TII) kernels: dequantises with q / s and sums |W| in float32, so the values
    agree to float rounding (not bit for bit)."""
    onebitllms = pytest.importorskip("onebitllms")
    tk = _tk()
    x = torch.randn(2, 8, 300, device="cuda") * 3
    torch.testing.assert_close(
        tk.fake_quantize_activations(x), onebitllms.activation_quant_triton(x), rtol=1e-6, atol=0
    )
    w = torch.randn(96, 200, device="cuda") * 0.02
    ours, theirs = tk.fake_quantize_weights(w), onebitllms.weight_quant_triton(w)
    same = torch.isclose(ours, theirs, rtol=1e-6, atol=0)
    assert same.float().mean() > 0.999  # only near-tie weights may land on the other side


# --------------------------------------------------------------------------- the layers on GPU
@pytest.fixture(scope="module")
def megatron_gpu():
    from falcon_h1.megatron_compat.parallel import initialize_parallel

    initialize_parallel(1, 1, 1234)


def _layer_pair(subln=False, int8=False, dtype=torch.bfloat16, kernel_backend="auto"):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from bitnet_testutil import tiny_config

    from bitnet.layers import BitNetColumnParallelLinear, BitNetLinearOptions, BitNetRowParallelLinear

    config = tiny_config(1, use_cpu_initialization=False, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    options = BitNetLinearOptions(subln=subln, int8_matmul=int8, kernel_backend=kernel_backend)
    up = BitNetColumnParallelLinear(64, 256, config=config, init_method=torch.nn.init.normal_,
                                    bias=False, gather_output=False, bitnet_options=options)
    down = BitNetRowParallelLinear(256, 64, config=config, init_method=torch.nn.init.normal_,
                                   bias=False, input_is_parallel=True, skip_bias_add=False,
                                   bitnet_options=options)
    return up, down


@pytest.mark.parametrize("subln", [False, True])
def test_layer_triton_equals_reference(megatron_gpu, subln):
    up, _ = _layer_pair(subln=subln)
    up_ref, _ = _layer_pair(subln=subln, kernel_backend="reference")
    up_ref.load_state_dict(up.state_dict())
    x = torch.randn(32, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y_triton, _ = up(x)
    y_triton.float().square().sum().backward()
    grad_triton, wgrad_triton = x.grad.clone(), up.weight.grad.clone()
    x.grad = None
    y_ref, _ = up_ref(x)
    y_ref.float().square().sum().backward()
    assert torch.equal(y_triton, y_ref)
    assert torch.equal(x.grad, grad_triton) and torch.equal(up_ref.weight.grad, wgrad_triton)


def test_layer_int8_forward_matches_fake_quant(megatron_gpu):
    """Each layer alone (chained, a float-rounding difference can flip a later quantiser)."""
    float_layers = _layer_pair(int8=False, dtype=torch.float32)
    int8_layers = _layer_pair(int8=True, dtype=torch.float32)
    from bitnet_testutil import assert_same_forward_and_grads

    for fp, i8, d_in in zip(float_layers, int8_layers, (64, 256), strict=True):
        assert_same_forward_and_grads(fp, i8, torch.randn(32, 2, d_in, device="cuda"))


def test_nonfinite_weight_detected_without_sync(megatron_gpu):
    from bitnet.layers import NonFiniteWeightError, label_bitnet_layers

    up, _ = _layer_pair()
    model = torch.nn.ModuleDict({"up": up})
    label_bitnet_layers(model)
    x = torch.randn(32, 2, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        up.weight[0, 0] = float("nan")
    up(x)  # the check of this call's sum lands asynchronously
    torch.cuda.synchronize()
    with pytest.raises(NonFiniteWeightError, match=r"up\.weight"):
        up(x)


# ------------------------------------------------------ segmented (fused) linears on GPU
def _layouts():
    from bitnet.segments import SegmentLayout

    return {
        "rows": SegmentLayout([("qkv", 384), ("zxbcdt", 1500, False), ("y", 116)], 0),
        "cols": SegmentLayout([("y_ssm", 700), ("o_attn", 300)], 1),
        "cols_fp": SegmentLayout([("y_ssm", 700, False), ("o_attn", 300)], 1),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["rows", "cols", "cols_fp"])
def test_segmented_weight_quant_matches_reference(name, dtype):
    tk, ref = _tk(), _ref()
    layout = _layouts()[name]
    w = (torch.randn(2000, 1000, generator=torch.Generator().manual_seed(5)) * 0.02).to(dtype).cuda()
    stats_t, stats_r = tk.weight_stats(w, layout), ref.weight_stats(w, layout)
    assert torch.equal(stats_t[:, 1], stats_r[:, 1])
    torch.testing.assert_close(stats_t, stats_r, rtol=1e-12, atol=0)
    q_t, m_t = tk.quantize_weights(w, stats_r, layout)
    q_r, m_r = ref.quantize_weights(w, stats_r, layout)
    assert torch.equal(q_t, q_r) and torch.equal(m_t, m_r)
    assert torch.equal(tk.fake_quantize_weights(w, stats_r, layout),
                       ref.fake_quantize_weights(w, stats_r, layout))
    # µP row multipliers in the same pass, bit for bit the multiply of the two rounded tensors
    rows = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(7)).cuda() * 3 + 0.1
    assert torch.equal(tk.fake_quantize_weights(w, stats_r, layout, row_scale=rows),
                       ref.fake_quantize_weights(w, stats_r, layout) * rows.to(dtype)[:, None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["cols", "cols_fp"])
def test_segmented_activation_quant_matches_reference(name, dtype):
    tk, ref = _tk(), _ref()
    layout = _layouts()[name]
    x = (torch.randn(4, 33, 1000, generator=torch.Generator().manual_seed(6)) * 3).to(dtype).cuda()
    assert torch.equal(tk.activation_absmax(x, layout), ref.activation_absmax(x, layout))
    for absmax in (None, ref.activation_absmax(x, layout) * 2):
        q_t, s_t = tk.quantize_activations(x, absmax, layout)
        q_r, s_r = ref.quantize_activations(x, absmax, layout)
        assert torch.equal(q_t, q_r) and torch.equal(s_t, s_r)
        assert torch.equal(tk.fake_quantize_activations(x, absmax, layout),
                           ref.fake_quantize_activations(x, absmax, layout))


def test_int8_linear_per_row_scale():
    from bitnet import kernels

    layout = _layouts()["rows"]
    x = torch.randn(300, 1000, device="cuda") * 2
    w = torch.randn(2000, 1000, device="cuda") * 0.02
    x_q, x_s = kernels.quantize_activations(x)
    w_q, w_scales = kernels.quantize_weights(w, layout=layout)
    row_scales = layout.along_weight(w_scales).reshape(-1)
    assert torch.equal(kernels.int8_linear(x_q, x_s, w_q, row_scales),
                       _ref().int8_linear(x_q, x_s, w_q, row_scales))


def test_segmented_quant_has_no_host_sync():
    tk = _tk()
    rows, cols = _layouts()["rows"], _layouts()["cols"]
    w = torch.randn(2000, 1000, device="cuda")
    for _ in range(2):  # compile and build the device tables outside the check
        tk.fake_quantize_weights(w, layout=rows)
        tk.fake_quantize_weights(w, layout=cols)
        tk.fake_quantize_activations(w, layout=cols)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tk.fake_quantize_weights(w, layout=rows)
        tk.quantize_weights(w, layout=cols)
        tk.fake_quantize_activations(w, tk.activation_absmax(w, cols), cols)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("subln", [False, True])
def test_fused_segmented_layers_triton_equal_reference(megatron_gpu, subln):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from bitnet_testutil import tiny_config

    from bitnet.layers import BitNetColumnParallelLinear, BitNetLinearOptions, BitNetRowParallelLinear

    config = tiny_config(1, use_cpu_initialization=False, params_dtype=torch.bfloat16, bf16=True)

    def pair(kernel_backend):
        options = BitNetLinearOptions(subln=subln, kernel_backend=kernel_backend)
        up = BitNetColumnParallelLinear(64, 256, config=config, init_method=torch.nn.init.normal_, bias=False,
                                        gather_output=False, bitnet_options=options,
                                        bitnet_segments=[("qkv", 96), ("zxbcdt", 160, False)])
        down = BitNetRowParallelLinear(256, 64, config=config, init_method=torch.nn.init.normal_, bias=False,
                                       input_is_parallel=True, skip_bias_add=False, bitnet_options=options,
                                       bitnet_segments=[("y_ssm", 128), ("o_attn", 128)])
        return up, down

    triton_pair, reference_pair = pair("auto"), pair("reference")
    for a, b in zip(triton_pair, reference_pair):
        b.load_state_dict(a.state_dict())
    x0 = torch.randn(32, 2, 64, device="cuda", dtype=torch.bfloat16)

    def run(up, down):
        x = x0.clone().requires_grad_(True)
        y = down(torch.nn.functional.gelu(up(x)[0]))[0]
        y.float().square().sum().backward()
        return y.detach(), x.grad, up.weight.grad, down.weight.grad

    for a, b in zip(run(*triton_pair), run(*reference_pair)):
        assert torch.equal(a, b)


# ------------------------------------------- the int8-kept input and the weight cache on GPU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["cols", "cols_fp"])
def test_quantize_and_dequantize_activations_match_reference(name, dtype):
    tk, ref = _tk(), _ref()
    layout = _layouts()[name]
    x = (torch.randn(4, 33, 1000, generator=torch.Generator().manual_seed(7)) * 3).to(dtype).cuda()
    for absmax in (None, ref.activation_absmax(x, layout) * 2):
        ours, theirs = tk.quantize_and_dequantize_activations(x, absmax, layout), \
            ref.quantize_and_dequantize_activations(x, absmax, layout)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        q, scale, fq = theirs
        assert torch.equal(tk.dequantize_activations(q, scale, dtype, layout),
                           ref.dequantize_activations(q, scale, dtype, layout))
        if layout.all_quantized:  # int8 * scale is the dequantised input, bit for bit
            assert torch.equal(tk.dequantize_activations(q, scale, dtype, layout), fq)


def _bitnet_column(**options):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from bitnet_testutil import tiny_config

    from bitnet.layers import BitNetColumnParallelLinear, BitNetLinearOptions

    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    config = tiny_config(1, use_cpu_initialization=False, params_dtype=torch.bfloat16, bf16=True)
    # GPU initialisation draws from Megatron's model-parallel RNG: reseed it for the same weights each call
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return BitNetColumnParallelLinear(256, 512, config=config, init_method=torch.nn.init.normal_, bias=False,
                                      gather_output=False, bitnet_options=BitNetLinearOptions(**options),
                                      bitnet_segments=[("qkv", 192), ("zxbcdt", 320)])


@pytest.mark.parametrize("int8", [False, True])
def test_cached_training_equals_quantising_every_forward_on_gpu(megatron_gpu, int8):
    """torch's fused AdamW (no version bump), two micro-batches a step, bit for bit."""
    x = torch.randn(3, 4, 64, 256, device="cuda", dtype=torch.bfloat16)

    def train(cached):
        layer = _bitnet_column(int8_matmul=int8)
        if not cached:
            layer.register_forward_pre_hook(lambda module, _: module._weight_cache.clear())
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, fused=True)
        outputs = []
        for step in range(3):
            for micro in range(2):
                y = layer(x[step, 2 * micro : 2 * micro + 2])[0]
                y.float().square().mean().backward()
                outputs.append(y.detach())
            optimizer.step()
            optimizer.zero_grad()
        return torch.stack(outputs), layer.weight.detach()

    (y, w), (y_ref, w_ref) = train(True), train(False)
    assert torch.equal(y, y_ref) and torch.equal(w, w_ref)


def test_cuda_graph_replays_quantise_the_current_weight(megatron_gpu):
    """A captured forward + backward quantises inside the graph (the cache is a host-side check a
    replay would skip): after optimizer steps between replays, the replayed output is a fresh
    layer's output on the current weight."""
    layer = _bitnet_column()
    # a large step: a stale ternary weight would be far off, not a rounding away
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    x = torch.randn(128, 2, 256, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up eagerly: fills the cache
            layer.zero_grad(set_to_none=True)
            layer(x)[0].float().square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    assert layer._weight_cache.holds
    layer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)[0]
        y.float().square().mean().backward()
    assert not layer._weight_cache.holds  # dropped at capture: no stale copy beside the graph's
    previous = None
    for _ in range(3):
        graph.replay()
        fresh = _bitnet_column()
        fresh.load_state_dict(layer.state_dict())
        expected = fresh(x)[0]
        scale = expected.float().abs().max()
        # the same kernels, captured or not; only cuBLAS may pick another algorithm in a capture
        assert (y.float() - expected.float()).abs().max() <= 1e-3 * scale
        if previous is not None:
            assert (previous.float() - expected.float()).abs().max() > 0.1 * scale  # the weights did move
        previous = expected
        optimizer.step()
    with torch.no_grad():  # an eager evaluation between replays: correct, and keeps no copy
        fresh = _bitnet_column()
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(layer(x)[0], fresh(x)[0])
    assert not layer._weight_cache.holds


def test_a_captured_optimizer_step_turns_the_cache_off(megatron_gpu, monkeypatch):
    """A capturable optimizer replayed by a graph changes weights without a step hook: eager
    forwards must then quantise every time."""
    from bitnet import weight_cache

    monkeypatch.setattr(weight_cache, "_off_because", None)
    layer = _bitnet_column()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, capturable=True, foreach=True)
    x = torch.randn(64, 2, 256, device="cuda", dtype=torch.bfloat16)
    layer(x)[0].float().square().mean().backward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        optimizer.step()  # warm-up: state allocated outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    assert "captured in a CUDA graph" in weight_cache.cache_disabled_reason()
    for _ in range(2):
        graph.replay()
        fresh = _bitnet_column()
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(layer(x)[0], fresh(x)[0])
