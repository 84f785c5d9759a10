"""Registers, spills and shared memory of the project's own SSD kernels for sm_90a, compiled here
without a GPU, with the launch arguments the launchers really pass.

The launchers (kernels.ssd_fwd.ssd_forward_own, kernels.ssd_bwd.ssd_backward_own) run on CPU
tensors at a preset's shape while every Triton launch is caught: its arguments become a signature
(pointer dtypes, integers specialised as the JIT does: 1 as a constant, multiples of 16 marked
divisible), it is compiled for sm_90a, and ptxas reports. Run it with the device's Triton (the
counts differ between Triton versions):
    PYTHONPATH=/tmp/tri36:. .venv/bin/python -m benchmarks.ssd_offline_report --shapes 0.5b 7b \
        [--backward-blocks '{"tokens": {"num_warps": 8}}'] [--forward-blocks '{...}'] [--sass]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from benchmarks.ssd_bench import SHAPES, make_inputs

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
DTYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
          torch.int64: "*i64"}


def _signature(fn: JITFunction, args: tuple, kwargs: dict):
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, value = param.name, values.get(param.name, param.default)
        if param.is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} = {value!r}")
    return signature, constexprs, attrs


NVDISASM = os.path.join(os.path.dirname(PTXAS), "nvdisasm")
# SASS opcode families worth counting: the issue-bound kernels' instruction mix
SASS_FAMILIES = {"mma": ("HGMMA", "HMMA", "WARPGROUP"), "shared": ("LDS", "STS", "LDSM", "STSM"),
                 "global": ("LDG", "STG", "LDGSTS", "UTMALDG"), "atomic": ("RED", "REDG", "ATOM", "ATOMG", "ATOMS"), "sync": ("BAR",),
                 "shuffle": ("SHFL",), "special": ("MUFU",), "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP"),
                 "convert": ("F2F", "F2FP", "I2F", "F2I", "PRMT")}


def _sass_mix(cubin: str) -> str:
    """Static SASS instruction count and its mix by family (nvdisasm of the cubin)."""
    text = subprocess.run([NVDISASM, "-c", cubin], capture_output=True, text=True, check=True).stdout
    ops = [line.split("*/", 1)[1].strip().lstrip("@!P0123456789T ").split(" ")[0].split(".")[0]
           for line in text.splitlines() if line.strip().startswith("/*") and "*/" in line
           and line.split("*/", 1)[1].strip() not in ("", "}")]
    ops = [op.rstrip(";") for op in ops if op]
    counts = {name: sum(op in family for op in ops) for name, family in SASS_FAMILIES.items()}
    return f"{len(ops)} instructions: " + ", ".join(f"{k} {v}" for k, v in counts.items())


def _ptxas(ptx: str, sass: bool = False) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", path, "-o", cubin],
                             capture_output=True, text=True, check=True)
        mix = f"\n  {'':34s} {_sass_mix(cubin)}" if sass else ""
    return " | ".join(line.split("info    :")[-1].strip() for line in res.stderr.splitlines()
                      if "registers" in line or "spill" in line) + mix


def caught_launches(run, sass: bool = False):
    """Calls run() with every JITFunction launch compiled for sm_90a instead of run; returns
    [(kernel name, grid, options, ptxas report, shared bytes)]."""
    rows = []
    original = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if kwargs.get(k) is not None}
        signature, constexprs, attrs = _signature(self, args, kwargs)
        kernel = triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=TARGET, options=options)
        grid = grid(kwargs) if callable(grid) else grid
        rows.append((self.__name__, tuple(grid), options, _ptxas(kernel.asm["ptx"], sass), kernel.metadata.shared))

    JITFunction.run = compile_instead
    try:
        run()
    finally:
        JITFunction.run = original
    return rows


def report(shape: str, forward_blocks: dict, backward_blocks: dict, sass: bool = False) -> None:
    from falcon_h1.kernels.ssd_bwd import ssd_backward_own
    from falcon_h1.kernels.ssd_fwd import ssd_forward_own

    t = make_inputs(shape, device="cpu")
    b, l, h, p, n, g, q = SHAPES[shape]
    nc = triton.cdiv(l, q)
    out_x = torch.empty_like(t["x"])
    dt = torch.rand(b, h, nc, q)
    dA_cumsum = -torch.rand(b, h, nc, q).cumsum(-1)
    states = torch.randn(b, nc, h, p, n).to(torch.bfloat16)
    grads = dict(dx=torch.empty_like(t["x"]), ddt_raw=torch.empty_like(t["dt_raw"]), dB=torch.empty_like(t["B"]),
                 dC=torch.empty_like(t["C"]), dz=torch.empty_like(t["z"]))

    def both():
        ssd_forward_own(t["x"], t["dt_raw"], t["A"], t["B"], t["C"], q, D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
                        dt_limit=t["limit"], seq_idx=t["seq_idx"], blocks=forward_blocks)
        ssd_backward_own(t["dout"], t["x"], t["dt_raw"], t["A"], t["B"], t["C"], out_x, dt, dA_cumsum, states, q,
                         t["D"], t["z"], t["dt_bias"], t["limit"], grads["dx"], grads["ddt_raw"], grads["dB"],
                         grads["dC"], grads["dz"], seq_idx=t["seq_idx"], blocks=backward_blocks)

    print(f"{shape} (triton {triton.__version__}, sm_90a)")
    for name, grid, options, usage, shared in caught_launches(both, sass):
        print(f"  {name:34s} grid {str(grid):16s} {options} shared {shared // 1024} KB\n  {'':34s} {usage}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["0.5b"], choices=sorted(SHAPES))
    ap.add_argument("--forward-blocks", default="{}")
    ap.add_argument("--backward-blocks", default="{}")
    ap.add_argument("--sass", action="store_true", help="also each kernel's static SASS instruction mix")
    args = ap.parse_args(argv)
    for shape in args.shapes:
        report(shape, json.loads(args.forward_blocks), json.loads(args.backward_blocks), args.sass)


if __name__ == "__main__":
    main()
