"""Micro-benchmark of the BitNet quantisers and GEMMs on one GPU:
`python -m benchmarks.bitnet_bench`.

Compares, for one projection (bf16): the PyTorch reference quantisers vs the Triton kernels
(and onebitllms' kernels when installed), the reference STE `x + (q(x) - x).detach()` vs the
fused autograd function (forward + backward), and the bf16 GEMM vs the int8 GEMM.
"""

from __future__ import annotations

import argparse

import torch


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def _rows(args):
    from bitnet import kernels, reference, triton_kernels

    n, k, t = args.out_features, args.in_features, args.tokens
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    rows = [
        ("weight fake-quant, reference", lambda: reference.fake_quantize_weights(w)),
        ("weight fake-quant, triton", lambda: kernels.fake_quantize_weights(w)),
        ("activation fake-quant, reference", lambda: reference.fake_quantize_activations(x)),
        ("activation fake-quant, triton", lambda: kernels.fake_quantize_activations(x)),
        ("activation fake-quant, triton, each row walked twice",
         lambda: triton_kernels._act_quant(x, None, None, write_int8=False, write_fake=True, read_once=False)),
        ("activation fake-quant, triton, each row read once",
         lambda: triton_kernels._act_quant(x, None, None, write_int8=False, write_fake=True, read_once=True)),
    ]
    try:
        import onebitllms

        rows += [
            ("weight fake-quant, onebitllms (.item() sync)", lambda: onebitllms.weight_quant_triton(w)),
            ("activation fake-quant, onebitllms", lambda: onebitllms.activation_quant_triton(x[None])),
        ]
    except ImportError:
        pass

    wp = w.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    grad = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)

    def step(ste):
        def run():
            xq = ste(xp, kernels.fake_quantize_activations)
            wq = ste(wp, kernels.fake_quantize_weights)
            torch.nn.functional.linear(xq, wq).backward(grad)

        return run

    rows += [
        ("fwd+bwd linear, STE reference", step(kernels.ste_reference)),
        ("fwd+bwd linear, STE fused", step(kernels.ste_fused)),
    ]
    x_q, x_s = kernels.quantize_activations(x)
    w_q, w_s = kernels.quantize_weights(w)
    wt = kernels.fake_quantize_weights(w)
    rows += [
        ("GEMM bf16 (fake-quantised operands)", lambda: torch.nn.functional.linear(x, wt)),
        ("GEMM int8 triton, rescale fused, bf16 out",
         lambda: kernels.int8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.bfloat16)),
        ("GEMM int8 torch._int_mm, then rescale", lambda: (
            torch._int_mm(x_q, w_q.t()).float() * x_s.unsqueeze(-1) * w_s).to(torch.bfloat16)),
    ]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bitnet_bench")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.bitnet_bench needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}: tokens={args.tokens} in={args.in_features} "
          f"out={args.out_features} bf16")
    for name, fn in _rows(args):
        print(f"  {name:48s} {_bench(fn) * 1e3:9.1f} us")


if __name__ == "__main__":
    main()
