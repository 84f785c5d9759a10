"""Runs the fused vocab-parallel cross-entropy (kernels.cross_entropy) on CPU through Triton's
interpreter (TRITON_INTERPRET=1, set by test_cross_entropy.py before this process imports triton)
and compares loss and gradient with float64 log_softmax over the full, unpadded vocabulary.

One process: TP = 1. Under torchrun with 2 processes: TP = 2, each rank holding half of the
padded vocab (Megatron's layout), so the all-reduce of the row statistics is exercised; each
rank gathers the gradient shards and checks the whole. Prints one line per check (rank 0);
exit 1 on failure."""

import os
import sys

import torch
import torch.distributed as dist

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from falcon_h1 import kernels  # noqa: E402
from falcon_h1.megatron_compat.parallel import initialize_parallel  # noqa: E402
from falcon_h1.kernels import cross_entropy  # noqa: E402

cross_entropy.BLOCK_V = 64  # a 160- or 320-column shard streams over 3 or 5 blocks, the last one ragged
LOSS_TOLERANCE = 1e-5       # relative, per token: fp32 accumulation against float64
# relative, per element. bf16: the forward kernel's cast of the gradient and the backward kernel's
# rounding of grad * grad_output (the interpreter truncates: 2^-7 each; a GPU rounds to nearest: 2^-8)
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 * 2.0 ** -7 + 1e-5}
PADDED, SEQ, BATCH, EXTRA = 320, 2, 3, 7  # EXTRA: the logits are a row-strided view of a wider buffer


def float64_reference(full, labels, vocab_size, grad_out):
    """Loss and gradient [.., PADDED] from torch's float64 log_softmax over the real vocab;
    a label outside [0, PADDED) counts as Megatron counts it: held by no rank, so the loss
    is log(sum exp(x - max)) and the gradient the plain softmax."""
    x = full[..., :vocab_size].double()
    logp = torch.log_softmax(x, dim=-1)
    held = (labels >= 0) & (labels < PADDED)
    safe = labels.clamp(0, vocab_size - 1)
    loss = torch.where(held, -logp.gather(-1, safe[..., None])[..., 0],
                       torch.logsumexp(x - x.amax(-1, keepdim=True), dim=-1))
    grad = logp.exp() - torch.nn.functional.one_hot(safe, vocab_size) * held[..., None]
    grad = torch.nn.functional.pad(grad * grad_out[..., None].double(), (0, PADDED - vocab_size))
    return loss, grad


def gather_vocab(shard):
    world = dist.get_world_size()
    if world == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard.contiguous())
    return torch.cat(parts, dim=-1)


def run(full, labels, vocab_size, grad_out, fast, no_grad=False):
    """Loss and full-vocab gradient through kernels.vocab_parallel_cross_entropy on this rank's shard."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local = PADDED // world
    buf = torch.zeros(SEQ, BATCH, local + EXTRA, dtype=full.dtype)
    buf[..., :local] = full[..., rank * local:(rank + 1) * local]
    leaf = buf.requires_grad_()
    logits = (leaf * 1)[..., :local]  # a non-leaf activation, as the output layer's
    if no_grad:
        with torch.no_grad():
            before = logits.clone()
            loss = kernels.vocab_parallel_cross_entropy(logits, labels, vocab_size, fast)
            assert torch.equal(logits, before), "no-grad call changed the logits"
            return loss, None
    loss = kernels.vocab_parallel_cross_entropy(logits, labels, vocab_size, fast)
    loss.backward(grad_out)
    assert leaf.grad[..., local:].abs().max() == 0, "gradient outside the logits' columns"
    return loss, gather_vocab(leaf.grad[..., :local])


def check(name, vocab_size, dtype, g, fast=True, no_grad=False, label_outside=False):
    full = (torch.randn(SEQ, BATCH, PADDED, generator=g) * 3).to(dtype)
    full[..., vocab_size:] = 30.0  # padding larger than any real logit: must not count
    labels = torch.randint(0, vocab_size, (SEQ, BATCH), generator=g)
    labels[0, 0], labels[1, 2] = 0, vocab_size - 1
    if label_outside:
        labels[0, 1] = -100
    grad_out = torch.rand(SEQ, BATCH, generator=g) + 0.5
    want_loss, want_grad = float64_reference(full, labels, vocab_size, grad_out)
    loss, grad = run(full, labels, vocab_size, grad_out, fast, no_grad)
    errors = {"loss": ((loss.double() - want_loss).abs() / want_loss.abs()).max().item()}
    ok = errors["loss"] <= LOSS_TOLERANCE and loss.dtype == torch.float32 and loss.shape == labels.shape
    if grad is not None:
        errors["grad"] = ((grad.double() - want_grad).abs() / want_grad.abs().clamp_min(1e-30)).max().item()
        errors["padding_grad"] = grad[..., vocab_size:].abs().max().item()
        ok &= errors["grad"] <= (GRAD_TOLERANCE[dtype] if fast else 1e-5) and errors["padding_grad"] == 0
        ok &= grad.dtype == dtype
    if dist.get_rank() == 0:
        print(f"{'ok  ' if ok else 'FAIL'} tp={dist.get_world_size()} {name}:",
              {k: f"{v:.1e}" for k, v in errors.items()}, flush=True)
    return ok


def raises(fn, message):
    try:
        fn()
    except RuntimeError as err:
        return message in str(err)
    return False


def check_overwrite_is_guarded(g):
    """The gradient is written over the logits: a node that saved them (exp here) must fail at
    backward rather than read gradients, and so must a second backward of the same graph."""
    local = PADDED // dist.get_world_size()
    labels = torch.randint(0, 300, (SEQ, BATCH), generator=g)
    leaf = torch.randn(SEQ, BATCH, local, generator=g).requires_grad_()
    loss = kernels.vocab_parallel_cross_entropy(leaf.exp(), labels, 300, True)  # exp saves its output
    saved_by_other = raises(lambda: loss.sum().backward(), "modified by an inplace operation")
    loss = kernels.vocab_parallel_cross_entropy(leaf * 1, labels, 300, True)
    loss.sum().backward(retain_graph=True)
    twice = raises(lambda: loss.sum().backward(), "backward ran twice")
    ok = saved_by_other and twice
    if dist.get_rank() == 0:
        print(f"{'ok  ' if ok else 'FAIL'} tp={dist.get_world_size()} overwritten logits guarded:",
              {"saved_by_another_node": saved_by_other, "second_backward": twice}, flush=True)
    return ok


def main():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialize_parallel(tp=world)
    g = torch.Generator().manual_seed(0)
    results = [
        check("fp32 vocab 300", 300, torch.float32, g),
        check("bf16 vocab 300", 300, torch.bfloat16, g),
        # vocab 100 of 320: at TP = 2 rank 1 holds padding only (m = -inf, sum 0)
        check("bf16 vocab 100", 100, torch.bfloat16, g),
        check("bf16 no grad", 300, torch.bfloat16, g, no_grad=True),
        check("fp32 label -100 (Megatron's semantics)", 300, torch.float32, g, label_outside=True),
        check("reference path (mask + Megatron) fp32", 300, torch.float32, g, fast=False),
        check_overwrite_is_guarded(g),
    ]
    passed = torch.tensor([all(results)], dtype=torch.int32)
    dist.all_reduce(passed, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    sys.exit(0 if passed.item() else 1)


if __name__ == "__main__":
    main()
