"""What packed rows cost on the GPU: the candidates for causal attention within documents
(kernels.document_attention), and the Mamba-2 kernels with seq_idx against without.

    python benchmarks/packed_attention_bench.py                       # H200, 0.5B shapes, 4 x 4096
    python benchmarks/packed_attention_bench.py --json $OUT/packed.json
    python benchmarks/packed_attention_bench.py --device cpu --seq 256 --batch 2 --iters 3   # smoke run

Rows are packed from document lengths drawn like chat data (log-normal, median
--median-len tokens, sigma --sigma, at least 8 tokens); documents are taken in order while
they fit, and the rest of a row is one more (short) document, so every token belongs to
one. Per attention candidate: `prep` = building its form of the documents from
position_ids (once per step, shared by every layer), `fwd` and `fwd+bwd` per call (median),
and the relative L2 error of the output and of dq/dk/dv against the unfused fp32 reference
with the same document mask. `causal_rows` is plain causal attention over whole rows (what
an unpacked row of the same length costs; not a correct packed result, its error shows it).
Pick the attention path for packed rows from this table (fastest with errors at bf16 level).

The Mamba table times the Triton conv + SiLU, mamba_ssm's gated scan and the fused branch
(kernels.mamba_branch), fwd+bwd, without seq_idx and with the packed rows' seq_idx.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from benchmarks.tables import print_rows
from falcon_h1.kernels.document_attention import BACKENDS, document_causal_attention
from falcon_h1.kernels.documents import documents_from_position_ids


def chat_like_rows(batch: int, seq: int, median: float, sigma: float, seed: int) -> list[list[int]]:
    """Document lengths per row (each row sums to seq), drawn log-normal."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths, used = [], 0
        while True:
            n = max(8, int(math.exp(math.log(median) + sigma * torch.randn(1, generator=g).item())))
            if used + n > seq:
                break
            lengths.append(n)
            used += n
        if used < seq:
            lengths.append(seq - used)
        rows.append(lengths)
    return rows


def position_ids_of(rows, device) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows]).to(device)


def timer(device):
    """ms per call (median) of fn; leaves' grads reset before each call."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn, leaves, iters: triton.testing.do_bench(fn, warmup=max(iters // 4, 3), rep=iters * 10,
                                                                 grad_to_none=leaves, return_mode="median")

    def cpu(fn, leaves, iters):
        times = []
        for _ in range(iters + 1):
            for leaf in leaves:
                leaf.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times[1:])[iters // 2]
    return cpu


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


PREP = {  # the form of the documents each candidate reads
    "sdpa": lambda d: d.attention_mask, "unfused": lambda d: d.attention_mask, "flex": lambda d: d.block_mask,
    "varlen": lambda d: (d.cu_seqlens, d.max_seqlen), "sdpa_repeat_kv": lambda d: d.attention_mask,
}


def attention_table(args, device, rows) -> list[dict]:
    import torch.nn.functional as F

    ms = timer(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    b, s, hq, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    position_ids = position_ids_of(rows, device)
    q32, k32, v32 = (torch.randn(b, h, s, d, device=device, generator=g) for h in (hq, hkv, hkv))
    dy32 = torch.randn(b, hq, s, d, device=device, generator=g)
    scale = d ** -0.5
    docs = documents_from_position_ids(position_ids)
    reference = [t.clone().requires_grad_() for t in (q32, k32, v32)]
    out = document_causal_attention(*reference, scale, "unfused", docs)
    out.backward(dy32)
    want = [out.detach()] + [t.grad for t in reference]
    del out, reference

    rep = hq // hkv
    candidates = {
        **{name: (lambda name: lambda q, k, v, dd: document_causal_attention(q, k, v, scale, name, dd))(name)
           for name in BACKENDS},
        # SDPA's masked kernels may not take GQA: the same with K/V repeated to all query heads
        "sdpa_repeat_kv": lambda q, k, v, dd: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=dd.attention_mask, scale=scale),
        "causal_rows": lambda q, k, v, dd: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                          enable_gqa=rep > 1),
    }
    results = []
    for name, fn in candidates.items():
        row = {"backend": name}
        trainable = device.type == "cuda" or name != "flex"   # no FlexAttention backward on CPU
        try:
            leaves = [t.to(args.dtype).clone().requires_grad_(trainable) for t in (q32, k32, v32)]
            dy = dy32.to(args.dtype)
            if name in PREP:
                row["prep_ms"] = ms(lambda: PREP[name](documents_from_position_ids(position_ids)), [], args.iters)
            fresh = documents_from_position_ids(position_ids)
            with torch.no_grad():
                row["fwd_ms"] = ms(lambda: fn(*leaves, fresh), [], args.iters)
            out = fn(*leaves, fresh)
            if trainable:
                out.backward(dy)
                # copies: the timed calls below accumulate into these .grad tensors in place
                got = [out.detach()] + [t.grad.clone() for t in leaves]
                row["fwd_bwd_ms"] = ms(lambda: fn(*leaves, fresh).backward(dy), leaves, args.iters)
            else:
                got = [out.detach()]
            for label, a, w in zip(["err_out", "err_dq", "err_dk", "err_dv"], got, want):
                row[label] = rel(a, w)
        except Exception as exc:   # a candidate this device / dtype does not run: say why, go on
            row["unavailable"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        results.append(row)
    return results


def mamba_table(args, device, rows) -> list[dict]:
    """Conv, scan and fused branch fwd+bwd at the Falcon-H1-0.5B Mamba shape, without / with seq_idx."""
    from falcon_h1.kernels import causal_conv1d_silu, ssd_scan
    from falcon_h1.kernels.mamba_branch import mamba_conv_scan

    ms = timer(device)
    h, p, n, groups, chunk = 24, 64, 128, 1, 128
    b, s, dt_ = args.batch, args.seq, args.dtype
    dd, bc = h * p, groups * n
    seq_idx = documents_from_position_ids(position_ids_of(rows, device)).seq_idx
    proj = torch.randn(s, b, 2 * dd + 2 * bc + h, device=device, dtype=dt_)
    zxbcdt = proj.transpose(0, 1).detach().requires_grad_()
    w = (torch.randn(dd + 2 * bc, 4, device=device, dtype=dt_) * 0.5).requires_grad_()
    bias = torch.zeros(dd + 2 * bc, device=device, dtype=dt_, requires_grad=True)
    A = -torch.rand(h, device=device, requires_grad=True)
    D, dt_bias = torch.ones(h, device=device, requires_grad=True), torch.zeros(h, device=device, requires_grad=True)
    leaves = [zxbcdt, w, bias, A, D, dt_bias]
    lim = (0.0, math.inf)
    dy = torch.randn(b, s, dd, device=device, dtype=dt_)
    heads = lambda t, k: t.unflatten(-1, (k, -1))

    def conv(si):
        xBC = zxbcdt[..., dd:2 * dd + 2 * bc]
        causal_conv1d_silu(xBC, w, bias, True, seq_idx=si).backward(torch.ones_like(xBC))

    def scan(si):
        z, x, B, C, dt = zxbcdt.split([dd, dd, bc, bc, h], dim=-1)
        ssd_scan(heads(x, h), dt, A, heads(B, groups), heads(C, groups), chunk, D, dt_bias, lim, True,
                 z=heads(z, h), seq_idx=si).flatten(-2).backward(dy)

    def branch(si):
        mamba_conv_scan(zxbcdt, w, bias, None, A, D, dt_bias, dd, bc, h, groups, chunk, lim, seq_idx=si).backward(dy)

    results = []
    for name, fn in (("conv_triton", conv), ("ssd_scan_gated", scan), ("mamba_branch", branch)):
        row = {"kernel": name}
        try:
            row["unpacked_fwd_bwd_ms"] = ms(lambda: fn(None), leaves, args.iters)
            row["seq_idx_fwd_bwd_ms"] = ms(lambda: fn(seq_idx), leaves, args.iters)
        except Exception as exc:
            row["unavailable"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        results.append(row)
    return results


def print_table(rows: list[dict], columns: list[str]) -> None:
    print_rows(rows, columns, width=16, digits=3, reason_key="unavailable")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)       # Falcon-H1-0.5B attention
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--median-len", type=float, default=600.0)
    parser.add_argument("--sigma", type=float, default=0.9)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mamba", action="store_true", help="attention table only")
    parser.add_argument("--json", help="also write the tables here")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    rows = chat_like_rows(args.batch, args.seq, args.median_len, args.sigma, args.seed)
    counts = [len(r) for r in rows]
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{args.batch} x {args.seq} tokens, {sum(counts)} documents (per row {counts}), "
          f"attention {args.heads}/{args.kv_heads} heads x {args.head_dim}, {args.dtype}")
    attention = attention_table(args, device, rows)
    print("\nCausal attention within documents (ms per call, one layer):")
    print_table(attention, ["backend", "prep_ms", "fwd_ms", "fwd_bwd_ms", "err_out", "err_dq", "err_dk", "err_dv"])
    mamba = []
    if not args.no_mamba and device.type == "cuda":
        mamba = mamba_table(args, device, rows)
        print("\nMamba-2 kernels at the 0.5B shape, without and with seq_idx (ms, fwd+bwd):")
        print_table(mamba, ["kernel", "unpacked_fwd_bwd_ms", "seq_idx_fwd_bwd_ms"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "attention": attention, "mamba": mamba,
                       "args": {k: str(v) for k, v in vars(args).items()}}, f, indent=1)


if __name__ == "__main__":
    main()
