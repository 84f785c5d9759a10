"""Vocab-parallel cross-entropy in Triton: loss and gradient in one forward, no fp32 copy.

Same result as Megatron's `tensor_parallel.vocab_parallel_cross_entropy` on logits whose
vocab padding is masked (the reference path in `falcon_h1.kernels.vocab_parallel_cross_entropy`),
laid out the same way: logits [..., V_local], rank r of the tensor-parallel group holding
global columns [r * V_local, (r + 1) * V_local); columns at or past `vocab_size` are the
padding and count as -inf, so no masked copy of the logits is made.

Forward, per token row, fp32 inside:
  1. max and sum of exp over the shard, streamed in BLOCK_V columns with the running sum
     rescaled to each new max, and the label's logit if this shard holds the label;
  2. only with tp > 1: all-reduce of those [tokens] vectors (MAX, then SUM of the sums
     rescaled to the global max and of the label logits);
  3. grad = softmax - onehot(label), written over the logits buffer itself.
With tp = 1, 1 and 3 are one kernel (no launch in between; the second read of a row can hit L2).
Backward: grad * grad_output, in place, one token row's scale on its row (a Triton kernel: torch's
broadcasting multiply of bf16 by fp32 takes its unvectorised path, 2.5 ms at the 0.5B shape for
2 GB of traffic). The logits are not needed after the loss (the
output layer's backward uses its input and weight), so the bf16 gradient lives in their
buffer: no [tokens, V_local] tensor beyond the logits themselves is allocated.

Labels outside [0, padded vocab) behave as in Megatron (no rank holds them): loss
log(sum exp(x - max)) and gradient softmax. This project never passes such labels
(the loss mask is applied outside), but they must not read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_h1.kernels.row_scale import scale_rows

BLOCK_V = 4096   # columns per step of the streaming loop (tests shrink it to cross blocks)
NUM_WARPS = 8


@triton.jit
def _row_stats(x_row, label_local, n_local, n_valid, BLOCK_V: tl.constexpr):
    """Max, sum of exp(x - max) over the valid columns [0, n_valid), and the label's logit:
    x[label] if this shard holds it (-inf if that column is padding), 0 if it does not."""
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, n_valid, BLOCK_V):  # each block has a valid column: m stays finite
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    held = (label_local >= 0) & (label_local < n_local)
    valid = (label_local >= 0) & (label_local < n_valid)
    target = tl.load(x_row + tl.where(valid, label_local, 0)).to(tl.float32)
    target = tl.where(valid, target, tl.where(held, float("-inf"), 0.0))
    return m, s, target


@triton.jit
def _write_row_grad(x_row, g_row, label_local, n_local, n_valid, m, inv_s, BLOCK_V: tl.constexpr):
    """g = exp(x - m) / s - onehot(label) over the whole shard (0 on the padding columns).
    g_row may be x_row: every element is read before it is written, by this program only."""
    for start in range(0, n_local, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - m) * inv_s
        p = tl.where(cols == label_local, p - 1.0, p)
        tl.store(g_row + cols, p.to(g_row.dtype.element_ty), mask=cols < n_local)


@triton.jit
def _ce_single_shard_kernel(x_ptr, g_ptr, labels_ptr, loss_ptr, n_local, n_valid, stride_x, stride_g,
                            WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """tp = 1: stats, loss and gradient of one row in one program."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    label = tl.load(labels_ptr + row)
    m, s, target = _row_stats(x_row, label, n_local, n_valid, BLOCK_V)
    held = (label >= 0) & (label < n_local)
    tl.store(loss_ptr + row, tl.log(s) + tl.where(held, m - target, 0.0))
    if WRITE_GRAD:
        _write_row_grad(x_row, g_ptr + row * stride_g, label, n_local, n_valid, m, 1.0 / s, BLOCK_V)


@triton.jit
def _ce_stats_kernel(x_ptr, labels_ptr, max_ptr, sum_ptr, target_ptr, vocab_start, n_local, n_valid,
                     stride_x, BLOCK_V: tl.constexpr):
    """tp > 1, before the all-reduce: this shard's max, sum of exp and label logit per row."""
    row = tl.program_id(0).to(tl.int64)
    label_local = tl.load(labels_ptr + row) - vocab_start
    m, s, target = _row_stats(x_ptr + row * stride_x, label_local, n_local, n_valid, BLOCK_V)
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    tl.store(target_ptr + row, target)


@triton.jit
def _ce_grad_kernel(x_ptr, g_ptr, labels_ptr, max_ptr, sum_ptr, vocab_start, n_local, n_valid,
                    stride_x, stride_g, BLOCK_V: tl.constexpr):
    """tp > 1, after the all-reduce: the gradient of this shard from the global max and sum."""
    row = tl.program_id(0).to(tl.int64)
    label_local = tl.load(labels_ptr + row) - vocab_start
    m, s = tl.load(max_ptr + row), tl.load(sum_ptr + row)
    _write_row_grad(x_ptr + row * stride_x, g_ptr + row * stride_g, label_local, n_local, n_valid, m,
                    1.0 / s, BLOCK_V)


def _combine_over_tp(m, s, target, group):
    """Global max, sum of exp and label logit from every rank's [rows] statistics."""
    global_m = m.clone()
    torch.distributed.all_reduce(global_m, op=torch.distributed.ReduceOp.MAX, group=group)
    # a shard of padding only has m = -inf, s = 0: its rescaled sum is 0 * 0
    sums = torch.stack([s * torch.exp(m - global_m), target])
    torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
    return global_m, sums[0], sums[1]


class _FusedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_size, group, write_grad):
        x = logits.reshape(-1, logits.shape[-1])  # a view of [s, b, V] (any row stride): no copy
        x = x if x.stride(-1) == 1 else x.contiguous()
        flat_labels = labels.reshape(-1).contiguous()
        if flat_labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels {tuple(labels.shape)} must match the logits' leading dims "
                             f"{tuple(logits.shape[:-1])}.")
        world = torch.distributed.get_world_size(group) if group is not None else 1
        rank = torch.distributed.get_rank(group) if group is not None else 0
        rows, n_local = x.shape
        vocab_start = rank * n_local
        n_valid = min(max(vocab_size - vocab_start, 0), n_local)
        block = min(BLOCK_V, triton.next_power_of_2(n_local))
        grid = (rows,)
        f32 = dict(device=x.device, dtype=torch.float32)
        if world == 1:
            loss = torch.empty(rows, **f32)
            _ce_single_shard_kernel[grid](x, x, flat_labels, loss, n_local, n_valid, x.stride(0), x.stride(0),
                                          WRITE_GRAD=write_grad, BLOCK_V=block, num_warps=NUM_WARPS)
        else:
            m, s, target = (torch.empty(rows, **f32) for _ in range(3))
            _ce_stats_kernel[grid](x, flat_labels, m, s, target, vocab_start, n_local, n_valid, x.stride(0),
                                   BLOCK_V=block, num_warps=NUM_WARPS)
            m, s, target = _combine_over_tp(m, s, target, group)
            held = (flat_labels >= 0) & (flat_labels < n_local * world)  # by some rank
            loss = torch.log(s) + torch.where(held, m - target, 0.0)
            if write_grad:
                _ce_grad_kernel[grid](x, x, flat_labels, m, s, vocab_start, n_local, n_valid, x.stride(0),
                                      x.stride(0), BLOCK_V=block, num_warps=NUM_WARPS)
        if write_grad:
            if x.data_ptr() == logits.data_ptr():  # x is a view: the gradient is in the logits
                # The kernel wrote through a raw pointer; bump the version so that any other
                # autograd node that saved the logits fails loudly instead of reading gradients.
                torch.autograd.graph.increment_version(logits)
                x = logits
            ctx.save_for_backward(x)
            ctx.logits_shape = logits.shape
            ctx.used = False
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:  # the buffer was scaled in place by the first backward
            raise RuntimeError("the fused cross-entropy's backward ran twice on one graph (retain_graph); "
                               "build the model with KernelOptions(fused_cross_entropy=False) for that.")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        # the logits' [tokens, V_local] rows (a view: scaled in place)
        rows = grad.view(-1, grad.shape[-1])
        scale_rows(rows, grad_loss.reshape(-1), out=rows)
        return grad.view(ctx.logits_shape), None, None, None, None


def fused_vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                       group=None) -> torch.Tensor:
    """Per-token loss (fp32, labels' shape) of vocab-parallel logits [..., V_local] (any float
    dtype, last dim contiguous or not); group: the tensor-parallel group (None: one shard).

    When the logits need a gradient, the logits' buffer is overwritten with it: use them for
    nothing else afterwards (see the module docstring).
    """
    if not 0 < vocab_size:
        raise ValueError(f"vocab_size = {vocab_size}; allowed: a positive number of real tokens.")
    if logits.is_leaf and logits.requires_grad:
        raise ValueError("logits is a leaf tensor that requires grad: the fused cross entropy would overwrite "
                         "it with its gradient; allowed: the output of an op (the output layer's logits).")
    # needs_input_grad is also set under torch.no_grad: ask grad mode here, outside the Function
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    return _FusedVocabParallelCrossEntropy.apply(logits, labels, vocab_size, group, write_grad)
