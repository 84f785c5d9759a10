"""The bf16 packed-row failure on the GPU (benchmarks/NOTES.md, sessions 7-8), in two parts:
torch's SDPA kernels on a v that is a view of the micro preset's fused in-projection (292-wide bf16
rows: 584 bytes, not whole 16-byte units) against the same values contiguous, each against float64,
after the micro model's packed row [13, 37, 22] against each document alone per packed attention
backend (Mamba on the PyTorch reference path: no Triton compile), with causal_attention's row
alignment as it is and switched off. Prints a JSON line per case, writes $OUT/packed_diag2.json.
    device run: source benchmarks/device_setup.sh; python3 -m benchmarks.packed_diag2"""

import contextlib
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import falcon_h1.kernels
from falcon_h1.kernels import KernelOptions
from falcon_h1.megatron_compat.parallel import initialize_parallel
from falcon_h1.model import build_model
from tests.falcon_h1.packed_model import CONFIG, ROWS, batch, rel, run_alone, run_packed
from tests.falcon_h1.packed_rows import documents

REFERENCE_MAMBA = dict(triton_ssd=False, triton_conv=False, fused_mamba_branch=False)
# (kernel, v layout), flash on the view last: its misaligned address is a sticky CUDA error that
# fails everything after it in the process
KERNEL_CASES = [(backend, layout) for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                                  SDPBackend.MATH) for layout in ("view", "contiguous")]
KERNEL_CASES += [(SDPBackend.FLASH_ATTENTION, "contiguous"), (SDPBackend.FLASH_ATTENTION, "view")]


def kernel_cases(device, length=37):
    g = torch.Generator(device=device).manual_seed(5)
    projection = torch.randn(length, 1, 292, device=device, generator=g).to(torch.bfloat16)
    q, k = (torch.randn(1, h, length, 16, device=device, generator=g).to(torch.bfloat16) for h in (4, 2))
    view = projection[..., 96:128].reshape(length, 1, 2, 16).permute(1, 2, 0, 3)
    rep = lambda t: t.double().repeat_interleave(2, dim=1)
    want = F.scaled_dot_product_attention(q.double(), rep(k), rep(view), is_causal=True, scale=0.25)
    for backend, layout in KERNEL_CASES:
        v = view if layout == "view" else view.contiguous()
        row = dict(case=f"sdpa {backend.name} l={length} v {layout}")
        try:
            with sdpa_kernel([backend]):
                got = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
            row["error vs float64"] = round(rel(got, want), 4)
        except RuntimeError as e:  # a kernel torch refuses for this input is a result here
            row["refused"] = str(e).splitlines()[0][:160]
        yield row


def model_case(attention, aligned, device):
    options = KernelOptions(packed_attention=attention, **REFERENCE_MAMBA)
    patch = contextlib.nullcontext() if aligned else _rows_not_aligned()
    with patch:
        model = build_model(CONFIG, precision="bf16", kernel_options=options, seed=7)
        data = {k: v.to(device) for k, v in batch(ROWS, CONFIG.vocab_size).items()}
        packed, alone = run_packed(model, data), run_alone(model, data, ROWS)
    per_document = [round(rel(packed["logits"][r, a:b], alone["logits"][r, a:b]), 4) for r, a, b in documents(ROWS)]
    return dict(case=f"model packed {attention}, rows {'aligned' if aligned else 'as they come'}",
                per_document=per_document, loss=round(rel(packed["loss"], alone["loss"]), 4))


@contextlib.contextmanager
def _rows_not_aligned():
    saved = falcon_h1.kernels.rows_aligned
    falcon_h1.kernels.rows_aligned = lambda t: t
    try:
        yield
    finally:
        falcon_h1.kernels.rows_aligned = saved


def main():
    initialize_parallel(tp=1, pp=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out, rows = os.environ.get("OUT", "/tmp"), []

    def record(row, start):
        rows.append(dict(row, s=round(time.time() - start, 1)))
        print(json.dumps(rows[-1]), flush=True)
        with open(f"{out}/packed_diag2.json", "w") as f:
            json.dump(rows, f, indent=1)

    for attention, aligned in (("sdpa", False), ("sdpa", True), ("varlen", True), ("flex", True), ("unfused", True)):
        start = time.time()
        record(model_case(attention, aligned, device), start)
    start = time.time()
    for row in kernel_cases(device):
        record(row, start)


if __name__ == "__main__":
    main()
