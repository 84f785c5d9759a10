"""`falcon-bench`: Falcon-H1 training-step throughput, every variant in one process.

Variants share the same weights (a random Hugging Face FalconH1 saved once and
loaded into each) and the same batch; each runs a full training step (forward,
backward, fused AdamW) in bf16, timed with CUDA events after warm-up. The first
step's loss must agree across variants (bf16 tolerance) or the table says so.

    falcon-bench --size 0.5b --seq 4096 --batch 4 --json bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import tempfile
import time
from pathlib import Path

import torch

H100_BF16_PEAK = 989e12
GRAPH_SUFFIX = "_cuda_graph"


def _hf_config(preset):
    from transformers import FalconH1Config

    from falcon_h1.hf import config_to_hf

    fields = config_to_hf(preset)
    fields["time_step_limit"] = tuple(fields["time_step_limit"])
    return FalconH1Config(**fields)


def _time_steps(step_fn, warmup: int, steps: int) -> tuple[float, float, float]:
    """Median ms per step, first-step loss, peak GiB since the caller's reset (which comes before
    a CUDA graph's capture: its private memory pool is allocated then)."""
    first_loss = float(step_fn())
    for _ in range(warmup - 1):
        step_fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step_fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], first_loss, torch.cuda.max_memory_allocated() / 2**30


def _train_step(model, optimizer, forward_loss):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(model)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def _graphed_train_step(model, optimizer, forward_loss, warmup: int = 3):
    """The same step with forward + backward captured once in a CUDA graph and replayed:
    the host launches one graph instead of thousands of kernels. Gradients are produced
    (not accumulated) by the captured backward, so no zeroing is needed between replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotune, allocator warm-up, lazy caches: all before capture
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            forward_loss(model).backward()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = forward_loss(model)
        static_loss.backward()

    def step():
        graph.replay()
        optimizer.step()
        return static_loss.detach().clone()
    return step


def _free(*objs):
    del objs
    gc.collect()
    torch.cuda.empty_cache()


def run(size: str, seq: int, batch: int, warmup: int, steps: int, variants: list[str], layers: int | None,
        profile: tuple[str, ...] = ()):
    from falcon_h1.megatron_compat.parallel import initialize_parallel
    from falcon_h1.flops import training_flops_per_token
    from falcon_h1.hf import from_hf
    from falcon_h1.presets import get_preset

    initialize_parallel(tp=1)
    preset = get_preset(size)
    if layers:
        preset = preset.replace(num_hidden_layers=layers)
    preset = preset.replace(max_position_embeddings=max(seq, preset.max_position_embeddings))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, preset.vocab_size, (batch, seq), generator=g).cuda()
    labels = torch.randint(0, preset.vocab_size, (batch, seq), generator=g).cuda()
    workdir = Path(tempfile.mkdtemp())
    hf_path = _prepare_hf_kernels()
    from transformers import FalconH1ForCausalLM

    torch.manual_seed(0)
    hf = FalconH1ForCausalLM(_hf_config(preset)).to(torch.bfloat16)
    hf.save_pretrained(workdir)
    _free(hf)
    flops_tok = training_flops_per_token(preset, seq)
    results = []

    def ours(fast_path: dict | None = None, **overrides):
        def build():
            _set_fast_path(**(fast_path or {}))
            model = from_hf(workdir, precision="bf16", **overrides).cuda().train()
            return model, lambda m: m(ids, labels=labels).float().mean()
        return build

    def ours_compiled():
        model, fwd = ours()()
        for layer in model.layers:
            layer.mixer.forward = torch.compile(layer.mixer.forward)
            layer.mlp.forward = torch.compile(layer.mlp.forward)
        return model, fwd

    def ours_bitnet(fused: bool):
        def build():
            from recipes.config import BitNetConfig
            from falcon_h1.model import build_model

            model = build_model(preset, BitNetConfig(enabled=True, fused=fused), precision="bf16", seed=0).cuda()
            return model.train(), lambda m: m(ids, labels=labels).float().mean()
        return build

    def ours_bf16_random():
        from falcon_h1.model import build_model

        model = build_model(preset, precision="bf16", seed=0).cuda()
        return model.train(), lambda m: m(ids, labels=labels).float().mean()

    def hf_model():
        model = FalconH1ForCausalLM.from_pretrained(workdir, dtype=torch.bfloat16,
                                                    attn_implementation="sdpa").cuda().train()
        ce = torch.nn.CrossEntropyLoss()
        return model, lambda m: ce(m(ids).logits.float().flatten(0, 1), labels.flatten())

    all_off = dict(triton_conv=False, triton_swiglu=False, fold_scales=False, gate_in_scan=False,
                   fused_mamba_branch=False, fused_rms_norm=False, fused_cross_entropy=False,
                   ssd_keep_forward_states=False)
    builders = {
        "ours_fused": ours(),
        # ablations of this session's changes (each off alone)
        "ours_fused_no_branch_fn": ours({"fused_mamba_branch": False}),
        "ours_fused_no_fused_norm": ours({"fused_rms_norm": False}),
        "ours_fused_ssd_recompute": ours({"ssd_keep_forward_states": False}),
        "ours_fused_no_fused_ce": ours({"fused_cross_entropy": False}),
        # the fast path before the Triton conv / folded scales / SwiGLU kernel (ablation)
        "ours_fused_prev": ours(all_off),
        "ours_fused_conv_only": ours({**all_off, "triton_conv": True}),
        "ours_fused_no_swiglu": ours({"triton_swiglu": False}),
        "ours_fused_compiled": ours_compiled,
        "ours_unfused_unfused_attention": ours(fused_projections=False, attention_backend="unfused"),
        "ours_unfused_sdpa": ours(fused_projections=False),
        "hf_transformers": hf_model,
        "ours_bf16_random_init": ours_bf16_random,
        "ours_bitnet_fused": ours_bitnet(True),
        "ours_bitnet_reference_ste": ours_bitnet(False),
    }
    for index, name in enumerate(variants):
        row = {"variant": name}
        model = optimizer = step = None
        try:
            # any variant + "_cuda_graph": its forward + backward captured once and replayed
            graphed = name.endswith(GRAPH_SUFFIX)
            model, fwd = builders[name.removesuffix(GRAPH_SUFFIX)]()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            torch.cuda.reset_peak_memory_stats()
            step = (_graphed_train_step if graphed else _train_step)(model, optimizer, fwd)
            ms, loss, peak = _time_steps(step, warmup, steps)
            if name in profile and name not in variants[index + 1:]:  # a repeated variant: its last run
                row["top_kernels"] = _profile_step(step)
            tps = batch * seq / (ms / 1e3)
            if name == "hf_transformers":
                row["hf_path"] = hf_path
            row.update(ms=ms, tokens_per_s=tps, tflops=tps * flops_tok / 1e12, mfu=tps * flops_tok / H100_BF16_PEAK,
                       peak_gib=peak, first_loss=loss, params=sum(p.numel() for p in model.parameters()))
        except Exception as err:  # a variant that cannot run is reported, not fatal
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        model = optimizer = step = None  # drop this variant before the next one is built
        _free()
        _set_fast_path()
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
    return results


def _prepare_hf_kernels() -> str:
    """Decide, before transformers' FalconH1 module is imported (it binds its kernels at import),
    which path Hugging Face runs. Its training fast path (mamba_ssm's fused split-conv-scan) needs
    causal_conv1d's CUDA extension; without it mamba_ssm must stay unimportable there, or the fused
    function would be bound and fail, so HF then runs its PyTorch fallback."""
    import importlib.util

    if importlib.util.find_spec("causal_conv1d") is None:
        return "pytorch fallback (causal_conv1d not installed)"
    from falcon_h1.kernels.ssd_triton import triton_available

    if not triton_available():  # registers mamba_ssm's missing Mamba-1 extension module
        return "pytorch fallback (mamba_ssm Triton kernels not importable)"
    return "mamba_ssm fused split-conv1d-scan + causal_conv1d CUDA"


def _set_fast_path(**options):
    """Process-wide kernel options for the next variant (defaults: everything on)."""
    from falcon_h1.kernels import FAST_PATH, FastPathOptions

    for field, value in vars(FastPathOptions(**options)).items():
        setattr(FAST_PATH, field, value)


def _profile_step(step, top: int = 25) -> list[dict]:
    """CUDA time per kernel name over one training step (after the timed steps warmed up)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
    except Exception as err:  # the profile is a diagnostic; never lose the timing row over it
        return [{"total_ms": float("nan"), "error": f"{type(err).__name__}: {err}"[:200]}]
    rows = []
    for ev in events:
        cuda_us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "device_time_total", 0)
        if cuda_us > 0:
            rows.append({"kernel": ev.key[:90], "calls": ev.count, "ms": cuda_us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [{"total_ms": total}] + rows[:top]


class _PrintedAsMeasured(dict):
    """Results printed the moment they are measured, so a call cut off by its time limit keeps them."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"  kernel {key:34s} {value:8.3f}", flush=True)


def _with_fresh_grads(fn, leaves, calls: int = 1):
    """fn called `calls` times, each after resetting the leaves' `.grad` (as do_bench does), so a
    profile of it counts no gradient-accumulation kernels."""
    def run():
        for _ in range(calls):
            for leaf in leaves:
                leaf.grad = None
            fn()
    return run


def _kernel_ms(fn, leaves, calls: int = 10) -> float:
    """Summed CUDA kernel time of one call of fn (mean of `calls`, after the caller's warm-up): the
    GPU time alone. Eager timings of these small launches include the host's launch gaps, which a
    graphed training step does not have. (A CUDA-graph replay would measure the same; mamba_ssm's
    standalone combined scan does not capture: its backward touches the legacy stream.)"""
    rows = _profile_step(_with_fresh_grads(fn, leaves, calls), top=0)
    return rows[0]["total_ms"] / calls


def _mamba_branch_microbench(zxbcdt, h, p, n, groups, chunk, leaves, timed) -> None:
    """The whole Mamba branch (conv + gated scan, kernels.mamba_branch) fwd+bwd on the in-projection
    output [b, s, .] (a strided view of [s, b, .]), with the scan's backward starting from the
    forward's chunk states and with mamba_ssm's recomputation of them."""
    from falcon_h1.kernels import FAST_PATH
    from falcon_h1.kernels.mamba_branch import mamba_conv_scan

    d, bc = h * p, groups * n
    leaf = zxbcdt.detach().requires_grad_()
    w = torch.randn(d + 2 * bc, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(d + 2 * bc, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = -torch.rand(h, device="cuda", requires_grad=True)
    D, dt_bias = torch.ones(h, device="cuda", requires_grad=True), torch.zeros(h, device="cuda", requires_grad=True)
    dy = torch.randn(*zxbcdt.shape[:2], d, device="cuda", dtype=torch.bfloat16)
    leaves[:] = [leaf, w, bias, A, D, dt_bias]
    branch = lambda: mamba_conv_scan(leaf, w, bias, None, A, D, dt_bias, d, bc, h, groups, chunk,
                                     (0.0, math.inf)).backward(dy)
    before = FAST_PATH.ssd_keep_forward_states
    try:
        for keep in (True, False):
            FAST_PATH.ssd_keep_forward_states = keep
            timed(f"mamba_branch_{'kept_states' if keep else 'recomputed_states'}_fwd_bwd", branch)
    finally:
        FAST_PATH.ssd_keep_forward_states = before


def kernel_microbench(seq: int = 4096, batch: int = 4, which: str = "all", ssd_profile: dict | None = None):
    """SSD scan, causal conv + SiLU and SwiGLU, fwd+bwd, at the 0.5B shape (ms, median).

    Each fwd+bwd is timed eagerly (`*_ms`: host launch gaps included, as in an eager step) and
    by its summed kernel time (`*_gpu_ms`: GPU time, as in a graphed step). Inputs are strided
    views of one in-projection-like buffer, as in the mixer. With `which="all"` each conv tile
    configuration is timed too (the module constants are swapped in turn). Unless `which="conv"`,
    `ssd_profile` receives the per-kernel CUDA time of one SSD fwd+bwd.
    """
    ssd_profile = {} if ssd_profile is None else ssd_profile
    import triton.testing

    from falcon_h1 import kernels
    from falcon_h1.kernels import conv_triton

    leaves = []
    bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=leaves, return_mode="median")

    def timed(name, fn):
        out[f"{name}_ms"] = bench(fn)
        out[f"{name}_gpu_ms"] = _kernel_ms(fn, leaves)
    h, p, n, groups, chunk = 24, 64, 128, 1, 128
    out = _PrintedAsMeasured()
    widths = [h * p, h * p, groups * n, groups * n, h]
    proj = torch.randn(seq, batch, sum(widths), device="cuda", dtype=torch.bfloat16)
    z, x, B, C, dt = (t.requires_grad_() for t in proj.transpose(0, 1).split(widths, dim=-1))  # leaf views
    heads = lambda t, k: t.unflatten(-1, (k, -1))
    A = -torch.rand(h, device="cuda", requires_grad=True)
    D, dt_bias = torch.ones(h, device="cuda", requires_grad=True), torch.zeros(h, device="cuda", requires_grad=True)
    dy = torch.randn(batch, seq, h, p, device="cuda", dtype=torch.bfloat16)
    lim = (0.0, math.inf)
    leaves += [z, x, B, C, dt, A, D, dt_bias]

    def ssd(gate):
        y = kernels.ssd_scan(heads(x, h), dt, A, heads(B, groups), heads(C, groups), chunk, D, dt_bias, lim, True,
                             z=heads(z, h) if gate else None)
        (y if gate else y * torch.nn.functional.silu(heads(z, h))).backward(dy)
    if which != "conv":
        out["ssd_then_gate_fwd_bwd_ms"] = bench(lambda: ssd(False))
        timed("ssd_gate_in_kernel_fwd_bwd", lambda: ssd(True))  # mamba_ssm's combined scan, as shipped
        ssd_profile["ssd_gate_in_kernel"] = _profile_step(_with_fresh_grads(lambda: ssd(True), leaves), top=30)
        for k in ssd_profile["ssd_gate_in_kernel"][1:]:
            print(f"  ssd profile {k['ms']:8.3f} ms {k['calls']:3d}x  {k['kernel']}", flush=True)
        _mamba_branch_microbench(proj.transpose(0, 1), h, p, n, groups, chunk, leaves, timed)

    channels = h * p + 2 * groups * n
    xc = proj.transpose(0, 1)[..., h * p: h * p + channels].requires_grad_()
    w = torch.randn(channels, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    leaves[:] = [xc, w, bias]
    dyc = torch.randn(batch, seq, channels, device="cuda", dtype=torch.bfloat16)
    from falcon_h1.kernels.conv_reference import causal_conv1d_silu_reference

    timed("conv_torch_fwd_bwd", lambda: causal_conv1d_silu_reference(xc, w, bias).backward(dyc))
    xd = xc.detach()
    out["conv_triton_fwd_ms"] = bench(lambda: conv_triton.conv_silu_forward(xd, w.detach(), bias.detach()))
    out["conv_triton_bwd_ms"] = bench(lambda: conv_triton.conv_silu_backward(dyc, xd, w.detach(), bias.detach()))
    names = ("FWD_BLOCK_L", "FWD_BLOCK_C", "FWD_WARPS", "BWD_BLOCK_L", "BWD_BLOCK_C", "BWD_WARPS",
             "BWD_ROWS_PER_PROGRAM")
    defaults = {k: getattr(conv_triton, k) for k in names}
    sweep_tiles = which in ("all", "conv")
    for bl, bc, nw in [(16, 128, 4), (64, 128, 4), (32, 256, 8), (64, 64, 4)] if sweep_tiles else []:
        conv_triton.FWD_BLOCK_L, conv_triton.FWD_BLOCK_C, conv_triton.FWD_WARPS = bl, bc, nw
        out[f"conv_fwd_{bl}x{bc}w{nw}_ms"] = bench(lambda: conv_triton.conv_silu_forward(xd, w.detach(), bias.detach()))
    # pass 1 of the backward; 32x128 w8 r32 and 64x64 w8 r64 need ~128 registers offline (NOTES.md)
    bwd_tiles = [(32, 128, 4, 32), (32, 128, 8, 32), (64, 64, 8, 64), (64, 128, 8, 64)]
    for bl, bc, nw, rows in bwd_tiles if sweep_tiles else []:
        conv_triton.BWD_BLOCK_L, conv_triton.BWD_BLOCK_C, conv_triton.BWD_WARPS = bl, bc, nw
        conv_triton.BWD_ROWS_PER_PROGRAM = rows
        out[f"conv_bwd_tiles_{bl}x{bc}w{nw}r{rows}_ms"] = bench(
            lambda: conv_triton.conv_silu_backward(dyc, xd, w.detach(), bias.detach()))
    for k, v in defaults.items():
        setattr(conv_triton, k, v)
    timed("conv_triton_fwd_bwd", lambda: kernels.causal_conv1d_silu(xc, w, bias, True).backward(dyc))

    if which == "conv":
        return dict(out)
    ffn = 2048
    hm = torch.randn(seq, batch, 2 * ffn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dm = torch.randn(seq, batch, ffn, device="cuda", dtype=torch.bfloat16)
    leaves[:] = [hm]

    def swiglu_eager():
        gate, up = hm.chunk(2, dim=-1)
        (torch.nn.functional.silu(gate * 0.88) * up * 0.58).backward(dm)
    out["swiglu_eager_scaled_fwd_bwd_ms"] = bench(swiglu_eager)
    timed("swiglu_triton_fwd_bwd", lambda: kernels.swiglu(hm, True).backward(dm))
    # bytes-moved floors at the copy bandwidth are in benchmarks/NOTES.md
    return dict(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", default="ours_fused,ours_fused_compiled,ours_unfused_unfused_attention,"
                                               "hf_transformers")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default="", help="comma-separated variants to profile one step of; "
                        "later variants then time slower (the profiler stays attached): list profiled ones last")
    parser.add_argument("--kernels", default="all", choices=["all", "no_sweep", "conv", "none"],
                        help="kernel microbenchmarks to run after the variants (no_sweep: without the conv "
                        "tile sweep)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("falcon-bench needs a CUDA GPU.")
    started = time.time()
    variants = [v for v in args.variants.split(",") if v]
    rows = run(args.size, args.seq, args.batch, args.warmup, args.steps, variants, args.layers,
               tuple(v for v in args.profile.split(",") if v)) if variants else []
    kernel_profiles: dict = {}
    micro = {} if args.kernels == "none" else kernel_microbench(args.seq, args.batch, args.kernels, kernel_profiles)
    ref = {r["variant"]: r for r in rows if "error" not in r}
    print(f"\n{torch.cuda.get_device_name()}  size={args.size} seq={args.seq} batch={args.batch} bf16")
    print(f"{'variant':34s} {'ms/step':>9s} {'tok/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'GiB':>6s} "
          f"{'loss0':>7s} {'vs HF':>6s} {'vs base':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:34s} ERROR {r['error']}")
            continue
        vs_hf = r["tokens_per_s"] / ref["hf_transformers"]["tokens_per_s"] if "hf_transformers" in ref else math.nan
        base = ref.get("ours_unfused_unfused_attention") or ref.get("ours_fused_prev")
        vs_unf = r["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
        print(f"{r['variant']:34s} {r['ms']:9.1f} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {r['mfu']:6.1%} "
              f"{r['peak_gib']:6.1f} {r['first_loss']:7.4f} {vs_hf:6.2f} {vs_unf:8.2f}")
    print("vs base: tokens/s over ours_unfused_unfused_attention (Megatron-Bridge's layout) if it ran, "
          "else over ours_fused_prev")
    for r in rows:
        if r.get("hf_path"):
            print(f"hf_transformers ran: {r['hf_path']}")
    for r in rows:
        if "top_kernels" in r:
            print(f"\nprofile of one step, {r['variant']}: {r['top_kernels'][0]['total_ms']:.1f} ms of kernels")
            for k in r["top_kernels"][1:]:
                print(f"  {k['ms']:8.2f} ms {k['calls']:5d}x  {k['kernel']}")
    for name, profile in kernel_profiles.items():
        print(f"\nprofile of one {name} fwd+bwd: {profile[0]['total_ms']:.3f} ms of kernels")
        for k in profile[1:]:
            print(f"  {k['ms']:8.3f} ms {k['calls']:3d}x  {k['kernel']}")
    print("\nkernels (ms):")
    for k, v in micro.items():
        print(f"  {k:34s} {v:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args),
            "rows": rows, "kernels": micro, "kernel_profiles": kernel_profiles, "wall_s": time.time() - started}, indent=2))


if __name__ == "__main__":
    main()
