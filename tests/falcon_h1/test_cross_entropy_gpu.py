"""The compiled fused cross-entropy (kernels.cross_entropy) on a GPU: against float64 at the
presets' vocab sizes, past 2^31 logits (int64 row offsets), inside a CUDA graph, and in the
tiny model with the option on vs off. Skipped without CUDA; the CPU interpreter tests
(test_cross_entropy.py) cover TP = 2 and the edge cases."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LOSS_TOLERANCE = 1e-5  # relative, per token: fp32 accumulation against float64 on the same values
# relative, per element: fp32 math, or bf16's round-to-nearest of the gradient in the forward
# and of grad * grad_output in the backward (2^-8 each)
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 * 2.0 ** -8 + 1e-5}
BF16_TOLERANCE = 1e-2  # relative L2, as in test_gpu_paths.py


def float64_reference(logits, labels, vocab_size, grad_out):
    x = logits[..., :vocab_size].double()
    logp = torch.log_softmax(x, dim=-1)
    loss = -logp.gather(-1, labels[..., None])[..., 0]
    grad = (logp.exp() - torch.nn.functional.one_hot(labels, vocab_size)) * grad_out[..., None].double()
    return loss, torch.nn.functional.pad(grad, (0, logits.shape[-1] - vocab_size))


def max_rel(got, want):
    assert torch.isfinite(got).all()
    return ((got.double() - want).abs() / want.abs().clamp_min(1e-30)).max().item()


def _poison_allocator(numel: int = 1 << 26):
    """NaN in freed memory, so an element the kernel forgets to write shows up."""
    torch.full((numel,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def fused_loss_and_grad(logits, labels, vocab_size, grad_out):
    from falcon_h1.kernels.cross_entropy import fused_vocab_parallel_cross_entropy

    leaf = logits.clone().requires_grad_()
    _poison_allocator()
    loss = fused_vocab_parallel_cross_entropy(leaf * 1, labels, vocab_size)
    loss.backward(grad_out)
    return loss, leaf.grad


@pytest.mark.parametrize("rows,vocab_size,padded,dtype", [
    (2048, 32784, 33280, torch.bfloat16),    # 0.5B: padded to the 512-unit
    (2048, 32784, 33280, torch.float32),
    (512, 130048, 130048, torch.bfloat16),   # 7B: no padding
    (4, 1000, 1024, torch.bfloat16),         # one block shorter than BLOCK_V
])
def test_fused_cross_entropy_matches_float64(rows, vocab_size, padded, dtype, megatron_single):
    from falcon_h1.kernels import vocab_parallel_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(rows)
    logits = (torch.randn(rows // 4, 4, padded, device="cuda", generator=g) * 4).to(dtype)
    logits[..., vocab_size:] = 50.0  # padding above every real logit: must not count
    labels = torch.randint(0, vocab_size, (rows // 4, 4), device="cuda", generator=g)
    labels.view(-1)[:2] = torch.tensor([0, vocab_size - 1])
    grad_out = torch.rand(rows // 4, 4, device="cuda", generator=g) + 0.5
    want_loss, want_grad = float64_reference(logits, labels, vocab_size, grad_out)
    loss, grad = fused_loss_and_grad(logits, labels, vocab_size, grad_out)
    assert max_rel(loss, want_loss) <= LOSS_TOLERANCE
    assert max_rel(grad, want_grad) <= GRAD_TOLERANCE[dtype]
    assert torch.all(grad[..., vocab_size:] == 0)
    megatron_loss = vocab_parallel_cross_entropy(logits, labels, vocab_size, fast=False)  # masked fp32 copy
    assert max_rel(loss, megatron_loss.double()) <= 2 * LOSS_TOLERANCE


def test_fused_cross_entropy_past_int32_offsets():
    """16400 rows x 131072 columns > 2^31 elements: the last rows' offsets overflow int32."""
    from falcon_h1.kernels.cross_entropy import fused_vocab_parallel_cross_entropy

    rows, padded, vocab_size = 16400, 131072, 130000
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(rows, padded, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab_size, (rows,), device="cuda", generator=g)
    tail = logits.detach()[-4:].clone()
    loss = fused_vocab_parallel_cross_entropy(logits * 1, labels, vocab_size)
    loss.sum().backward()
    want_loss, want_grad = float64_reference(tail, labels[-4:], vocab_size, torch.ones(4, device="cuda"))
    assert max_rel(loss[-4:], want_loss) <= LOSS_TOLERANCE
    assert max_rel(logits.grad[-4:], want_grad) <= GRAD_TOLERANCE[torch.bfloat16]


def test_fused_cross_entropy_in_cuda_graph():
    """Forward + backward captured once and replayed on new logits (no host sync inside)."""
    from falcon_h1.kernels.cross_entropy import fused_vocab_parallel_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(1)
    shape, vocab_size = (256, 2, 33280), 32784
    leaf = torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab_size, shape[:2], device="cuda", generator=g)

    def step():
        return fused_vocab_parallel_cross_entropy(leaf * 1, labels, vocab_size)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernels before the capture
        step().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
        static_loss.mean().backward()
    new = torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        leaf.copy_(new)
    graph.replay()
    want_loss, want_grad = float64_reference(new, labels, vocab_size,
                                             torch.full(shape[:2], 1 / labels.numel(), device="cuda"))
    assert max_rel(static_loss, want_loss) <= LOSS_TOLERANCE
    assert max_rel(leaf.grad, want_grad) <= GRAD_TOLERANCE[torch.bfloat16]


def test_model_loss_and_gradients_with_fused_cross_entropy_on_and_off(megatron_single):
    """The tiny model in bf16 on the fast path (vocab 320 padded to 512, so the padding is
    live), KernelOptions.fused_cross_entropy on vs off (Megatron's masked fp32 path): the same
    per-token loss, and gradients no further from the fp32 reference model than the bf16 model
    with Megatron's loss is (nearly cancelling gradients carry a few % of bf16 noise on any
    path: see test_gpu_paths.py)."""
    from falcon_h1.kernels import KernelOptions, use_fast_path
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset
    from falcon_h1.weights import gather_hf_state

    if not use_fast_path("auto", torch.device("cuda")):
        pytest.skip("mamba_ssm Triton kernels not installed: the model takes the reference path")
    cfg = get_preset("falcon_h1_tiny").replace(max_position_embeddings=4096, mamba_chunk_size=64)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 500), device="cuda", generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 500), device="cuda", generator=g)
    labels[0, :2] = torch.tensor([0, cfg.vocab_size - 1])
    results = {}
    for backend, precision, fused in (("reference", "fp32", False), ("auto", "bf16", False),
                                      ("auto", "bf16", True)):
        model = build_model(cfg.replace(kernel_backend=backend), precision=precision, seed=3,
                            kernel_options=KernelOptions(fused_cross_entropy=fused))
        assert model.vocab_padded > cfg.vocab_size
        per_token = model(ids, labels=labels)
        per_token.float().mean().backward()
        results[backend, fused] = (per_token.detach(), dict(gather_hf_state(model, grads=True)))
    fp32_grads = results["reference", False][1]
    (megatron_loss, megatron_grads), (loss, grads) = results["auto", False], results["auto", True]
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    assert max_rel(loss, megatron_loss.double()) <= 1e-3  # the same bf16 logits
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    for name, ref in fp32_grads.items():
        bound = max(BF16_TOLERANCE, 2 * rel(megatron_grads[name], ref))
        assert rel(grads[name], ref) <= bound, (name, rel(grads[name], ref), bound)
