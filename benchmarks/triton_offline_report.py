"""Registers, spills and load widths of the conv kernels for sm_90a, compiled here without a GPU.

Triton compiles for a target given by hand and its bundled ptxas prints the resource report,
so tile choices can be checked at no device time (benchmarks/NOTES.md, "Offline checks").
    .venv/bin/python benchmarks/triton_offline_report.py
"""

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from falcon_h1.kernels import conv_triton as ct

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
# the JIT specialises pointers and integers divisible by 16; without this, loads come out scalar
DIVISIBLE = {"x_ptr", "w_ptr", "bias_ptr", "scale_ptr", "dy_ptr", "dx_ptr", "dw_partial_ptr", "out_ptr", "g_ptr",
             "channels", "stride_xb", "stride_xl", "stride_dyb", "stride_dyl", "stride_dxb", "stride_dxl",
             "stride_ob", "stride_ol", "seq_idx_ptr", "stride_sb"}
POINTERS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "scale_ptr": "*fp32", "dy_ptr": "*bf16",
            "dx_ptr": "*bf16", "dw_partial_ptr": "*fp32", "out_ptr": "*bf16", "g_ptr": "*fp32", "seq_idx_ptr": "*i32"}


def compile_kernel(fn, constexprs: dict, num_warps: int):
    signature = {name: POINTERS.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names if n in DIVISIBLE}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=TARGET, options={"num_warps": num_warps})


def report(name: str, kernel) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    usage = " | ".join(line.split("info    :")[-1].strip() for line in res.stderr.splitlines()
                       if "registers" in line or "spill" in line)
    loads = sorted({line.split()[1] for line in kernel.asm["ptx"].splitlines() if "ld.global" in line})
    print(f"{name:34s} {usage}\n{'':34s} loads: {', '.join(loads)}")


def main():
    for packed in (False, True):   # unpacked rows, and packed rows (seq_idx: taps masked per document)
        flags = {"HAS_BIAS": True, "HAS_SCALE": True, "HAS_SEQ_IDX": packed}
        tag = " seq_idx" if packed else ""
        for bl, bc, nw in [(32, 128, 4)]:
            report(f"fwd {bl}x{bc} w{nw}{tag}", compile_kernel(ct._conv_silu_fwd_kernel,
                                                              {**flags, "BLOCK_L": bl, "BLOCK_C": bc}, nw))
        for bl, bc, nw, rows, reload in [(32, 128, 4, 64, False), (16, 128, 4, 64, False), (32, 128, 4, 64, True),
                                         (32, 128, 8, 64, True), (64, 128, 8, 128, True)]:
            report(f"bwd pass 1 {bl}x{bc} w{nw} r{rows}{' reload' if reload else ''}{tag}", compile_kernel(
                ct._conv_silu_bwd_pre_kernel, {**flags, "ROWS_PER_PROGRAM": rows, "RELOAD_WINDOWS": reload,
                                               "BLOCK_L": bl, "BLOCK_C": bc}, nw))
        for bc, nw, rows in [(128, 1, 64), (256, 1, 64), (256, 2, 64), (64, 1, 64)]:
            report(f"streaming fwd {bc} w{nw} r{rows}{tag}", compile_kernel(
                ct._conv_silu_fwd_streaming_kernel, {**flags, "ROWS_PER_PROGRAM": rows, "BLOCK_C": bc}, nw))
            report(f"streaming bwd {bc} w{nw} r{rows}{tag}", compile_kernel(
                ct._conv_silu_bwd_streaming_kernel, {**flags, "ROWS_PER_PROGRAM": rows, "BLOCK_C": bc}, nw))
        report(f"bwd pass 2 32x128 w4{tag}", compile_kernel(
            ct._conv_bwd_dx_kernel, {"HAS_SEQ_IDX": packed, "BLOCK_L": 32, "BLOCK_C": 128}, 4))

if __name__ == "__main__":
    main()
