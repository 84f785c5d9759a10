"""The GPU fast path under context parallelism, every rank emulated on one GPU
(ContextParallelLayout.emulated: the layers run exactly the code of a context-parallel run, the
all-gather being the identity): the causal attention of chunks against their key prefix (SDPA
flash with the lower-right causal mask), mamba_ssm's scan from carried-in states, and the whole
model (bf16, Triton kernels; also with Megatron's full recomputation) against the reference path
in fp32 without context parallelism.
Skipped without CUDA; the CPU tests (test_context_parallel*.py) check the same code on CPU."""

import pytest
import torch

from falcon_h1.context_parallel import ContextParallelLayout
from falcon_h1.kernels import use_fast_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TOLERANCE = 1e-2  # relative L2 error; bf16 operands land at a few 1e-3


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _needs_triton():
    if not use_fast_path("auto", torch.device("cuda")):
        pytest.skip("mamba_ssm Triton kernels not installed")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_chunk_against_its_key_prefix_sdpa_matches_float64(head_dim):
    """What a context-parallel chunk computes: lq queries at the end of lk keys (GQA, bf16)."""
    from falcon_h1.kernels import causal_attention

    g = torch.Generator(device="cuda").manual_seed(head_dim)
    lq, lk = 512, 2048
    q = torch.randn(2, 8, lq, head_dim, device="cuda", generator=g)
    k, v = (torch.randn(2, 2, lk, head_dim, device="cuda", generator=g) for _ in range(2))
    dout = torch.randn(2, 8, lq, head_dim, device="cuda", generator=g)
    grads = {}
    for name, dtype, backend in (("float64", torch.float64, "unfused"), ("bf16", torch.bfloat16, "sdpa")):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = causal_attention(*leaves, scale=head_dim ** -0.5, backend=backend)
        out.backward(dout.to(dtype))
        grads[name] = [out] + [t.grad for t in leaves]
    errors = {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), grads["bf16"], grads["float64"])}
    assert max(errors.values()) <= BF16_TOLERANCE, errors


def test_triton_scan_from_initial_states_matches_reference():
    from falcon_h1.kernels import ssd_scan

    _needs_triton()
    g = torch.Generator(device="cuda").manual_seed(1)
    b, l, h, p, groups, n = 2, 700, 8, 64, 2, 64
    x = torch.randn(b, l, h, p, device="cuda", generator=g)
    dt = torch.randn(b, l, h, device="cuda", generator=g) - 1
    A = -torch.rand(h, device="cuda", generator=g) * 4 - 0.5
    B, C = (torch.randn(b, l, groups, n, device="cuda", generator=g) for _ in range(2))
    z = torch.randn(b, l, h, p, device="cuda", generator=g)
    D, dt_bias = torch.randn(h, device="cuda", generator=g), torch.rand(h, device="cuda", generator=g)
    start = torch.randn(b, h, p, n, device="cuda", generator=g)
    grad = torch.randn(b, l, h, p, device="cuda", generator=g)
    outputs = {}
    for fast, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        inputs = [t.detach().to(dtype).clone().requires_grad_() for t in (x, dt, B, C, z)]
        extra = [t.clone().requires_grad_() for t in (A, D, dt_bias, start)]
        y = ssd_scan(inputs[0], inputs[1], extra[0], inputs[2], inputs[3], 128, extra[1], extra[2],
                     (0.0, float("inf")), fast, z=inputs[4], initial_states=extra[3])
        y.backward(grad.to(dtype))
        outputs[fast] = [y] + [t.grad for t in inputs + extra]
    names = ["y", "dx", "ddt", "dB", "dC", "dz", "dA", "dD", "ddt_bias", "d_initial_states"]
    errors = {n: rel(got, ref) for n, ref, got in zip(names, outputs[False], outputs[True])}
    assert max(errors.values()) <= BF16_TOLERANCE, errors


@pytest.mark.parametrize("cp", [2, 4])
def test_model_fast_path_on_emulated_shards_matches_reference(megatron_single, cp):
    """The model (bf16, Triton conv, mamba_ssm scan, SDPA flash) on every rank's shard against the
    fp32 reference path on the whole sequence. Bounds as in test_gpu_paths: nearly cancelling
    gradients carry bf16 noise on any path, so each gradient's bound is the larger of 3 x the bf16
    tolerance and twice the error of the reference path in bf16 (without context parallelism)."""
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset
    from falcon_h1.weights import gather_hf_state

    _needs_triton()
    cfg = get_preset("falcon_h1_tiny").replace(
        max_position_embeddings=4096, mamba_chunk_size=64, mamba_n_groups=2, attention_ratio=0.25,
        key_multiplier=0.6, ssm_out_multiplier=0.9, ssm_multipliers=[0.5, 0.6, 0.7, 0.8, 0.9])
    seq = 1000  # shard chunks of 250 (cp 2) or 125 (cp 4): SSD chunks of 64 straddle them
    g = torch.Generator(device="cuda").manual_seed(cp)
    ids, labels = (torch.randint(0, cfg.vocab_size, (2, seq), device="cuda", generator=g) for _ in range(2))
    layout = ContextParallelLayout.emulated(cp)
    results = {}
    runs = (("reference", "fp32", None, "none"), ("reference", "bf16", None, "none"), ("auto", "bf16", None, "none"),
            ("auto", "bf16", layout, "none"), ("auto", "bf16", layout, "full"))  # full: Megatron's recompute
    for backend, precision, context, recompute in runs:
        model = build_model(cfg.replace(kernel_backend=backend), precision=precision, seed=3, recompute=recompute,
                            context_parallel=context)
        tokens, targets = (ids, labels) if context is None else (layout.shard(ids, 1), layout.shard(labels, 1))
        logits = model(tokens)
        loss = model(tokens, labels=targets)
        loss.float().mean().backward()
        if context is not None:
            logits, loss = layout.in_sequence_order(logits, 1), layout.in_sequence_order(loss, 1)
        results[backend, precision, context is not None, recompute] = (
            logits.float(), loss.float(), dict(gather_hf_state(model, grads=True)))
    ref_logits, ref_loss, ref_grads = results["reference", "fp32", False, "none"]
    bf16_ref_grads = results["reference", "bf16", False, "none"][2]
    fast_logits, fast_loss, _ = results["auto", "bf16", False, "none"]
    for recompute in ("none", "full"):
        logits, loss, grads = results["auto", "bf16", True, recompute]
        assert rel(logits, ref_logits) <= BF16_TOLERANCE and rel(loss, ref_loss) <= BF16_TOLERANCE
        # two bf16 paths each within the tolerance of the fp32 reference differ by up to twice it
        assert rel(logits, fast_logits) <= 2 * BF16_TOLERANCE and rel(loss, fast_loss) <= 2 * BF16_TOLERANCE
        for name, ref in ref_grads.items():
            bound = max(3 * BF16_TOLERANCE, 2 * rel(bf16_ref_grads[name], ref))
            assert rel(grads[name], ref) <= bound, (recompute, name, rel(grads[name], ref), bound)
