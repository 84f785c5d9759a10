"""GPU fast path (mamba_ssm Triton SSD + SDPA flash attention, bf16) vs the pure
PyTorch reference path (fp32), forward and backward. Runs on a CUDA machine with
mamba_ssm installed (`./setup.sh`); skipped elsewhere."""

import pytest
import torch

from falcon_h1.kernels import use_fast_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TOLERANCE = 1e-2  # relative L2 error; bf16 operands land at a few 1e-3


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def packed_seq_idx(batch: int, length: int, packed: bool = True):
    """seq_idx [batch, length] of rows packed with documents of uneven lengths (shorter than the
    conv window, across chunks and blocks; a different split per row), or None (unpacked)."""
    if not packed:
        return None
    from falcon_h1.kernels.documents import documents_from_position_ids
    from tests.falcon_h1.packed_rows import position_ids

    pattern = [1, 2, 130, 77, 300, 5, 211, 700, 43]
    rows = []
    for row in range(batch):
        lengths, left, i = [], length, row
        while left:
            lengths.append(min(pattern[i % len(pattern)], left))
            left -= lengths[-1]
            i += 1
        rows.append(lengths)
    return documents_from_position_ids(position_ids(rows).cuda()).seq_idx


def test_triton_ssd_matches_reference():
    from falcon_h1.kernels import ssd_scan

    if not use_fast_path("auto", torch.device("cuda")):
        pytest.skip("mamba_ssm Triton kernels not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    b, l, h, p, groups, n = 2, 1000, 8, 64, 2, 64  # l not a multiple of the chunk
    x = torch.randn(b, l, h, p, device="cuda", generator=g)
    dt = torch.randn(b, l, h, device="cuda", generator=g) - 1
    A = -torch.rand(h, device="cuda", generator=g) * 4 - 0.5
    B = torch.randn(b, l, groups, n, device="cuda", generator=g)
    C = torch.randn(b, l, groups, n, device="cuda", generator=g)
    D, dt_bias = torch.randn(h, device="cuda", generator=g), torch.rand(h, device="cuda", generator=g)
    grad = torch.randn(b, l, h, p, device="cuda", generator=g)
    outputs = {}
    for fast, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        inputs = [t.detach().to(dtype).clone().requires_grad_() for t in (x, dt, B, C)]
        extra = [t.clone().requires_grad_() for t in (A, D, dt_bias)]
        y = ssd_scan(inputs[0], inputs[1], extra[0], inputs[2], inputs[3], 128, extra[1], extra[2],
                     (0.0, float("inf")), fast)
        y.backward(grad.to(dtype))
        outputs[fast] = [y] + [t.grad for t in inputs + extra]
    names = ["y", "dx", "ddt", "dB", "dC", "dA", "dD", "ddt_bias"]
    errors = {n: rel(got, ref) for n, ref, got in zip(names, outputs[False], outputs[True])}
    assert max(errors.values()) <= BF16_TOLERANCE, errors


@pytest.mark.parametrize("mamba_rms_norm", [False, True], ids=["gate", "gated_norm"])
@pytest.mark.parametrize("ssd_kernels", ["mamba_ssm", "own"])
def test_model_fast_path_matches_reference_forward_and_backward(megatron_single, ssd_kernels, mamba_rms_norm):
    """Fast path (bf16, Triton kernels, µP multipliers folded; the scan on mamba_ssm's kernels or
    on the project's own, model.ssd_kernels; with mamba_rms_norm, as the released presets but 0.5B,
    the fused branch followed by its group-wise norm) against the reference path in fp32. Gradients that
    nearly cancel (dt_bias, A_log: norms ~1e-8 against ~1e-5 for the weights) carry a few % of
    bf16 noise on any path, so each gradient's bound is the larger of 3 x the bf16 tolerance and
    twice the error of the reference path run in bf16."""
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset
    from falcon_h1.weights import gather_hf_state

    cfg = get_preset("falcon_h1_tiny").replace(
        max_position_embeddings=4096, mamba_chunk_size=64, key_multiplier=0.6, attention_in_multiplier=1.2,
        attention_out_multiplier=0.8, ssm_in_multiplier=1.1, ssm_out_multiplier=0.9,
        ssm_multipliers=[0.5, 0.6, 0.7, 0.8, 0.9], mlp_multipliers=[1.4, 0.6], mamba_rms_norm=mamba_rms_norm)
    ids = torch.randint(0, cfg.vocab_size, (2, 500), device="cuda")
    labels = torch.randint(0, cfg.vocab_size, (2, 500), device="cuda")
    results = {}
    for backend, precision in (("reference", "fp32"), ("reference", "bf16"), ("auto", "bf16")):
        scan = ssd_kernels if backend == "auto" else "mamba_ssm"  # 'own' is refused on the reference path
        model = build_model(cfg.replace(kernel_backend=backend, ssd_kernels=scan), precision=precision, seed=3)
        if use_fast_path("auto", torch.device("cuda")) and backend == "auto":
            assert model.kernel_options.own_ssd_backward == (scan == "own")
            assert all(layer.mixer.fused_mamba_branch for layer in model.layers
                       if hasattr(layer, "mixer") and layer.mixer.mamba)
        logits = model(ids)
        loss = model(ids, labels=labels).float().mean()
        loss.backward()
        results[backend, precision] = (logits.float(), loss, dict(gather_hf_state(model, grads=True)))
    (ref_logits, ref_loss, ref_grads) = results["reference", "fp32"]
    (logits, loss, grads), bf16_ref_grads = results["auto", "bf16"], results["reference", "bf16"][2]
    assert rel(logits, ref_logits) <= BF16_TOLERANCE
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= BF16_TOLERANCE
    for name, ref in ref_grads.items():
        bound = max(3 * BF16_TOLERANCE, 2 * rel(bf16_ref_grads[name], ref))
        assert rel(grads[name], ref) <= bound, (name, rel(grads[name], ref), bound)


def _poison_allocator(numel: int = 1 << 24):
    """Fill a freed block of the caching allocator with NaN so that an output element a
    kernel forgets to write shows up as NaN instead of a plausible leftover."""
    torch.full((numel,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def test_row_scaled_weight_equals_torch_bit_for_bit():
    """kernels.row_scale's W * s and its weight gradient in bf16: the same bits as torch's
    broadcasting multiply (fp32 product, rounded to nearest; the interpreter truncates instead)."""
    from falcon_h1.kernels.row_scale import row_scaled_weight

    g = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(5000, 1024, device="cuda", generator=g).bfloat16()
    s = (torch.rand(5000, 1, device="cuda", generator=g) + 0.5).bfloat16()
    dw = torch.randn(5000, 1024, device="cuda", generator=g).bfloat16()
    got_w, want_w = w.clone().requires_grad_(), w.clone().requires_grad_()
    got, want = row_scaled_weight(got_w, s), want_w * s
    got.backward(dw)
    want.backward(dw)
    assert torch.equal(got, want) and torch.equal(got_w.grad, want_w.grad)


def test_out_projection_input_equals_concatenation():
    """The out-projection's input from the scan's [b, s, .] y and SDPA's own output (seen as
    [s, b, heads, d], as the layer passes it): torch.cat's values and gradients, bit for bit."""
    from falcon_h1.kernels.out_projection_input import out_projection_input, out_projection_input_reference

    b, s, heads, head_dim, width = 4, 1000, 8, 64, 1536
    q, k, v = (torch.randn(b, heads, s, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).permute(2, 0, 1, 3)
    y = torch.randn(b, s, width, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    dout = torch.randn(s, b, width + heads * head_dim, device="cuda", dtype=torch.bfloat16)
    got_parts, want_parts = ([t.detach().clone().requires_grad_() for t in (y, o)] for _ in range(2))
    got, want = out_projection_input(got_parts, True), out_projection_input_reference(want_parts)
    got.backward(dout)
    want.backward(dout)
    assert got.is_contiguous() and torch.equal(got, want)
    assert all(torch.equal(a.grad, w.grad) for a, w in zip(got_parts, want_parts))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOLERANCE)])
@pytest.mark.parametrize("length", [4096, 1000, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("streaming", [False, True], ids=["two_pass", "streaming"])
def test_triton_conv_matches_reference(dtype, tolerance, length, packed, streaming):
    from falcon_h1.kernels.conv_reference import causal_conv1d_silu_reference
    from falcon_h1.kernels.conv_triton import causal_conv1d_silu_triton

    g = torch.Generator(device="cuda").manual_seed(length)
    b, c = 2, 1792 + 24  # the 0.5B's x|B|C width; +24: a ragged last channel block
    base = torch.randn(length, b, c + 1560, device="cuda", generator=g)  # as the mixer's [s, b, proj] slice
    x = base[:, :, 1536:1536 + c].transpose(0, 1)
    w, bias = torch.randn(c, 4, device="cuda", generator=g) * 0.5, torch.randn(c, device="cuda", generator=g)
    scale = torch.rand(c, device="cuda", generator=g) + 0.5
    dy = torch.randn(b, length, c, device="cuda", generator=g)
    seq_idx = packed_seq_idx(b, length, packed)
    # float64 reference: an fp32 cuDNN conv may run in TF32, too coarse for the fp32 check
    ref = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    want = causal_conv1d_silu_reference(*ref, seq_idx=seq_idx) * scale.double()
    want.backward(dy.double())
    fast = [t.detach().to(dtype).requires_grad_() for t in (x, w, bias)]
    _poison_allocator()
    got = causal_conv1d_silu_triton(*fast, scale, seq_idx=seq_idx, streaming=streaming)
    _poison_allocator()
    got.backward(dy.to(dtype))
    errors = {name: rel(a, r) for name, a, r in [
        ("out", got, want), ("dx", fast[0].grad, ref[0].grad), ("dweight", fast[1].grad, ref[1].grad),
        ("dbias", fast[2].grad, ref[2].grad)]}
    assert max(errors.values()) <= tolerance, errors


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOLERANCE)])
def test_triton_swiglu_matches_reference(dtype, tolerance):
    from falcon_h1.kernels import swiglu_reference
    from falcon_h1.kernels.swiglu_triton import swiglu_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(300, 3, 2 * 2048, device="cuda", generator=g)
    dout = torch.randn(300, 3, 2048, device="cuda", generator=g)
    ref = h.detach().double().requires_grad_()
    want = swiglu_reference(ref)
    want.backward(dout.double())
    fast = h.detach().to(dtype).requires_grad_()
    _poison_allocator()
    got = swiglu_triton(fast)
    got.backward(dout.to(dtype))
    assert rel(got, want) <= tolerance and rel(fast.grad, ref.grad) <= tolerance


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOLERANCE)])
@pytest.mark.parametrize("hidden", [1024, 3072, 5120])   # 0.5B, 7B, 34B
def test_triton_residual_rms_norm_matches_reference(dtype, tolerance, hidden):
    """The residual add and the MLP's RMSNorm in one kernel (kernels.rms_norm_triton) against
    float64: the sum bit for bit torch's own x + delta, the norm, and the gradients of x, delta and
    the weight; the plain RMSNorm (no residual) too."""
    from falcon_h1.kernels.rms_norm_triton import residual_rms_norm_triton, rms_norm_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    x, delta, dsum, dout = (torch.randn(1000, 3, hidden, device="cuda", generator=g) for _ in range(4))
    w = torch.rand(hidden, device="cuda", generator=g) + 0.5
    leaf = lambda t, as64=False: t.detach().to(dtype).to(torch.float64 if as64 else dtype).clone().requires_grad_()
    xs, ds, ws = (leaf(t) for t in (x, delta, w))
    x64, d64, w64 = (leaf(t, True) for t in (x, delta, w))
    _poison_allocator()
    total, out = residual_rms_norm_triton(xs, ds, ws, 1e-5)
    torch.autograd.backward([total, out], [dsum.to(dtype), dout.to(dtype)])
    assert torch.equal(total, (xs + ds).detach())
    rounded = x64 + d64 + (total.detach().double() - (x64 + d64)).detach()  # the rounded sum, exact gradient
    norm64 = lambda t, weight: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    want = norm64(rounded, w64)
    torch.autograd.backward([x64 + d64, want], [dsum.to(dtype).double(), dout.to(dtype).double()])
    errors = {"out": rel(out, want), "dx": rel(xs.grad, x64.grad), "ddelta": rel(ds.grad, d64.grad),
              "dweight": rel(ws.grad, w64.grad)}
    plain_in, plain_w = leaf(x), leaf(w)
    plain = rms_norm_triton(plain_in, plain_w, 1e-5)
    plain.backward(dout.to(dtype))
    p64, pw64 = leaf(x, True), leaf(w, True)
    want_plain = norm64(p64, pw64)
    want_plain.backward(dout.to(dtype).double())
    errors.update(plain_out=rel(plain, want_plain), plain_dx=rel(plain_in.grad, p64.grad),
                  plain_dweight=rel(plain_w.grad, pw64.grad))
    assert max(errors.values()) <= tolerance, errors


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOLERANCE)])
@pytest.mark.parametrize("positions", [False, True], ids=["shared_positions", "row_positions"])
@pytest.mark.parametrize("one_launch", [False, True], ids=["head_programs", "one_launch"])
def test_triton_rotary_matches_reference(dtype, tolerance, positions, one_launch):
    """RoPE on the attention columns of a 0.5B-shaped fused in-projection (row 4120 wide; 8 q heads,
    2 kv heads of 64), yarn's attention factor, against the reference formula in float64; a program
    a head, or every head of a row block in one launch (KernelOptions.rotary_one_launch)."""
    from falcon_h1.config import FalconH1Config
    from falcon_h1.kernels import rotary_qkv
    from falcon_h1.rope import RotaryFrequencies

    length, batch, hd, q_w, kv_w, width = 2048, 2, 64, 512, 128, 4120
    cfg = FalconH1Config(head_dim=hd, max_position_embeddings=1024, rope_theta=1e6,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512})
    position_ids = (torch.arange(length, device="cuda")[None] + torch.tensor([[0], [300]], device="cuda")
                    if positions else None)
    freqs = RotaryFrequencies(cfg)(length, position_ids, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    proj = torch.randn(length, batch, width, device="cuda", generator=g)
    grads = [torch.randn(length, batch, n, hd, device="cuda", generator=g) for n in (8, 2, 2)]
    ref = proj.detach().double().requires_grad_()
    want = rotary_qkv(ref[..., :q_w + 2 * kv_w], freqs.double(), q_w, kv_w, hd, 1.2, fast=False)
    torch.autograd.backward(want, [t.double() for t in grads])
    fast = proj.detach().to(dtype).requires_grad_()
    _poison_allocator()
    got = rotary_qkv(fast[..., :q_w + 2 * kv_w], freqs, q_w, kv_w, hd, 1.2, fast=True, one_launch=one_launch)
    torch.autograd.backward(got, [t.to(dtype) for t in grads])
    errors = {name: rel(a, b) for name, a, b in zip("qkv", got, want)}
    errors["dqkv"] = rel(fast.grad, ref.grad)
    assert max(errors.values()) <= tolerance, errors


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_triton_ssd_gating_matches_reference(packed):
    """The scan kernel's own gating (z passed in) against the reference y * silu(z); packed:
    both with the same seq_idx (the reference equals each document alone: test_kernels.py)."""
    from falcon_h1.kernels import ssd_scan

    if not use_fast_path("auto", torch.device("cuda")):
        pytest.skip("mamba_ssm Triton kernels not installed")
    g = torch.Generator(device="cuda").manual_seed(1)
    b, l, h, p, groups, n = 2, 700, 8, 64, 1, 128
    proj = torch.randn(l, b, 2 * h * p + 2 * groups * n + h, device="cuda", generator=g)
    z, x, B, C, dt = proj.transpose(0, 1).split([h * p, h * p, groups * n, groups * n, h], dim=-1)  # strided views
    A = -torch.rand(h, device="cuda", generator=g) * 4 - 0.5
    D, dt_bias = torch.randn(h, device="cuda", generator=g), torch.rand(h, device="cuda", generator=g)
    grad = torch.randn(b, l, h, p, device="cuda", generator=g)
    seq_idx = packed_seq_idx(b, l, packed)
    outputs = {}
    for fast, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (x, dt, B, C, z)]
        xi, dti, Bi, Ci, zi = inputs
        heads = lambda t, k: t.unflatten(-1, (k, -1))
        y = ssd_scan(heads(xi, h), dti, A, heads(Bi, groups), heads(Ci, groups), 128, D, dt_bias,
                     (0.0, float("inf")), fast, z=heads(zi, h), seq_idx=seq_idx)
        y.backward(grad.to(dtype))
        outputs[fast] = [y] + [t.grad for t in inputs]
    names = ["y", "dx", "ddt", "dB", "dC", "dz"]
    errors = {k: rel(got, ref) for k, ref, got in zip(names, outputs[False], outputs[True])}
    assert max(errors.values()) <= BF16_TOLERANCE, errors


@pytest.mark.parametrize("ssd_keep_forward_states", [True, False], ids=["kept_ssd_states", "recomputed_ssd_states"])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_fused_mamba_branch_matches_reference(with_scale, packed, ssd_keep_forward_states):
    """kernels.mamba_branch (conv + gated scan in one autograd function writing its gradients
    into [s, b]-laid-out buffers) in bf16 against the reference conv + chunked scan + gating
    in fp32, on a strided [s, b] in-projection slice like the mixer's; the scan's backward from
    the forward's saved chunk states and from mamba_ssm's recomputation of them."""
    import torch.nn.functional as F

    from falcon_h1.kernels import causal_conv1d_silu, ssd_scan
    from falcon_h1.kernels.mamba_branch import mamba_conv_scan

    if not use_fast_path("auto", torch.device("cuda")):
        pytest.skip("mamba_ssm Triton kernels not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    b, l, h, p, groups, n, extra = 2, 600, 8, 64, 2, 32, 40  # extra: attention columns before zxbcdt
    d, bc = h * p, groups * n
    width = 2 * d + 2 * bc + h
    proj = torch.randn(l, b, extra + width, device="cuda", generator=g)
    proj[..., extra + 2 * d + 2 * bc:] -= 1.0  # dt before softplus
    w = torch.randn(d + 2 * bc, 4, device="cuda", generator=g) * 0.5
    bias = torch.randn(d + 2 * bc, device="cuda", generator=g) * 0.1
    scale = torch.rand(d + 2 * bc, device="cuda", generator=g) + 0.5 if with_scale else None
    A = -torch.rand(h, device="cuda", generator=g) * 4 - 0.5
    D, dt_bias = torch.randn(h, device="cuda", generator=g), torch.rand(h, device="cuda", generator=g)
    dy = torch.randn(b, l, d, device="cuda", generator=g)
    limit = (0.0, float("inf"))
    seq_idx = packed_seq_idx(b, l, packed)
    outputs = {}
    for fused, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        leaf = proj.detach().to(dtype).clone().requires_grad_()
        params = [t.detach().to(dtype).clone().requires_grad_() for t in (w, bias)]
        extra_params = [t.clone().requires_grad_() for t in (A, D, dt_bias)]
        zxbcdt = leaf[..., extra:].transpose(0, 1)
        if fused:
            y = mamba_conv_scan(zxbcdt, *params, scale, *extra_params, d, bc, h, groups, 64, limit, seq_idx=seq_idx,
                                keep_forward_states=ssd_keep_forward_states)
        else:
            z, xBC, dt = zxbcdt.split([d, d + 2 * bc, h], dim=-1)
            xBC = causal_conv1d_silu(xBC, *params, False, out_scale=scale, seq_idx=seq_idx)
            x, B, C = xBC.split([d, bc, bc], dim=-1)
            y = ssd_scan(x.unflatten(-1, (h, p)), dt, extra_params[0], B.unflatten(-1, (groups, n)),
                         C.unflatten(-1, (groups, n)), 64, extra_params[1], extra_params[2], limit, False,
                         seq_idx=seq_idx)
            y = y.flatten(-2) * F.silu(z)
        y.backward(dy.to(dtype))
        assert leaf.grad[..., :extra].abs().max() == 0
        outputs[fused] = [y, leaf.grad[..., extra:]] + [t.grad for t in params + extra_params]
    names = ["y", "dzxbcdt", "dconv_w", "dconv_b", "dA", "dD", "ddt_bias"]
    errors = {name: rel(got, ref) for name, ref, got in zip(names, outputs[False], outputs[True])}
    assert max(errors.values()) <= BF16_TOLERANCE, errors


@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen"])
def test_packed_attention_backends_match_reference(backend):
    """The GPU candidates for attention within packed documents (bf16, fwd + bwd, GQA) against
    the unfused fp32 reference with the same documents (which equals each document alone on
    CPU: test_kernels.py)."""
    from falcon_h1.kernels import causal_attention
    from falcon_h1.kernels.documents import Documents

    g = torch.Generator(device="cuda").manual_seed(2)
    b, hq, hkv, l, d = 2, 8, 2, 1000, 64
    docs = Documents(seq_idx=packed_seq_idx(b, l))
    q, k, v = (torch.randn(b, heads, l, d, device="cuda", generator=g) for heads in (hq, hkv, hkv))
    dy = torch.randn(b, hq, l, d, device="cuda", generator=g)
    outputs = {}
    for name, dtype in (("unfused", torch.float32), (backend, torch.bfloat16)):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
        out = causal_attention(*leaves, d ** -0.5, name, documents=docs)
        out.backward(dy.to(dtype))
        outputs[name] = [out] + [t.grad for t in leaves]
    errors = {n: rel(got, ref) for n, ref, got in zip(["out", "dq", "dk", "dv"], outputs["unfused"], outputs[backend])}
    assert max(errors.values()) <= BF16_TOLERANCE, errors


@pytest.mark.parametrize("backend", ["causal sdpa", "sdpa", "flex", "varlen"])
def test_attention_on_a_view_of_the_fused_projection_matches_reference(backend):
    """v as the micro preset hands it to attention: a view of the fused in-projection's 292-wide
    bf16 rows (584 bytes, not a whole number of 16-byte units: torch's cuDNN kernel returns wrong
    values for them, flash a misaligned address). bf16 fwd + bwd, unpacked (causal sdpa) and packed
    rows, against the unfused fp32 reference on contiguous copies."""
    from falcon_h1.kernels import causal_attention
    from falcon_h1.kernels.documents import documents_from_position_ids
    from tests.falcon_h1.packed_rows import position_ids

    g = torch.Generator(device="cuda").manual_seed(3)
    rows = [[72]] if backend == "causal sdpa" else [[13, 37, 22]]
    docs = None if backend == "causal sdpa" else documents_from_position_ids(position_ids(rows).cuda())
    projection = torch.randn(72, 1, 292, device="cuda", generator=g)  # [s, b, width]
    q, k = (torch.randn(1, h, 72, 16, device="cuda", generator=g) for h in (4, 2))
    dy = torch.randn(1, 4, 72, 16, device="cuda", generator=g)
    outputs = {}
    for name, dtype in (("unfused", torch.float32), (backend.split()[-1], torch.bfloat16)):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, projection)]
        v = leaves[2][..., 96:128].reshape(72, 1, 2, 16).permute(1, 2, 0, 3)
        if dtype == torch.float32:
            v = v.contiguous()
        out = causal_attention(leaves[0], leaves[1], v, 16 ** -0.5, name, documents=docs)
        out.backward(dy.to(dtype))
        outputs[name] = [out, leaves[0].grad, leaves[1].grad, leaves[2].grad[..., 96:128]]
    got = outputs[backend.split()[-1]]
    errors = {n: rel(a, b) for n, b, a in zip(["out", "dq", "dk", "dv"], outputs["unfused"], got)}
    assert max(errors.values()) <= BF16_TOLERANCE, errors


@pytest.mark.parametrize("backend", ["flex", "varlen", "sdpa"])
def test_model_packed_row_equals_each_document_alone_on_the_fast_path(megatron_single, backend):
    """The whole model on the GPU path in bf16 (KernelOptions.packed_attention = backend): a packed
    row of three documents against each document run alone on the same path. Logits and loss at
    the bf16 tolerance; gradients (fp32-exact on CPU, test_packed_model.py) are printed, as bf16
    sums over different token orders leave the near-cancelling ones noisy."""
    from falcon_h1.kernels import KernelOptions
    from falcon_h1.model import build_model
    from tests.falcon_h1.packed_model import CONFIG, ROWS, batch, errors, run_alone, run_packed

    if not use_fast_path("auto", torch.device("cuda")):
        pytest.skip("mamba_ssm Triton kernels not installed")
    model = build_model(CONFIG, precision="bf16", kernel_options=KernelOptions(packed_attention=backend), seed=7)
    data = {k: v.cuda() for k, v in batch(ROWS, CONFIG.vocab_size).items()}
    got = errors(run_packed(model, data), run_alone(model, data, ROWS))
    grads = {k: v for k, v in got.items() if k.startswith("grad")}
    print(backend, f"logits {got['logits']:.1e} loss {got['loss']:.1e} worst gradient "
          f"{max(grads, key=grads.get)} {max(grads.values()):.1e}")
    assert got["logits"] <= BF16_TOLERANCE and got["loss"] <= BF16_TOLERANCE, got
