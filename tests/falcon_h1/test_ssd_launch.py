"""The own SSD kernels' layout policy (kernels.ssd_launch): an output buffer written in place
without a last stride of 1 is refused, naming the function, the buffer and its strides, before
any kernel runs; inputs are copied (the forward's interpreter worker runs a strided x)."""

import pytest
import torch

from falcon_h1.kernels.ssd_bwd_states import gated_output_backward_and_local_dstates
from falcon_h1.kernels.ssd_launch import last_dim_contiguous


def test_an_output_without_a_contiguous_last_dimension_is_refused_before_any_launch():
    b, l, h, p, g, n, q = 1, 32, 2, 16, 1, 16, 16
    dout, z, out_x = (torch.randn(b, l, h, p) for _ in range(3))
    C = torch.randn(b, l, g, n)
    cs = -torch.rand(b, h, l // q, q).cumsum(-1)
    dz = torch.empty(b, l, h, 2 * p)[..., ::2]
    with pytest.raises(ValueError, match=r"gated_output_backward_and_local_dstates: dz is written in place and "
                                         r"needs a last-dimension stride of 1 \(got strides \(2048, 64, 32, 2\)\)"):
        gated_output_backward_and_local_dstates(dout, z, out_x, C, cs, q, dz=dz)


def test_an_input_is_copied_only_where_its_last_stride_is_not_one():
    t = torch.randn(3, 8)
    assert last_dim_contiguous(t) is t
    strided = t[:, ::2]
    copy = last_dim_contiguous(strided)
    assert copy.stride(-1) == 1 and torch.equal(copy, strided)
    assert last_dim_contiguous(None) is None
