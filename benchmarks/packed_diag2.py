"""Reproduces the bf16 packed-row failure on the GPU (benchmarks/NOTES.md, session 7): the micro model's
packed row [13, 37, 22] against each document alone, per document, for each packed attention backend
and SDPA kernel choice, with Mamba on the PyTorch reference path (no Triton compile). Prints a JSON
line per case and writes them all to $OUT/packed_diag2.json. It takes the model, rows and comparison
of tests/falcon_h1/test_gpu_paths.py's packed-row test, so its cases are that test's.
    device run: source benchmarks/device_setup.sh; python3 benchmarks/packed_diag2.py"""

import contextlib
import json
import os
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from falcon_h1.kernels import KernelOptions
from falcon_h1.megatron_compat.parallel import initialize_parallel
from falcon_h1.model import build_model
from tests.falcon_h1.packed_model import CONFIG, ROWS, batch, errors, rel, run_alone, run_packed
from tests.falcon_h1.packed_rows import documents

REFERENCE_MAMBA = dict(triton_ssd=False, triton_conv=False, fused_mamba_branch=False)
HEAD_DIM_32 = CONFIG.replace(head_dim=32)
# (name, config, packed_attention, SDPA kernels around build and run or None, Triton conv on)
CASES = [
    ("sdpa any", CONFIG, "sdpa", None, False),
    ("triton conv, sdpa", CONFIG, "sdpa", None, True),
    ("unfused", CONFIG, "unfused", None, False),
    ("sdpa cudnn only", CONFIG, "sdpa", [SDPBackend.CUDNN_ATTENTION], False),
    ("sdpa efficient only", CONFIG, "sdpa", [SDPBackend.EFFICIENT_ATTENTION], False),
    ("sdpa math only", CONFIG, "sdpa", [SDPBackend.MATH], False),
    ("sdpa efficient+math", CONFIG, "sdpa", [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], False),
    ("hd32 sdpa any", HEAD_DIM_32, "sdpa", None, False),
    ("varlen", CONFIG, "varlen", None, False),
    ("flex", CONFIG, "flex", None, False),
    ("hd32 flex", HEAD_DIM_32, "flex", None, False),
    ("hd32 varlen", HEAD_DIM_32, "varlen", None, False),
]


def run_case(cfg, attention, sdpa_backends, triton_conv, device) -> dict:
    options = KernelOptions(packed_attention=attention, **dict(REFERENCE_MAMBA, triton_conv=triton_conv))
    with sdpa_kernel(sdpa_backends) if sdpa_backends else contextlib.nullcontext():
        model = build_model(cfg, precision="bf16", kernel_options=options, seed=7)
        data = {k: v.to(device) for k, v in batch(ROWS, cfg.vocab_size).items()}
        packed, alone = run_packed(model, data), run_alone(model, data, ROWS)
    got = errors(packed, alone)
    per_document = [round(rel(packed["logits"][r, a:b], alone["logits"][r, a:b]), 4) for r, a, b in documents(ROWS)]
    return dict(per_document=per_document, logits=round(got["logits"], 5), loss=round(got["loss"], 5))


def main():
    initialize_parallel(tp=1, pp=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out, rows = os.environ.get("OUT", "/tmp"), []
    for name, cfg, attention, sdpa_backends, triton_conv in CASES:
        start = time.time()
        try:
            row = dict(case=name, **run_case(cfg, attention, sdpa_backends, triton_conv, device))
        except Exception as e:  # a kernel choice torch refuses is a result of the diagnosis, not its end
            row = dict(case=name, error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(dict(row, s=round(time.time() - start, 1)))
        print(json.dumps(rows[-1]), flush=True)
        with open(f"{out}/packed_diag2.json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
