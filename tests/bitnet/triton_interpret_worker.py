"""Runs the BitNet Triton kernels (segmented layouts of fused linears, and plain tensors, which
are one segment) on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by test_triton_interpret.py before this process imports
triton) and compares them bit for bit with the PyTorch reference. Prints one line per check;
exit 1 on failure.

The interpreter has no libdevice; `div_rn` (IEEE round-to-nearest division) is replaced by the
interpreter's `/`, a numpy division, which is IEEE round-to-nearest too. The autotuned int8 GEMM
is launched through its undecorated kernel with fixed block sizes (autotuning needs a GPU).
"""

import os
import sys
import types

import torch
import triton

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from bitnet import reference as ref  # noqa: E402
from bitnet import triton_kernels as tk  # noqa: E402
from bitnet.segments import SegmentLayout  # noqa: E402

tk.libdevice = types.SimpleNamespace(div_rn=lambda a, b: a / b)
failures = []


def check(name, ok):
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not ok:
        failures.append(name)


def weight_checks(g):
    # Segments straddle the quantise (2048) and sum (4096) blocks; one full-precision segment.
    w = torch.randn(300, 50, generator=g) * 0.02
    w[:7] *= 10  # segments of other magnitudes: a shared mean would misquantise them
    layouts = {
        "rows": SegmentLayout([("a", 7), ("b", 200, False), ("c", 93)], 0),
        "rows_one": SegmentLayout([("all", 300)], 0),
        "cols_one": SegmentLayout([("all", 50)], 1),  # a plain row linear's layout
        "cols": SegmentLayout([("y", 13), ("o", 37)], 1),
        "cols_fp": SegmentLayout([("y", 13, False), ("o", 37)], 1),
    }
    for dtype in (torch.float32, torch.float16):
        wd = w.to(dtype)
        for name, layout in layouts.items():
            tag = f"{name} {dtype}"
            s_t, s_r = tk.weight_stats(wd, layout), ref.weight_stats(wd, layout)
            check(f"weight stats {tag}", torch.equal(s_t[:, 1], s_r[:, 1])
                  and torch.allclose(s_t[:, 0], s_r[:, 0], rtol=1e-12, atol=0))
            for stats in (s_r, s_r * torch.tensor([3.0, 2.0], dtype=torch.float64)):  # given (TP) stats
                q_t, m_t = tk.quantize_weights(wd, stats, layout)
                q_r, m_r = ref.quantize_weights(wd, stats, layout)
                check(f"quantize weights {tag}", torch.equal(q_t, q_r) and torch.equal(m_t, m_r))
                check(f"fake-quantize weights {tag}", torch.equal(
                    tk.fake_quantize_weights(wd, stats, layout),
                    ref.fake_quantize_weights(wd, stats, layout)))
            if layout.dim == 0 or name == "cols_fp":
                # µP row multipliers in the same pass: bit for bit the separate multiply of the two
                # rounded tensors (full-precision rows scaled too); a kernel that drops it fails here
                rows = (torch.rand(wd.shape[0], generator=g) * 3 + 0.1).to(torch.float32)
                fused = tk.fake_quantize_weights(wd, s_r, layout, row_scale=rows)
                check(f"fake-quantize weights with row scale {tag}",
                      torch.equal(fused, ref.fake_quantize_weights(wd, s_r, layout, row_scale=rows))
                      and torch.equal(fused, ref.fake_quantize_weights(wd, s_r, layout) * rows.to(dtype)[:, None])
                      and not torch.equal(fused, ref.fake_quantize_weights(wd, s_r, layout)))
            # One segment = the whole tensor without a layout.
            if name in ("rows_one", "cols_one"):
                check(f"one segment = unsegmented {tag}", torch.equal(
                    tk.fake_quantize_weights(wd, layout=layout), ref.fake_quantize_weights(wd)))
        # Without a layout (one segment, 0-d scale).
        s_t, s_r = tk.weight_stats(wd), ref.weight_stats(wd)
        check(f"unsegmented weight stats {dtype}", torch.equal(s_t[1], s_r[1])
              and torch.allclose(s_t[0], s_r[0], rtol=1e-12, atol=0))
        for stats in (None, s_r * torch.tensor([3.0, 2.0], dtype=torch.float64)):
            q_t, m_t = tk.quantize_weights(wd, stats)
            q_r, m_r = ref.quantize_weights(wd, stats)
            check(f"unsegmented quantize weights {dtype} stats={stats is not None}",
                  torch.equal(q_t, q_r) and torch.equal(m_t, m_r))
            check(f"unsegmented fake-quantize weights {dtype} stats={stats is not None}",
                  torch.equal(tk.fake_quantize_weights(wd, stats), ref.fake_quantize_weights(wd, stats)))
        rows = (torch.rand(wd.shape[0], generator=g) * 3 + 0.1).to(torch.float32)
        check(f"unsegmented fake-quantize weights with row scale {dtype}", torch.equal(
            tk.fake_quantize_weights(wd, row_scale=rows), ref.fake_quantize_weights(wd) * rows.to(dtype)[:, None]))


def activation_checks(g):
    for read_once in (False, True):  # tk.READ_ROW_ONCE: a segment read once, or walked twice
        tk.READ_ROW_ONCE = read_once
        print(f"activation quantisers, READ_ROW_ONCE = {read_once}")
        _activation_checks(g)


def _activation_checks(g):
    x = torch.randn(3, 5, 70, generator=g)
    x[..., :20] *= 0.01
    layouts = {"two": SegmentLayout([("y", 20), ("o", 50)], 1),
               "fp": SegmentLayout([("y", 20), ("z", 11, False), ("o", 39)], 1)}
    for dtype in (torch.float32, torch.float16):
        xd = x.to(dtype)
        for name, layout in layouts.items():
            tag = f"{name} {dtype}"
            check(f"segment absmax {tag}", torch.equal(
                tk.activation_absmax(xd, layout), ref.activation_absmax(xd, layout)))
            absmax_tp = ref.activation_absmax(xd, layout) * 2  # the TP all-reduce's max
            for absmax in (None, absmax_tp):
                q_t, s_t = tk.quantize_activations(xd, absmax, layout)
                q_r, s_r = ref.quantize_activations(xd, absmax, layout)
                check(f"quantize activations {tag} absmax={absmax is not None}",
                      torch.equal(q_t, q_r) and torch.equal(s_t, s_r))
                check(f"fake-quantize activations {tag} absmax={absmax is not None}", torch.equal(
                    tk.fake_quantize_activations(xd, absmax, layout),
                    ref.fake_quantize_activations(xd, absmax, layout)))
                both_t = tk.quantize_and_dequantize_activations(xd, absmax, layout)
                both_r = ref.quantize_and_dequantize_activations(xd, absmax, layout)
                check(f"quantize and dequantize activations {tag} absmax={absmax is not None}",
                      all(torch.equal(a, b) for a, b in zip(both_t, both_r, strict=True)))
                q_r, s_r, _ = both_r
                check(f"dequantize activations {tag} absmax={absmax is not None}", torch.equal(
                    tk.dequantize_activations(q_r, s_r, dtype, layout), ref.dequantize_activations(q_r, s_r, dtype, layout)))
    # Without a layout (one segment, scales shaped x.shape[:-1]).
    check("unsegmented quantize activations", all(
        torch.equal(a, b) for a, b in zip(tk.quantize_activations(x), ref.quantize_activations(x))))
    for dtype in (torch.float32, torch.float16):
        xd = x.to(dtype)
        check(f"unsegmented absmax {dtype}", torch.equal(tk.activation_absmax(xd), ref.activation_absmax(xd)))
        for absmax in (None, ref.activation_absmax(xd) * 2):
            tag = f"{dtype} absmax={absmax is not None}"
            check(f"unsegmented quantize activations {tag}", all(torch.equal(a, b) for a, b in zip(
                tk.quantize_activations(xd, absmax), ref.quantize_activations(xd, absmax))))
            check(f"unsegmented fake-quantize activations {tag}", torch.equal(
                tk.fake_quantize_activations(xd, absmax), ref.fake_quantize_activations(xd, absmax)))
            q_r, s_r, fq_r = ref.quantize_and_dequantize_activations(xd, absmax)
            check(f"unsegmented quantize and dequantize activations {tag}", all(torch.equal(a, b) for a, b in zip(
                tk.quantize_and_dequantize_activations(xd, absmax), (q_r, s_r, fq_r), strict=True)))
            check(f"unsegmented dequantize activations {tag}",
                  torch.equal(tk.dequantize_activations(q_r, s_r, dtype), fq_r))
    # Segments wider than the kernel's 4096-wide block walk the row in steps (the others read it
    # once); the absmax sits in the second step of one row.
    wide = torch.randn(2, 4100, generator=g)
    wide[1, 4098] = 40.0
    layout = SegmentLayout([("y", 4097), ("o", 3)], 1)
    for absmax in (None, ref.activation_absmax(wide, layout) * 2):
        both_t = tk.quantize_and_dequantize_activations(wide, absmax, layout)
        both_r = ref.quantize_and_dequantize_activations(wide, absmax, layout)
        check(f"quantize and dequantize activations, a segment of 4097, absmax={absmax is not None}",
              all(torch.equal(a, b) for a, b in zip(both_t, both_r, strict=True)))


def int8_checks(g):
    layout = SegmentLayout([("qkv", 21), ("zx", 19)], 0)
    w = torch.randn(40, 24, generator=g) * 0.02
    w[:21] *= 5
    x_q, x_scale = ref.quantize_activations(torch.randn(37, 24, generator=g))
    w_q, w_scales = ref.quantize_weights(w, layout=layout)
    row_scales = layout.along_weight(w_scales).reshape(-1)
    m, k, n = x_q.shape[0], x_q.shape[1], w_q.shape[0]
    for per_n, scale in ((True, row_scales), (False, w_scales[:1])):
        out = torch.empty(m, n)
        grid = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
        tk._int8_matmul_kernel.fn[grid](x_q, w_q, out, x_scale, scale.contiguous(), m, n, k,
                                        BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, PER_N_SCALE=per_n)
        want = ref.int8_linear(x_q, x_scale, w_q, row_scales if per_n else w_scales[0])
        check(f"int8 GEMM per_n_scale={per_n}", torch.equal(out, want))


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    weight_checks(g)
    activation_checks(g)
    int8_checks(g)
    sys.exit(1 if failures else 0)
