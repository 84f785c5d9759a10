"""Context parallelism in one process (all ranks emulated, falcon_h1.context_parallel): the
sharded attention, conv and SSD scan equal the whole sequence computed directly, forward and
backward. The references are a float64 masked softmax, a float64 tap-by-tap conv and the
float64 step-by-step SSM recurrence over the whole sequence."""

import math

import pytest
import torch
import torch.nn.functional as F

from falcon_h1 import kernels
from falcon_h1.context_parallel import ContextParallelLayout, context_parallel_attention, rank_chunks, shard_batch
from falcon_h1.context_parallel.mamba import (as_chunk_batch, carried_in_states, causal_conv1d_silu,
                                              from_chunk_batch)
from falcon_h1.kernels.ssd_reference import ssd_sequential_float64


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_rank_r_holds_chunks_r_and_its_mirror():
    assert [rank_chunks(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    layout = ContextParallelLayout.emulated(2)
    assert layout.local_chunks == (0, 3, 1, 2)
    assert layout.positions(8).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]


def test_shard_then_unshard_is_the_sequence():
    seq = torch.arange(24).reshape(1, 24)
    shards = [ContextParallelLayout.for_rank(3, r, None).shard(seq, dim=1) for r in range(3)]
    assert shards[0].tolist() == [[0, 1, 2, 3, 20, 21, 22, 23]]
    assert shards[2].tolist() == [[8, 9, 10, 11, 12, 13, 14, 15]]
    assert torch.equal(ContextParallelLayout.emulated(3).unshard(shards, dim=1), seq)


def test_shard_batch_cuts_every_entry_and_refuses_other_shapes():
    layout = ContextParallelLayout.for_rank(2, 1, None)
    batch = {"tokens": torch.arange(16).reshape(2, 8), "loss_mask": torch.ones(2, 8)}
    out = shard_batch(batch, layout)
    assert out["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]] and out["loss_mask"].shape == (2, 4)
    with pytest.raises(ValueError, match="seq"):
        shard_batch({"tokens": torch.zeros(2, 8), "attention_mask": torch.zeros(2, 1, 8, 8)}, layout)
    with pytest.raises(ValueError, match="2 \\* cp = 4"):
        layout.shard(torch.zeros(1, 6), dim=1)


def _float64_causal_attention(q, k, v, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    l = q.shape[2]
    mask = torch.ones(l, l, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v


@pytest.mark.parametrize("cp", [2, 3])
@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_attention_over_shards_is_causal_attention_of_the_sequence(cp, backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 12 * cp, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (4, 2, 2))
    want = _float64_causal_attention(q, k, v, 0.3)
    dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    layout = ContextParallelLayout.emulated(cp)
    local = [layout.shard(t, dim=2) for t in (q, k, v)]
    out = context_parallel_attention(*local, scale=0.3, backend=backend, layout=layout)
    tolerance = 1e-12 if backend == "sdpa" else 1e-6  # the unfused softmax runs in fp32
    assert rel(out, layout.shard(want, dim=2)) <= tolerance
    grads = torch.autograd.grad(out, (q, k, v), layout.shard(dout, dim=2))
    for got, expected in zip(grads, want_grads):
        assert rel(got, expected) <= tolerance


def _float64_conv_silu(x, weight, bias):
    """x [b, l, c]: out_t = silu(bias + sum_j weight[:, j] * x_{t - (k-1) + j}), zeros before 0."""
    k = weight.shape[-1]
    padded = F.pad(x, (0, 0, k - 1, 0))
    out = bias + sum(weight[:, j] * padded[:, j:j + x.shape[1]] for j in range(k))
    return F.silu(out)


def _mamba_inputs(seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, p, groups, n, width = 2, 4, 3, 2, 5, 4
    channels = h * p + 2 * groups * n
    leaf = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()
    return dict(xBC=leaf(seq, b, channels), dt_raw=leaf(seq, b, h), weight=leaf(channels, width, scale=0.5),
                bias=leaf(channels), A=(-torch.rand(h, generator=g, dtype=torch.float64) - 0.5).requires_grad_(),
                D=leaf(h), dt_bias=leaf(h, scale=0.5), dims=(h, p, groups, n))


def _whole_sequence_mamba(t):
    """Conv + SiLU and the SSM recurrence over the whole [s, b, .] sequence, float64."""
    h, p, groups, n = t["dims"]
    xBC = _float64_conv_silu(t["xBC"].transpose(0, 1), t["weight"], t["bias"])
    x, B, C = xBC.split([h * p, groups * n, groups * n], dim=-1)
    dt = F.softplus(t["dt_raw"].transpose(0, 1) + t["dt_bias"])
    y = ssd_sequential_float64(x.unflatten(-1, (h, -1)), dt, t["A"], B.unflatten(-1, (groups, -1)),
                               C.unflatten(-1, (groups, -1)), t["D"])
    return y.flatten(-2).transpose(0, 1)


def _sharded_mamba(t, layout, chunk_size):
    """The same through falcon_h1.context_parallel.mamba on this layout's shards (reference kernels)."""
    h, p, groups, n = t["dims"]
    heads = lambda v, m: v.unflatten(-1, (m, -1))
    xBC = as_chunk_batch(layout.shard(t["xBC"], dim=0), layout)
    dt_raw = as_chunk_batch(layout.shard(t["dt_raw"], dim=0), layout)
    xBC = causal_conv1d_silu(xBC, t["weight"], t["bias"], False, None, layout)
    x, B, C = xBC.split([h * p, groups * n, groups * n], dim=-1)
    start = carried_in_states(heads(x, h), dt_raw, t["A"], heads(B, groups), t["dt_bias"], (0.0, math.inf), layout)
    y = kernels.ssd_scan(heads(x, h), dt_raw, t["A"], heads(B, groups), heads(C, groups), chunk_size, t["D"],
                         t["dt_bias"], (0.0, math.inf), False, initial_states=start)
    return from_chunk_batch(y.flatten(-2), layout)


def test_chunk_batch_round_trip():
    layout = ContextParallelLayout.emulated(2)
    t = torch.arange(8 * 3 * 2).reshape(8, 3, 2)
    batch = as_chunk_batch(t, layout)
    assert batch.shape == (4 * 3, 2, 2) and torch.equal(batch[3 + 1], t[2:4, 1])  # chunk 1 of sample 1
    assert torch.equal(from_chunk_batch(batch, layout), t)


@pytest.mark.parametrize("cp, seq, chunk_size", [(2, 48, 5), (3, 36, 4), (4, 64, 16)])
def test_mamba_over_shards_is_the_recurrence_over_the_sequence(cp, seq, chunk_size):
    # chunk sizes that do not divide the shards' chunks: the SSD chunks straddle shard chunks
    t = _mamba_inputs(seq)
    want = _whole_sequence_mamba(t)
    layout = ContextParallelLayout.emulated(cp)
    got = _sharded_mamba(t, layout, chunk_size)
    assert rel(got, layout.shard(want, dim=0)) <= 2e-6  # the reference scan runs in fp32
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [t[k] for k in ("xBC", "dt_raw", "weight", "bias", "A", "D", "dt_bias")]
    want_grads = torch.autograd.grad(want, leaves, dout)
    grads = torch.autograd.grad(got, leaves, layout.shard(dout, dim=0))
    for name, got_grad, expected in zip(("xBC", "dt_raw", "weight", "bias", "A", "D", "dt_bias"), grads, want_grads):
        assert rel(got_grad, expected) <= 2e-6, name


def test_conv_halo_needs_chunks_at_least_as_long_as_the_halo():
    t = _mamba_inputs(8)
    layout = ContextParallelLayout.emulated(2)
    xBC = as_chunk_batch(layout.shard(t["xBC"], dim=0), layout)
    with pytest.raises(ValueError, match="mamba_d_conv - 1 = 3"):
        causal_conv1d_silu(xBC, t["weight"], t["bias"], False, None, layout)


def test_causal_attention_with_fewer_queries_aligns_them_to_the_end():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 10, 8, generator=g, dtype=torch.float64) for h in (2, 1, 1))
    want = _float64_causal_attention(q, k, v, 0.5)[:, :, 6:]
    assert rel(kernels.causal_attention(q[:, :, 6:], k, v, 0.5, "sdpa"), want) <= 1e-12
    assert rel(kernels.causal_attention(q[:, :, 6:], k, v, 0.5, "unfused"), want) <= 1e-6  # fp32 softmax
    with pytest.raises(ValueError, match="queries"):
        kernels.causal_attention(q, k[:, :, :4], v[:, :, :4], 0.5, "sdpa")


@pytest.mark.parametrize("cp, dtype, tolerance, bitnet", [(2, torch.float64, 1e-6, False), (3, torch.float64, 1e-6, False),
                                                          (2, torch.float32, 5e-6, False), (2, torch.float64, 1e-6, True)])
def test_model_on_emulated_shards_is_the_model_on_the_sequence(megatron_single, cp, dtype, tolerance, bitnet):
    """The whole model (hybrid layers, attention_ratio 0.25, 2 B/C groups; also with BitNet's
    ternary projections, whose scales are per tensor and per token) with every rank's shard in
    one process: logits, per-token loss and every gradient as without context parallelism.
    In fp32 any other summation order moves small, cancelling gradients by ~1e-6 already."""
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset
    from recipes.config import BitNetConfig

    cfg = get_preset("falcon_h1_micro").replace(vocab_size=100, attention_ratio=0.25, layer_pattern="HMAH",
                                                num_hidden_layers=4)
    g = torch.Generator().manual_seed(5)
    seq = 48 * cp  # each shard chunk 24 tokens: one and a half SSD chunks of 16
    ids, labels = (torch.randint(0, 100, (2, seq), generator=g) for _ in range(2))
    layout = ContextParallelLayout.emulated(cp)
    results = []
    for context in (None, layout):
        linears = falcon_h1_linear_spec(BitNetConfig(enabled=bitnet), "reference")
        model = build_model(cfg, linears=linears, seed=7, context_parallel=context).to(dtype)
        inputs = (ids, labels) if context is None else (layout.shard(ids, 1), layout.shard(labels, 1))
        logits = model(inputs[0])
        loss = model(inputs[0], labels=inputs[1])
        loss.sum().backward()
        if context is not None:
            logits, loss = layout.in_sequence_order(logits, 1), layout.in_sequence_order(loss, 1)
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (logits, loss, grads), (cp_logits, cp_loss, cp_grads) = results
    assert rel(cp_logits, logits) <= tolerance and rel(cp_loss, loss) <= tolerance
    assert grads.keys() == cp_grads.keys()
    for name in grads:
        assert rel(cp_grads[name], grads[name]) <= tolerance, name


def test_triton_conv_and_scan_under_context_parallelism_in_interpreter():
    """The GPU path's kernels (Triton conv with the halo, mamba_ssm's scan from the carried-in
    states) on emulated shards equal the reference over the whole sequence (float64)."""
    pytest.importorskip("einops")
    import importlib.util

    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not installed (./setup.sh installs it)")
    from pathlib import Path

    from tests.conftest import run_in_triton_interpreter

    run_in_triton_interpreter(Path(__file__).with_name("context_parallel_interpret_worker.py"), timeout=300)


def test_a_rank_layout_without_a_group_refuses_to_gather():
    with pytest.raises(ValueError, match="emulated"):
        ContextParallelLayout.for_rank(2, 0, None).gather(torch.zeros(4), dim=0)
