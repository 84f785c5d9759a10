"""The gated SSD scan: this project's kernels (kernels.ssd_fwd, kernels.ssd_bwd) against mamba_ssm
2.3.2's, side by side at the Falcon-H1 shapes, bf16, inputs as strided views of one [s, b, .]
in-projection buffer (as in training). For each shape: the errors of both against the float64
reference (kernels.ssd_reference through autograd), and GPU kernel time (summed CUDA kernel time, as
in a graphed step) of each forward and each backward (mamba_ssm's recomputing the chunk states, as
its combined function does, and from the forward's states); then the per-kernel times.

    python -m benchmarks.ssd_bench --shapes 0.5b 7b --json out.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from benchmarks.timing import profile_kernels

SHAPES = {  # batch, seqlen, heads, head dim, state, groups, chunk (falcon_h1.presets)
    "0.5b": (4, 4096, 24, 64, 128, 1, 128),
    "7b": (1, 4096, 24, 128, 256, 1, 256),
    "34b": (1, 4096, 32, 128, 256, 2, 256),
    "0.5b_packed": (4, 4096, 24, 64, 128, 1, 128),
}
GRADS = ("out", "dx", "dz", "dB", "dC", "ddt_raw", "dA", "dD", "ddt_bias")


def make_inputs(shape: str, seed: int = 0, device: str = "cuda") -> dict:
    """The scan's inputs at `shape`, as strided views of one [s, b, .] bf16 in-projection buffer
    (on the CPU for benchmarks.ssd_offline_report, whose launches compile instead of running)."""
    b, l, h, p, n, g, q = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(seed)
    width = 2 * h * p + 2 * g * n + h
    proj = torch.randn(l, b, width, device=device, generator=gen).to(torch.bfloat16).transpose(0, 1)
    z, x, B, C, dt_raw = proj.split([h * p, h * p, g * n, g * n, h], dim=-1)
    seq_idx = None
    if shape.endswith("packed"):  # documents of 300 to 1700 tokens, some boundaries on chunk edges
        lengths = torch.randint(300, 1700, (64,), generator=gen, device=device)
        lengths[::5] = 1024
        starts = torch.cumsum(lengths, 0)
        pos = torch.arange(l, device=device)
        seq_idx = torch.searchsorted(starts, pos, right=True).to(torch.int32)[None].expand(b, l).contiguous()
    return dict(
        x=x.unflatten(-1, (h, p)), z=z.unflatten(-1, (h, p)), B=B.unflatten(-1, (g, n)), C=C.unflatten(-1, (g, n)),
        dt_raw=dt_raw, A=-torch.rand(h, device=device, generator=gen) - 0.5,
        D=torch.randn(h, device=device, generator=gen), dt_bias=torch.randn(h, device=device, generator=gen) - 2.0,
        dout=torch.randn(b, l, h, p, device=device, generator=gen).to(torch.bfloat16), chunk=q, seq_idx=seq_idx,
        limit=(0.0, math.inf))


FORWARD_BLOCKS: dict = {}  # kernels.ssd_fwd.forward_blocks overrides (--forward-blocks)
BACKWARD_BLOCKS: dict = {}  # kernels.ssd_bwd.ssd_backward_own's `blocks` (--backward-blocks)


def _scan_fwd(t, own: bool = False):
    from falcon_h1.kernels.ssd_fwd import ssd_forward_own

    if own:
        return ssd_forward_own(t["x"], t["dt_raw"], t["A"], t["B"], t["C"], t["chunk"], D=t["D"], z=t["z"],
                               dt_bias=t["dt_bias"], dt_limit=t["limit"], seq_idx=t["seq_idx"],
                               blocks=FORWARD_BLOCKS)
    from falcon_h1.kernels.mamba_branch import _ssd_functions

    return _ssd_functions()[0](t["x"], t["dt_raw"], t["A"], t["B"], t["C"], t["chunk"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
               seq_idx=t["seq_idx"], dt_softplus=True, dt_limit=t["limit"])


def _grad_buffers(t):
    return dict(dx=torch.empty_like(t["x"]), dz=torch.empty_like(t["z"]), dB=torch.empty_like(t["B"]),
                dC=torch.empty_like(t["C"]), ddt_raw=torch.empty_like(t["dt_raw"]))


def backward_from_states(t, saved, own: bool) -> dict:
    from falcon_h1.kernels.ssd_backward import ssd_backward_from_forward_states
    from falcon_h1.kernels.ssd_bwd import ssd_backward_own

    out_x, dt, dA_cumsum, states = saved[1:5]
    out = _grad_buffers(t)
    fn = ssd_backward_own if own else ssd_backward_from_forward_states
    extra = {"blocks": BACKWARD_BLOCKS} if own else {}
    dA, dD, ddt_bias = fn(t["dout"], t["x"], t["dt_raw"], t["A"], t["B"], t["C"], out_x, dt, dA_cumsum, states,
                          t["chunk"], t["D"], t["z"], t["dt_bias"], t["limit"], out["dx"], out["ddt_raw"], out["dB"],
                          out["dC"], out["dz"], seq_idx=t["seq_idx"], **extra)
    return {**out, "dA": dA, "dD": dD, "ddt_bias": ddt_bias}


def backward_recomputing(t, saved) -> dict:
    from falcon_h1.kernels.mamba_branch import _ssd_functions

    bwd = _ssd_functions()[1]
    out = _grad_buffers(t)
    _, _, dA, _, _, dD, _, ddt_bias, _ = bwd(
        t["dout"], t["x"], t["dt_raw"], t["A"], t["B"], t["C"], saved[1], t["chunk"], D=t["D"], z=t["z"],
        dt_bias=t["dt_bias"], seq_idx=t["seq_idx"], dt_softplus=True, dt_limit=t["limit"], dx=out["dx"],
        ddt=out["ddt_raw"], dB=out["dB"], dC=out["dC"], dz=out["dz"])
    return {**out, "dA": dA, "dD": dD, "ddt_bias": ddt_bias}


def reference_grads(t) -> dict:
    """float64 autograd through kernels.ssd_scan's reference path (dt chain, chunked scan, gate)."""
    from falcon_h1.kernels import ssd_scan

    leaves = {k: t[k].detach().double().requires_grad_() for k in ("x", "z", "B", "C", "dt_raw", "A", "D", "dt_bias")}
    y = ssd_scan(leaves["x"], leaves["dt_raw"], leaves["A"], leaves["B"], leaves["C"], t["chunk"], leaves["D"],
                 leaves["dt_bias"], t["limit"], False, seq_idx=t["seq_idx"])
    out = y * torch.nn.functional.silu(leaves["z"])
    (out * t["dout"].double()).sum().backward()
    names = dict(dx="x", dz="z", dB="B", dC="C", ddt_raw="dt_raw", dA="A", dD="D", ddt_bias="dt_bias")
    return {"out": out.detach(), **{k: leaves[v].grad for k, v in names.items()}}


def forward_differences(own: tuple, mamba: tuple) -> dict:
    """Relative difference of each forward output (ours vs mamba_ssm's: both return these first five)."""
    return {k: float((a.double() - b.double()).norm() / b.double().norm())
            for k, a, b in zip(("out", "out_x", "dt", "dA_cumsum", "states"), own, mamba)}


def errors(got: dict, want: dict) -> dict:
    return {k: float((got[k].double() - want[k]).norm() / want[k].norm()) for k in GRADS if k in got and k in want}


def gpu_ms(fn, calls: int = 10) -> float:
    def run():
        for _ in range(calls):
            fn()
    return profile_kernels(run, top=0)[0]["total_ms"] / calls


def bench_shape(shape: str, reference: bool) -> dict:
    """Timings first (printed as measured), then the errors: a call cut by its time limit keeps them."""
    t = make_inputs(shape)
    saved = _scan_fwd(t)
    saved_own = _scan_fwd(t, own=True)
    row = {"shape": shape, "dims": SHAPES[shape]}
    row["fwd_own_vs_mamba"] = forward_differences(saved_own, saved)
    for fn in (lambda: _scan_fwd(t), lambda: _scan_fwd(t, True), lambda: backward_from_states(t, saved, True),
               lambda: backward_from_states(t, saved, False), lambda: backward_recomputing(t, saved)):
        fn()  # compile / warm up
    torch.cuda.synchronize()
    row["fwd_ms"] = gpu_ms(lambda: _scan_fwd(t))
    row["fwd_own_ms"] = gpu_ms(lambda: _scan_fwd(t, True))
    row["bwd_ours_ms"] = gpu_ms(lambda: backward_from_states(t, saved, True))
    row["bwd_mamba_from_states_ms"] = gpu_ms(lambda: backward_from_states(t, saved, False))
    row["bwd_mamba_ms"] = gpu_ms(lambda: backward_recomputing(t, saved))
    print(f"TIMING {shape}: fwd mamba {row['fwd_ms']:.3f} ours {row['fwd_own_ms']:.3f}; bwd mamba "
          f"{row['bwd_mamba_ms']:.3f} (from states {row['bwd_mamba_from_states_ms']:.3f}) ours "
          f"{row['bwd_ours_ms']:.3f} ms", flush=True)
    row["ours_kernels"] = (profile_kernels(lambda: _scan_fwd(t, True), top=4)[1:]
                           + profile_kernels(lambda: backward_from_states(t, saved, True), top=12)[1:])
    row["mamba_kernels"] = profile_kernels(lambda: backward_recomputing(t, saved), top=14)[1:]
    print("KERNELS " + json.dumps({"shape": shape, "ours": row["ours_kernels"]}), flush=True)
    ours = {"out": saved_own[0], **backward_from_states(t, saved_own, own=True)}
    mamba = {"out": saved[0], **backward_from_states(t, saved, own=False)}
    row["ours_vs_mamba"] = errors(ours, {k: v.double() for k, v in mamba.items()})
    if reference:
        want = reference_grads(t)
        row["err_ours"], row["err_mamba"] = errors(ours, want), errors(mamba, want)
        del want
    return row


FORWARD_SWEEP = (  # kernels.ssd_fwd.forward_blocks overrides timed by --forward-sweep, one process each
    # (2026-12-04: the chunk scan's and the two-launch chunk state's tiles; benchmarks/NOTES.md, session 11)
    dict(), dict(fused_states=False), dict(states_n=64), dict(states_n=16), dict(states_stages=3),
)


BACKWARD_SWEEP = (  # kernels.ssd_bwd.ssd_backward_own `blocks` timed by --backward-sweep, one process each
    # (2026-12-04: every token-tile setting with fewer registers, and bc on one stage, were slower
    # than the defaults; benchmarks/NOTES.md, session 11)
    {},
    {"bc": {"num_stages": 3}}, {"bc": {"HEAD_SPLITS": 1}}, {"bc": {"HEAD_SPLITS": 6}},
    # at 7B (n = 256) 64 state columns a program is the tiling without spills (offline report)
    {"bc": {"BLOCK_N": 64}}, {"bc": {"HEAD_SPLITS": 12}},
    {"dstates": {"num_warps": 8}}, {"dstates": {"BLOCK_T": 32, "BLOCK_N": 64}},
    {"tokens": {"num_warps": 8}}, {"tokens": {"block_s": 32, "block_t": 64}},
)


def best_of_sweep(path: str) -> dict:
    """The backward `blocks` that combine, kernel by kernel, the fastest setting of a --backward-sweep
    JSON where it beat the defaults (each setting changes one kernel's tiles, so they compose)."""
    with open(path) as f:
        rows = [r for r in json.load(f)[0]["sweep"] if "bwd_ours_ms" in r]
    base = next(r["bwd_ours_ms"] for r in rows if r["blocks"] == {})
    best: dict = {}
    for r in sorted(rows, key=lambda r: r["bwd_ours_ms"]):
        if len(r["blocks"]) == 1 and r["bwd_ours_ms"] < base:
            (kernel, setting), = r["blocks"].items()
            best.setdefault(kernel, setting)
    return best


def backward_only(shape: str) -> dict:
    """Our backward alone with BACKWARD_BLOCKS (GPU ms, per-kernel ms, relative difference from
    mamba_ssm's backward from the same forward)."""
    t = make_inputs(shape)
    saved = _scan_fwd(t)
    ours, mamba = backward_from_states(t, saved, own=True), backward_from_states(t, saved, own=False)
    torch.cuda.synchronize()
    return {"shape": shape, "blocks": BACKWARD_BLOCKS, "bwd_ours_ms": gpu_ms(lambda: backward_from_states(t, saved, True)),
            "ours_vs_mamba": errors(ours, {k: v.double() for k, v in mamba.items()}),
            "kernels": profile_kernels(lambda: backward_from_states(t, saved, True), top=6)[1:]}


def forward_only(shape: str) -> dict:
    """The forwards alone: own (with FORWARD_BLOCKS) vs mamba_ssm's (relative errors, GPU ms)."""
    t = make_inputs(shape)
    saved, saved_own = _scan_fwd(t), _scan_fwd(t, own=True)
    row = {"shape": shape, "blocks": FORWARD_BLOCKS, "fwd_own_vs_mamba": forward_differences(saved_own, saved)}
    torch.cuda.synchronize()
    row["fwd_ms"], row["fwd_own_ms"] = gpu_ms(lambda: _scan_fwd(t)), gpu_ms(lambda: _scan_fwd(t, True))
    row["fwd_own_kernels"] = profile_kernels(lambda: _scan_fwd(t, True), top=4)[1:]
    row["fwd_mamba_kernels"] = profile_kernels(lambda: _scan_fwd(t), top=6)[1:]
    return row


def own_once(shape: str) -> dict:
    """Our forward and backward, one call each, nothing else launched (for a kernel profiler:
    ncu -k regex:... python -m benchmarks.ssd_bench --own-once)."""
    t = make_inputs(shape)
    saved = _scan_fwd(t, own=True)
    backward_from_states(t, saved, own=True)
    torch.cuda.synchronize()
    return {"shape": shape}


def _sweep(shape: str, mode: str, blocks_flag: str, settings: tuple, describe) -> list:
    """Each tile setting in its own process (a setting that faults cannot take the others' CUDA
    context with it): `python -m benchmarks.ssd_bench <mode> --shapes <shape> <blocks_flag> <json>`."""
    import subprocess
    import sys

    rows = []
    for blocks in settings:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.ssd_bench", mode, "--shapes", shape, blocks_flag,
                               json.dumps(blocks)], capture_output=True, text=True, timeout=300)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        rows.append(json.loads(line[-1][4:]) if line else {"blocks": blocks, "error": proc.stderr[-600:]})
        print(f"sweep {shape} {blocks}: " + (f"ERROR {rows[-1]['error']}" if "error" in rows[-1] else describe(rows[-1])),
              flush=True)
    return rows


def forward_sweep(shape: str) -> list:
    return _sweep(shape, "--forward-only", "--forward-blocks", FORWARD_SWEEP,
                  lambda r: f"own {r['fwd_own_ms']:.3f} ms (mamba {r['fwd_ms']:.3f}), err {r['fwd_own_vs_mamba']}")


def backward_sweep(shape: str) -> list:
    return _sweep(shape, "--backward-only", "--backward-blocks", BACKWARD_SWEEP,
                  lambda r: f"ours {r['bwd_ours_ms']:.3f} ms, max rel. diff from mamba_ssm "
                            f"{max(r['ours_vs_mamba'].values()):.1e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "7b"], choices=sorted(SHAPES))
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 reference errors")
    ap.add_argument("--json", default=None)
    ap.add_argument("--forward-only", action="store_true", help="the forwards alone")
    ap.add_argument("--forward-sweep", action="store_true", help="time FORWARD_SWEEP's tile settings")
    ap.add_argument("--forward-blocks", default="{}", help="JSON: kernels.ssd_fwd.forward_blocks overrides")
    ap.add_argument("--backward-only", action="store_true", help="our backward alone")
    ap.add_argument("--own-once", action="store_true", help="our forward and backward once (for ncu)")
    ap.add_argument("--backward-sweep", action="store_true", help="time BACKWARD_SWEEP's tile settings")
    ap.add_argument("--backward-blocks", default="{}", help="JSON: kernels.ssd_bwd.ssd_backward_own blocks")
    ap.add_argument("--best-of-sweep", default=None, help="print best_of_sweep(this --backward-sweep JSON)")
    args = ap.parse_args(argv)
    if args.best_of_sweep:
        print(json.dumps(best_of_sweep(args.best_of_sweep)))
        return
    FORWARD_BLOCKS.update(json.loads(args.forward_blocks))
    BACKWARD_BLOCKS.update(json.loads(args.backward_blocks))
    modes = {"forward_only": forward_only, "backward_only": backward_only, "own_once": own_once,
             "forward_sweep": lambda s: {"shape": s, "sweep": forward_sweep(s)},
             "backward_sweep": lambda s: {"shape": s, "sweep": backward_sweep(s)}}
    mode = next((m for m in modes if getattr(args, m)), None)
    if mode:
        rows = []
        for shape in args.shapes:
            rows.append(modes[mode](shape))
            print("ROW " + json.dumps(rows[-1], default=str), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1, default=str)
        return
    rows = []
    for shape in args.shapes:
        try:
            row = bench_shape(shape, not args.no_reference)
        except Exception as exc:  # one shape failing keeps the others' results
            import traceback
            traceback.print_exc()
            row = {"shape": shape, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        print(json.dumps(row, indent=1, default=str), flush=True)
        torch.cuda.empty_cache()
    print(f"\n{'shape':12s} {'fwd mamba':>9s} {'fwd ours':>9s} {'bwd mamba':>10s} {'bwd mamba(states)':>18s} "
          f"{'bwd ours':>9s} {'fwd+bwd: mamba / ours':>22s}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:12s} ERROR {r['error']}")
            continue
        ratio = (r["fwd_ms"] + r["bwd_mamba_ms"]) / (r["fwd_own_ms"] + r["bwd_ours_ms"])
        print(f"{r['shape']:12s} {r['fwd_ms']:9.3f} {r['fwd_own_ms']:9.3f} {r['bwd_mamba_ms']:10.3f} "
              f"{r['bwd_mamba_from_states_ms']:18.3f} {r['bwd_ours_ms']:9.3f} {ratio:21.2f}x")
        if "err_ours" in r:
            print("   rel. error vs float64, ours : " + " ".join(f"{k}={v:.1e}" for k, v in r["err_ours"].items()))
            print("   rel. error vs float64, mamba: " + " ".join(f"{k}={v:.1e}" for k, v in r["err_mamba"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
