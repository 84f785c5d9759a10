"""kernels.mamba_branch.split_in_projection: the fused in-projection's columns handed to the
attention and Mamba branches, and its gradient built without concatenating theirs when the Mamba
branch (and the attention's RoPE) write into the shared buffer (checked against autograd's own split, in float64, on CPU; the
real fused branch in Triton's interpreter: mamba_branch_interpret_worker.py, check_shared)."""

import pytest
import torch

from falcon_h1.kernels.mamba_branch import split_in_projection

S, B, FIRST, MAMBA = 7, 3, 5, 11


class _WritesIntoSharedGradient(torch.autograd.Function):
    """Stands in for a branch that writes its input gradient into the InProjectionGradient's buffer:
    y = factor * x, with `columns` the buffer's columns it takes (the Mamba branch's, as [b, s, .]
    like the fused branch; the attention's, as the RoPE kernel in kernels.rotary_triton)."""

    @staticmethod
    def forward(ctx, x, gradient, columns, factor):
        ctx.gradient, ctx.columns, ctx.factor = gradient, columns, factor
        return x * factor

    @staticmethod
    def backward(ctx, dy):
        if ctx.columns == "mamba":
            dx = ctx.gradient.mamba_columns().transpose(0, 1)
        else:
            dx = ctx.gradient.attention_columns()
        torch.mul(dy, ctx.factor, out=dx)
        return dx, None, None, None


def _mamba_writes(columns_bs, gradient):
    """The fused Mamba branch's stand-in: y = 2 * x on the [b, s, .] view of the Mamba columns."""
    return _WritesIntoSharedGradient.apply(columns_bs, gradient, "mamba", 2)


def _attention_writes(first, gradient):
    """The attention RoPE kernel's stand-in: y = 3 * x on the attention columns."""
    return _WritesIntoSharedGradient.apply(first, gradient, "attention", 3)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(S, B, FIRST + MAMBA, generator=g, dtype=torch.float64)
    d_first = torch.randn(S, B, FIRST, generator=g, dtype=torch.float64)
    dy = torch.randn(B, S, MAMBA, generator=g, dtype=torch.float64)
    return proj, d_first, dy


def _autograd_split(proj, d_first, dy):
    """The same function through autograd's own split (which concatenates the gradients)."""
    leaf = proj.clone().requires_grad_()
    first, columns = leaf.split([FIRST, MAMBA], dim=-1)
    outputs, grads = [columns.transpose(0, 1) * 2], [dy]
    if d_first is not None:
        outputs, grads = outputs + [first], grads + [d_first]
    torch.autograd.backward(outputs, grads)
    return leaf.grad


def _shared(proj, d_first, dy, writes_into_buffer=True):
    leaf = proj.clone().requires_grad_()
    first, columns, gradient = split_in_projection(leaf, FIRST)
    y = (_mamba_writes(columns.transpose(0, 1), gradient) if writes_into_buffer
         else columns.transpose(0, 1) * 2)
    outputs, grads = [y], [dy]
    if d_first is not None:
        outputs, grads = outputs + [first], grads + [d_first]
    torch.autograd.backward(outputs, grads)
    return leaf.grad


def test_the_views_are_the_projection_columns():
    proj, _, _ = _inputs()
    first, columns, _ = split_in_projection(proj, FIRST)
    assert torch.equal(first, proj[..., :FIRST]) and torch.equal(columns, proj[..., FIRST:])
    assert first.data_ptr() == proj.data_ptr()  # views, no copy


@pytest.mark.parametrize("attention_used", [True, False])
def test_gradient_through_the_shared_buffer_equals_autograd_split_without_a_concatenation(attention_used,
                                                                                          monkeypatch):
    proj, d_first, dy = _inputs()
    d_first = d_first if attention_used else None
    want = _autograd_split(proj, d_first, dy)

    def no_cat(*args, **kwargs):
        raise AssertionError("the shared buffer path must not concatenate the branches' gradients")

    monkeypatch.setattr(torch, "cat", no_cat)
    got = _shared(proj, d_first, dy)
    monkeypatch.undo()
    assert torch.equal(got, want)
    if not attention_used:
        assert torch.count_nonzero(got[..., :FIRST]) == 0


def test_a_mamba_gradient_from_elsewhere_is_concatenated():
    """A consumer that does not write into the buffer (e.g. an unfused branch) still gets the
    right gradient: the split falls back to concatenating."""
    proj, d_first, dy = _inputs(1)
    assert torch.equal(_shared(proj, d_first, dy, writes_into_buffer=False), _autograd_split(proj, d_first, dy))


@pytest.mark.parametrize("attention_first", [True, False])
def test_both_branches_writing_into_the_buffer_leave_the_split_nothing_to_copy(attention_first, monkeypatch):
    """The attention side writes its columns too: the split's backward neither concatenates nor
    copies, whichever branch's backward runs first (and so allocates the buffer)."""
    proj, d_first, dy = _inputs(2)
    leaf = proj.clone().requires_grad_()
    first, columns, gradient = split_in_projection(leaf, FIRST)
    # autograd runs the backward of the node created last first
    mamba = lambda: _mamba_writes(columns.transpose(0, 1), gradient)
    attention = lambda: _attention_writes(first, gradient)
    if attention_first:
        y, o = mamba(), attention()
    else:
        o, y = attention(), mamba()
    outputs, grads = [y, o], [dy, d_first]

    def refused(*args, **kwargs):
        raise AssertionError("both parts are in the buffer: the split must not concatenate or copy")

    monkeypatch.setattr(torch, "cat", refused)
    monkeypatch.setattr(torch.Tensor, "copy_", refused)
    torch.autograd.backward(outputs, grads)
    monkeypatch.undo()
    want = _autograd_split(proj, None, dy)
    want[..., :FIRST] = d_first * 3
    assert torch.equal(leaf.grad, want)
