"""GPU fast path (mamba_ssm Triton SSD + SDPA flash attention, bf16) vs the pure
PyTorch reference path (fp32), forward and backward. Runs on a CUDA machine with
mamba_ssm installed (`./setup.sh --gpu`); skipped elsewhere."""

import pytest
import torch

from falcon_h1.kernels import use_fast_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TOLERANCE = 1e-2  # relative L2 error; bf16 operands land at a few 1e-3


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


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


def test_model_fast_path_matches_reference_forward_and_backward(megatron_single):
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset
    from falcon_h1.weights import gather_hf_state

    cfg = get_preset("falcon_h1_tiny").replace(max_position_embeddings=4096, mamba_chunk_size=64)
    ids = torch.randint(0, cfg.vocab_size, (2, 500), device="cuda")
    labels = torch.randint(0, cfg.vocab_size, (2, 500), device="cuda")
    results = {}
    for backend, precision in (("reference", "fp32"), ("auto", "bf16")):
        model = build_model(cfg.replace(kernel_backend=backend), precision=precision, seed=3)
        logits = model(ids)
        loss = model(ids, labels=labels).float().mean()
        loss.backward()
        results[backend] = (logits.float(), loss, dict(gather_hf_state(model, grads=True)))
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results["reference"], results["auto"]
    assert rel(logits, ref_logits) <= BF16_TOLERANCE
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= BF16_TOLERANCE
    for name, ref in ref_grads.items():
        assert rel(grads[name], ref) <= 3 * BF16_TOLERANCE, name
