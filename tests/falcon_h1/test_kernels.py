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


def _in_projection_views(length: int, dtype):
    """q, k [b, heads, l, 16] and v as attention gets it from the micro preset's fused
    in-projection: a view of a 292-wide row (584 bytes in bf16, not a whole number of 16-byte units)."""
    g = torch.Generator().manual_seed(5)
    projection = torch.randn(length, 1, 292, generator=g).to(dtype)  # [s, b, width]
    q, k = (torch.randn(1, h, length, 16, generator=g).to(dtype) for h in (4, 2))
    v = projection[..., 96:128].reshape(length, 1, 2, 16).permute(1, 2, 0, 3)
    return q, k, v


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_attention_kernels_get_rows_aligned_to_16_bytes(monkeypatch, packed):
    """torch's GPU attention kernels fail on rows whose stride is not a whole number of 16 bytes
    (the micro preset's fused in-projection), so causal_attention hands SDPA aligned rows, and the
    result is still attention of the view's values (float64 reference on a contiguous copy)."""
    import torch.nn.functional as F

    from falcon_h1.kernels.documents import documents_from_position_ids
    from tests.falcon_h1.packed_rows import position_ids

    q, k, v = _in_projection_views(72, torch.bfloat16)
    assert v.stride(2) * v.element_size() % 16 != 0
    docs = documents_from_position_ids(position_ids([[13, 37, 22]] if packed else [[72]]))
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(*tensors, **kwargs):
        seen.extend(tensors[:3])
        return sdpa(*tensors, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    got = causal_attention(q, k, v, 0.25, "sdpa", documents=docs if packed else None)
    assert len(seen) == 3
    for t in seen:
        assert t.data_ptr() % 16 == 0
        assert all(s * t.element_size() % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    monkeypatch.undo()
    want = causal_attention(q.double(), k.double(), v.double().contiguous(), 0.25, "unfused",
                            documents=docs if packed else None)
    assert _rel(got, want) <= 1e-2  # bf16 operands


def test_triton_kernels_match_float64_in_interpreter():
    """The Triton conv+SiLU, RoPE and SwiGLU kernels (forward and backward) run on CPU under
    Triton's interpreter in a subprocess (the variable must be set before triton loads);
    the conv also on packed rows (seq_idx) against every document convolved alone."""
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
        assert all(layer.mixer.scales_in_weights for layer in ours.layers)
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


@pytest.mark.parametrize("options", [
    dict(fold_scales=False),                     # µP multipliers on the activations
    dict(gate_in_scan=False),                    # y * silu(z) after the scan
    {f: False for f in ("triton_ssd", "triton_conv", "triton_swiglu", "triton_rotary", "fold_scales", "gate_in_scan",
                        "fused_mamba_branch", "fused_rms_norm", "ssd_keep_forward_states", "fused_cross_entropy")},
], ids=["no_folding", "gate_after_scan", "all_off"])
@pytest.mark.parametrize("mamba_rms_norm", [False, True], ids=["gate", "gated_norm"])
def test_every_kernel_options_setting_computes_transformers_function(megatron_single, tmp_path, options,
                                                                     mamba_rms_norm):
    """A model built with other KernelOptions is the same function: logits and every gradient
    equal transformers' FalconH1 (fp32, all multipliers != 1; with and without the gated RMSNorm,
    whose gate comes first: the scan gates and the norm follows it, the folded ssm_out_multiplier on
    the norm's output)."""
    from falcon_h1.kernels import KernelOptions
    from tests.falcon_h1.hf_built import build_from_hf, gradient_errors
    from tests.falcon_h1.hf_reference import make_hf_model

    hf = make_hf_model(seed=6, mamba_rms_norm=mamba_rms_norm)
    hf.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 97, (2, 19), generator=g)
    probe = torch.randn(2, 19, 97, generator=g)
    for fused in (True, False):
        ours = build_from_hf(tmp_path, kernel_options=KernelOptions(**options), fused_projections=fused)
        errors = gradient_errors(ours, hf, ids, probe)
        assert max(errors.values()) <= 1e-5, (fused, errors)


def test_own_ssd_backward_without_the_kept_states_is_refused():
    """The own SSD backward starts from the forward's chunk states: asking for it with the states
    recomputed instead is an error naming both options, in KernelOptions and in the branch itself."""
    from falcon_h1.kernels import KernelOptions
    from falcon_h1.kernels.mamba_branch import mamba_conv_scan

    with pytest.raises(ValueError, match="own_ssd_backward.*ssd_keep_forward_states"):
        KernelOptions(own_ssd_backward=True, ssd_keep_forward_states=False)
    assert KernelOptions(own_ssd_forward=True, ssd_keep_forward_states=False).own_ssd_forward
    zxbcdt = torch.zeros(1, 16, 2 * 8 + 2 * 4 + 2)
    with pytest.raises(ValueError, match="own_backward=True.*keep_forward_states"):
        mamba_conv_scan(zxbcdt, torch.zeros(16, 4), None, None, -torch.ones(2), torch.ones(2), torch.zeros(2),
                        8, 4, 2, 1, 16, (0.0, float("inf")), keep_forward_states=False, own_backward=True)


def test_kernel_options_on_the_reference_path_turn_the_gpu_kernels_off():
    """On a CPU (and under model.kernel_backend = 'reference' anywhere) the GPU kernels are off
    whatever was asked; where the arithmetic happens (fold_scales, gate_in_scan) is kept."""
    from falcon_h1.kernels import KernelOptions

    asked = KernelOptions()
    for backend in ("auto", "reference"):
        got = asked.for_device(backend, torch.device("cpu"))
        assert not (got.triton_ssd or got.triton_conv or got.triton_swiglu or got.triton_rotary
                    or got.fused_mamba_branch or got.fused_rms_norm or got.fused_cross_entropy)
        assert got.fold_scales and got.gate_in_scan and got.ssd_keep_forward_states
    asked_own = KernelOptions(own_ssd_forward=True, own_ssd_backward=True, streaming_conv=True,
                              triton_out_projection_input=True, rotary_one_launch=True, triton_row_scale=True)
    got_own = asked_own.for_device("auto", torch.device("cpu"))
    assert not (got_own.own_ssd_forward or got_own.own_ssd_backward or got_own.streaming_conv
                or got_own.triton_out_projection_input or got_own.rotary_one_launch or got_own.triton_row_scale)
    assert not KernelOptions(rotary_one_launch=True, triton_rotary=False).for_device(
        "auto", torch.device("cuda")).rotary_one_launch
    assert not KernelOptions(streaming_conv=True, triton_conv=False).for_device("auto", torch.device("cuda")).streaming_conv
    cuda_reference = asked.for_device("reference", torch.device("cuda"))
    assert not (cuda_reference.triton_ssd or cuda_reference.triton_conv or cuda_reference.fused_cross_entropy)
    assert cuda_reference.fused_rms_norm  # torch's own kernel, not a Triton one: follows the device


def test_model_ssd_kernels_own_asks_for_the_own_scan_where_the_gpu_path_runs(megatron_single):
    """model.ssd_kernels = 'own' turns both own-scan switches on for a GPU build; on a CPU under
    'auto' the model takes the PyTorch reference, as for every GPU kernel; 'mamba_ssm' keeps
    what the caller asked."""
    from falcon_h1.kernels import KernelOptions
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    own = KernelOptions().with_model_choices("own", keep_conv_output=False)
    assert own.own_ssd_forward and own.own_ssd_backward and not own.mamba_keep_conv_output
    asked = KernelOptions(own_ssd_forward=True, mamba_keep_conv_output=True)
    assert asked.with_model_choices("mamba_ssm", keep_conv_output=False) == asked
    assert KernelOptions().with_model_choices("mamba_ssm", keep_conv_output=True).mamba_keep_conv_output
    with pytest.raises(ValueError, match="own_ssd_backward.*ssd_keep_forward_states"):
        KernelOptions(ssd_keep_forward_states=False).with_model_choices("own", keep_conv_output=False)
    model = build_model(get_preset("falcon_h1_micro").replace(ssd_kernels="own"), device=torch.device("cpu"),
                        initialize=False)
    assert not (model.kernel_options.own_ssd_forward or model.kernel_options.own_ssd_backward)
    kept = build_model(get_preset("falcon_h1_micro").replace(mamba_keep_conv_output=True), device=torch.device("cpu"),
                       initialize=False)
    assert kept.kernel_options.mamba_keep_conv_output


def test_packed_attention_auto_is_varlen_only_where_varlen_runs():
    """'auto' names torch's varlen flash attention for fp16/bf16 inputs on CUDA (it runs nothing
    else) and SDPA with the document mask for every other input; a named backend is kept."""
    from types import SimpleNamespace

    from falcon_h1.kernels import KernelOptions
    from falcon_h1.kernels.document_attention import packed_attention_backend

    like = lambda device, dtype: SimpleNamespace(device=torch.device(device), dtype=dtype)
    assert KernelOptions().packed_attention == "auto"
    assert packed_attention_backend("auto", like("cuda", torch.bfloat16)) == "varlen"
    assert packed_attention_backend("auto", like("cuda", torch.float16)) == "varlen"
    assert packed_attention_backend("auto", like("cuda", torch.float32)) == "sdpa"
    assert packed_attention_backend("auto", like("cpu", torch.bfloat16)) == "sdpa"
    assert packed_attention_backend("flex", like("cuda", torch.bfloat16)) == "flex"
    with pytest.raises(ValueError, match=r"packed_attention = 'ring' is not allowed: one of \('auto', 'sdpa'"):
        KernelOptions(packed_attention="ring")


def test_triton_backend_without_a_gpu_is_refused_when_the_model_is_built(megatron_single):
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    cfg = get_preset("falcon_h1_micro").replace(kernel_backend="triton")
    with pytest.raises(RuntimeError, match=r"model.kernel_backend = 'triton' needs a CUDA device; the model is built on cpu"):
        build_model(cfg, device=torch.device("cpu"), initialize=False)


# ---- packed rows: every document independent (kernels.documents) ----

PACKED_ROWS = [[11, 14, 15], [3, 24, 13]]  # uneven lengths, none a multiple of the chunks below
TOLERANCE = 1e-5                           # fp32, relative
LEAK_MARGIN = 1e-2                         # a computation leaking across documents is this far off


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _alone(rows, fn, *seq_tensors):
    """fn run on every document alone (seq_tensors sliced [row, start:end] along dim 1), the
    outputs assembled into packed rows."""
    from tests.falcon_h1.packed_rows import documents

    pieces = [[] for _ in rows]
    for row, start, end in documents(rows):
        pieces[row].append(fn(*(t[row:row + 1, start:end] for t in seq_tensors)))
    return torch.cat([torch.cat(p, dim=1) for p in pieces])


def _grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves]


def _seq_idx(rows):
    from falcon_h1.kernels.documents import documents_from_position_ids
    from tests.falcon_h1.packed_rows import position_ids

    return documents_from_position_ids(position_ids(rows)).seq_idx


def _ssd_inputs(rows, g):
    b, l, h, p, groups, n = len(rows), sum(rows[0]), 4, 3, 2, 5
    return dict(x=torch.randn(b, l, h, p, generator=g), dt_raw=torch.randn(b, l, h, generator=g) - 1,
                B=torch.randn(b, l, groups, n, generator=g), C=torch.randn(b, l, groups, n, generator=g),
                z=torch.randn(b, l, h, p, generator=g), A=-torch.rand(h, generator=g) * 2,
                D=torch.randn(h, generator=g), dt_bias=torch.rand(h, generator=g))


@pytest.mark.parametrize("rows,chunk", [(PACKED_ROWS, 8), (PACKED_ROWS, 16), ([[5, 30, 5]], 8)])
def test_packed_ssd_scan_equals_documents_alone(rows, chunk):
    """kernels.ssd_scan (reference path, gated) on packed rows with seq_idx: output and every
    gradient equal each document scanned alone. [[5, 30, 5]] at chunk 8 has a document
    spanning whole chunks (the state carried over several chunk ends inside one document)."""
    from falcon_h1.kernels import ssd_scan

    g = torch.Generator().manual_seed(chunk + len(rows))
    t = _ssd_inputs(rows, g)
    seq_idx = _seq_idx(rows)
    dy = torch.randn_like(t["x"])
    limit = (0.0, float("inf"))

    def scan(x, dt_raw, B, C, z, A, D, dt_bias, seq_idx=None):
        return ssd_scan(x, dt_raw, A, B, C, chunk, D, dt_bias, limit, False, z=z, seq_idx=seq_idx)

    seq_names, params = ["x", "dt_raw", "B", "C", "z"], ["A", "D", "dt_bias"]
    leaves = [t[k] for k in seq_names + params]
    got = _grads(lambda *a: scan(*a, seq_idx=seq_idx), leaves, dy)

    def alone(*a):
        seq, par = a[:5], a[5:]
        return _alone(rows, lambda *s: scan(*s, *par), *seq)

    want = _grads(alone, leaves, dy)
    leaky = _grads(scan, leaves, dy)
    for name, a, b, c in zip(["y"] + seq_names + params, got, want, leaky):
        assert _rel(a, b) <= TOLERANCE, name
        if name != "D":  # dD = sum(dy * silu(z) * x) does not involve the state
            assert _rel(c, b) >= LEAK_MARGIN, name   # the comparison sees a state leaking across documents


@pytest.mark.parametrize("chunk", [4, 8, 16])
def test_packed_chunked_ssd_equals_sequential_recurrence_with_resets(chunk):
    """The chunked reference with seq_idx against the step-by-step float64 recurrence that
    zeroes the state where the document number changes."""
    g = torch.Generator().manual_seed(chunk)
    t = _ssd_inputs(PACKED_ROWS, g)
    dt = torch.nn.functional.softplus(t["dt_raw"])
    seq_idx = _seq_idx(PACKED_ROWS)
    got = ssd_chunk_scan_reference(t["x"], dt, t["A"], t["B"], t["C"], chunk, t["D"], seq_idx=seq_idx)
    want = ssd_sequential_float64(t["x"], dt, t["A"], t["B"], t["C"], t["D"], seq_idx=seq_idx)
    assert _rel(got, want) < 1e-6


def test_packed_causal_conv_equals_documents_alone():
    """The reference conv + SiLU with seq_idx: output and gradients equal each document
    convolved alone (its window starting from zeros); the rows convolved whole are far off."""
    g = torch.Generator().manual_seed(3)
    b, l, c = len(PACKED_ROWS), sum(PACKED_ROWS[0]), 6
    x, w, bias = torch.randn(b, l, c, generator=g), torch.randn(c, 4, generator=g), torch.randn(c, generator=g)
    dy = torch.randn(b, l, c, generator=g)
    seq_idx = _seq_idx(PACKED_ROWS)
    got = _grads(lambda x, w, bias: causal_conv1d_silu_reference(x, w, bias, seq_idx=seq_idx), [x, w, bias], dy)
    want = _grads(lambda x, w, bias: _alone(PACKED_ROWS, lambda s: causal_conv1d_silu_reference(s, w, bias), x),
                  [x, w, bias], dy)
    leaky = _grads(causal_conv1d_silu_reference, [x, w, bias], dy)
    for name, a, b_, c_ in zip(["out", "dx", "dweight", "dbias"], got, want, leaky):
        assert _rel(a, b_) <= TOLERANCE, name
        if name != "dbias":  # dbias sums g over positions: a leak moves it less
            assert _rel(c_, b_) >= LEAK_MARGIN, name


@pytest.mark.parametrize("backend", ["sdpa", "unfused", "flex"])
def test_packed_attention_equals_documents_alone(backend):
    """causal_attention with documents: each query attends only its own document's past,
    i.e. equals plain causal attention on every document alone (fp32, with GQA); gradients
    too, except FlexAttention (torch has no FlexAttention backward on CPU)."""
    from falcon_h1.kernels.documents import documents_from_position_ids
    from tests.falcon_h1.packed_rows import position_ids

    g = torch.Generator().manual_seed(4)
    b, l = len(PACKED_ROWS), sum(PACKED_ROWS[0])
    q, k, v = torch.randn(b, 4, l, 8, generator=g), torch.randn(b, 2, l, 8, generator=g), torch.randn(b, 2, l, 8, generator=g)
    dy = torch.randn(b, 4, l, 8, generator=g)
    docs = documents_from_position_ids(position_ids(PACKED_ROWS))
    heads_last = lambda t: t.transpose(1, 2)   # documents are sliced along dim 1
    packed = lambda q, k, v: causal_attention(q, k, v, 0.3, backend, documents=docs)

    def alone(q, k, v):
        one = lambda q, k, v: heads_last(causal_attention(heads_last(q), heads_last(k), heads_last(v), 0.3, "sdpa"))
        return heads_last(_alone(PACKED_ROWS, one, heads_last(q), heads_last(k), heads_last(v)))

    if backend == "flex":
        with torch.no_grad():
            assert _rel(packed(q, k, v), alone(q, k, v)) <= TOLERANCE
        return
    got, want = _grads(packed, [q, k, v], dy), _grads(alone, [q, k, v], dy)
    leaky = _grads(lambda q, k, v: causal_attention(q, k, v, 0.3, backend), [q, k, v], dy)
    for name, a, b_, c_ in zip(["out", "dq", "dk", "dv"], got, want, leaky):
        assert _rel(a, b_) <= TOLERANCE, name
        assert _rel(c_, b_) >= LEAK_MARGIN, name


def test_a_layer_asked_for_the_own_scan_outside_the_fused_branch_refuses(megatron_single):
    """The own SSD kernels run only inside the fused Mamba branch: options that ask for them where
    a layer takes the unfused scan (here the branch switched off) are refused when it is built,
    never silently dropped."""
    from falcon_h1.kernels import KernelOptions
    from falcon_h1.linears import MEGATRON_LINEARS
    from falcon_h1.model import FalconH1Model, make_transformer_config
    from falcon_h1.presets import get_preset

    cfg = get_preset("falcon_h1_micro")
    config = make_transformer_config(cfg, 1, 1, False, torch.float32, False, "none")
    with pytest.raises(ValueError, match="own SSD kernels .* run inside the fused Mamba branch"):
        FalconH1Model(cfg, config, MEGATRON_LINEARS, KernelOptions(own_ssd_forward=True, fused_mamba_branch=False))
