"""`falcon-bench`: Falcon-H1 training-step throughput, every variant in one process.

Variants share the same weights (a random Hugging Face FalconH1 saved once and
loaded into each) and the same batch; each runs a full training step (forward,
backward, fused AdamW) in bf16, timed with CUDA events after warm-up. The first
step's loss must agree across variants (bf16 tolerance) or the table says so.
Variants of our model differ by the KernelOptions or model config they are built with.

    falcon-bench --size 0.5b --seq 4096 --batch 4 --json bench.json
    python -m benchmarks.falcon_bench ...     (the same, from a checkout)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import signal
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.kernel_bench import kernel_microbench
from benchmarks.timing import graphed_train_step, profile_kernels, time_steps

GRAPH_SUFFIX = "_cuda_graph"


def _hf_config(preset):
    from transformers import FalconH1Config

    from falcon_h1.hf import config_to_hf

    fields = config_to_hf(preset)
    fields["time_step_limit"] = tuple(fields["time_step_limit"])
    return FalconH1Config(**fields)


def _train_step(model, optimizer, forward_loss):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(model)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def _free(*objs):
    del objs
    gc.collect()
    torch.cuda.empty_cache()


class VariantTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise VariantTimeout in this (main) thread once `seconds` have passed, at the next Python
    bytecode after the running operator returns; None: no limit."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise VariantTimeout(f"did not finish within --variant-timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(size: str, seq: int, batch: int, warmup: int, steps: int, variants: list[str], layers: int | None,
        profile: tuple[str, ...] = (), variant_timeout: float | None = None, on_row=None, profile_top: int = 25):
    """One row per variant; `on_row(rows so far)` after each (a partial table survives a kill);
    a variant past `variant_timeout` seconds (build and timing) is reported as an error."""
    from falcon_h1.megatron_compat.parallel import initialize_parallel
    from falcon_h1.flops import dense_bf16_peak_flops, training_flops_per_token
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
    peak = dense_bf16_peak_flops(torch.cuda.get_device_name()) or math.nan
    our_loss = lambda m: m(ids, labels=labels).float().mean()
    builders = _variants(workdir, preset, our_loss, ids, labels)
    results = []
    for index, name in enumerate(variants):
        row = {"variant": name}
        try:
            with time_limit(variant_timeout):
                row.update(_measure(builders, name, warmup, steps,
                                    profile_top if name in profile and name not in variants[index + 1:] else 0))
            tps = batch * seq / (row["ms"] / 1e3)
            if name.startswith("hf_transformers"):
                row["hf_path"] = hf_path
            row.update(tokens_per_s=tps, tflops=tps * flops_tok / 1e12, mfu=tps * flops_tok / peak)
        except Exception as err:  # a variant that cannot run (or too slow) is reported, not fatal
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        _free()  # this variant's model and optimizer are gone before the next one is built
        results.append(row)
        if on_row is not None:
            on_row(results)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
    return results


def _measure(builders, name: str, warmup: int, steps: int, profile_top: int) -> dict:
    """Build one variant (any variant + "_cuda_graph": its forward + backward captured once and
    replayed) and time its training step; profile_top > 0: then profile one step, keeping its
    largest kernels. The model is dropped on return."""
    graphed = name.endswith(GRAPH_SUFFIX)
    model, fwd = builders[name.removesuffix(GRAPH_SUFFIX)]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    torch.cuda.reset_peak_memory_stats()
    step = (graphed_train_step if graphed else _train_step)(model, optimizer, fwd)
    ms, loss, peak_gib = time_steps(step, warmup, steps)
    row = {"ms": ms, "peak_gib": peak_gib, "first_loss": loss, "params": sum(p.numel() for p in model.parameters())}
    if profile_top:  # a repeated variant: its last run
        row["top_kernels"] = profile_kernels(step, top=profile_top)
    return row


def _variants(workdir: Path, preset, our_loss, ids, labels) -> dict:
    """Variant name -> a function building (model, loss of a model) on the GPU. Ours load the saved
    Hugging Face weights; each is built with its own KernelOptions or model config."""
    from falcon_h1.hf import config_from_hf, load_hf_weights
    from falcon_h1.kernels import KernelOptions
    from falcon_h1.model import build_model
    from transformers import FalconH1ForCausalLM

    def ours(options: dict | None = None, recompute: str = "none", recompute_layers: int | None = None,
             **overrides):
        def build():
            cfg = config_from_hf(json.loads((workdir / "config.json").read_text()), **overrides)
            model = build_model(cfg, kernel_options=KernelOptions(**(options or {})), precision="bf16",
                                initialize=False, recompute=recompute, recompute_layers=recompute_layers)
            load_hf_weights(model, workdir)
            return model.train(), our_loss
        return build

    def ours_compiled():
        model, fwd = ours()()
        for layer in model.layers:
            layer.mixer.forward = torch.compile(layer.mixer.forward)
            layer.mlp.forward = torch.compile(layer.mlp.forward)
        return model, fwd

    def ours_bitnet(fused: bool, options: dict | None = None, saved_input: str = "auto"):
        def build():
            from bitnet.spec import falcon_h1_linear_spec
            from recipes.config import BitNetConfig

            bitnet = BitNetConfig(enabled=True, fused=fused, saved_input=saved_input)
            linears = falcon_h1_linear_spec(bitnet, preset.kernel_backend)
            return build_model(preset, linears=linears, kernel_options=KernelOptions(**(options or {})),
                               precision="bf16", seed=0).train(), our_loss
        return build

    def ours_bf16_random():
        return build_model(preset, precision="bf16", seed=0).train(), our_loss

    def hf_model(checkpointing: bool = False):
        model = FalconH1ForCausalLM.from_pretrained(workdir, dtype=torch.bfloat16,
                                                    attn_implementation="sdpa").cuda().train()
        if checkpointing:  # recompute each decoder layer in the backward, as ours with recompute="full"
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ce = torch.nn.CrossEntropyLoss()
        return model, lambda m: ce(m(ids).logits.float().flatten(0, 1), labels.flatten())

    # every switch off except mamba_ssm's scan (the GPU path itself): torch conv, eager SwiGLU,
    # RMSNorm and gating, µP scales on the activations, Megatron's cross entropy
    options_off = {f.name: False for f in dataclasses.fields(KernelOptions)
                   if f.type in (bool, "bool") and f.name != "triton_ssd"}
    return {
        "ours_fused": ours(),
        # one KernelOptions switch off at a time
        "ours_fused_no_branch_fn": ours({"fused_mamba_branch": False}),
        # the Mamba path the gated-norm presets (mamba_rms_norm) took before they took the fused branch:
        # unfused, the µP multipliers on the activations, the gated norm op by op
        "ours_fused_unfused_gated_norm": ours({"fused_mamba_branch": False, "fold_scales": False,
                                               "gate_in_scan": False}),
        "ours_fused_concatenated_in_grad": ours({"shared_in_projection_gradient": False}),
        "ours_fused_rope_op_by_op": ours({"triton_rotary": False}),
        "ours_fused_torch_norm": ours({"triton_rms_norm": False}),  # torch's fused RMSNorm after a separate add
        "ours_fused_keep_conv": ours({"mamba_keep_conv_output": True}),
        "ours_fused_tiled_conv": ours({"streaming_conv": False}),  # the conv in row tiles, backward in two passes
        "ours_fused_torch_cat_out_input": ours({"triton_out_projection_input": False}),
        "ours_fused_rotary_head_programs": ours({"rotary_one_launch": False}),  # a program a head, two launches
        "ours_fused_residual_add_per_layer": ours({"residual_across_layers": False}),  # h + mlp(h) in each layer
        "ours_fused_triton_row_scale": ours({"triton_row_scale": True}),  # W * s in kernels.row_scale's pass
        # the step before both (the 2026-12-07 run's defaults; it named the two on `ours_fused_candidates`)
        "ours_fused_before_out_copy_and_rotary": ours({"triton_out_projection_input": False,
                                                       "rotary_one_launch": False}),
        "ours_fused_no_fused_norm": ours({"fused_rms_norm": False, "triton_rms_norm": False}),
        "ours_fused_ssd_recompute": ours({"ssd_keep_forward_states": False, "own_ssd_backward": False}),
        "ours_fused_own_ssd": ours({"own_ssd_forward": True, "own_ssd_backward": True}),
        "ours_fused_own_ssd_backward": ours({"own_ssd_backward": True}),
        "ours_fused_mamba_ssd": ours({"own_ssd_forward": False, "own_ssd_backward": False}),
        "ours_fused_no_fused_ce": ours({"fused_cross_entropy": False}),
        "ours_fused_no_swiglu": ours({"triton_swiglu": False}),
        "ours_fused_options_off": ours(options_off),
        "ours_fused_conv_only": ours({**options_off, "triton_conv": True}),
        "ours_fused_compiled": ours_compiled,
        "ours_unfused_unfused_attention": ours(fused_projections=False, attention_backend="unfused"),
        "ours_unfused_sdpa": ours(fused_projections=False),
        "hf_transformers": hf_model,
        # long sequences: every layer recomputed in the backward (Megatron's full recompute / HF's
        # gradient checkpointing), the activations of one layer at a time
        "ours_fused_recompute_full": ours(recompute="full"),
        **{f"ours_fused_recompute_{n}": ours(recompute="full", recompute_layers=n)  # the first n layers only
           for n in range(1, preset.num_hidden_layers + 1)},
        "hf_transformers_checkpointing": lambda: hf_model(checkpointing=True),
        "ours_bf16_random_init": ours_bf16_random,
        "ours_bitnet_fused": ours_bitnet(True),
        # bitnet.saved_input: the backward keeps each quantised input as int8 (dequantised for the weight
        # gradient) or as the fake-quantised bf16 input (no dequantising pass, 1 byte an element more)
        "ours_bitnet_fused_int8_input": ours_bitnet(True, saved_input="int8"),
        "ours_bitnet_fused_float_input": ours_bitnet(True, saved_input="float"),
        "ours_bitnet_reference_ste": ours_bitnet(False),
        # µP multipliers on the activations (eager SwiGLU) instead of BitNet's output_row_scale
        "ours_bitnet_scales_on_activations": ours_bitnet(True, {"fold_scales": False}),
    }


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
    parser.add_argument("--json", default=None, help="written after each variant, and at the end")
    parser.add_argument("--variant-timeout", type=float, default=None,
                        help="seconds a variant may take (build + steps) before it is reported as an error")
    parser.add_argument("--profile", default="", help="comma-separated variants to profile one step of; "
                        "later variants then time slower (the profiler stays attached): list profiled ones last")
    parser.add_argument("--profile-top", type=int, default=25, help="kernels listed in each profile")
    parser.add_argument("--kernels", default="all", choices=["all", "no_sweep", "conv", "none"],
                        help="kernel microbenchmarks to run after the variants (no_sweep: without the conv "
                        "tile sweep)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("falcon-bench needs a CUDA GPU.")
    started = time.time()
    variants = [v for v in args.variants.split(",") if v]

    def write_json(rows, micro=None, kernel_profiles=None):
        if args.json:
            Path(args.json).write_text(json.dumps({
                "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                "rows": rows, "kernels": micro or {}, "kernel_profiles": kernel_profiles or {},
                "wall_s": time.time() - started}, indent=2))

    rows = run(args.size, args.seq, args.batch, args.warmup, args.steps, variants, args.layers,
               tuple(v for v in args.profile.split(",") if v), args.variant_timeout, write_json,
               args.profile_top) if variants else []
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
        base = ref.get("ours_unfused_unfused_attention") or ref.get("ours_fused_options_off")
        vs_unf = r["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
        print(f"{r['variant']:34s} {r['ms']:9.1f} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {r['mfu']:6.1%} "
              f"{r['peak_gib']:6.1f} {r['first_loss']:7.4f} {vs_hf:6.2f} {vs_unf:8.2f}")
    print("vs base: tokens/s over ours_unfused_unfused_attention (Megatron-Bridge's layout) if it ran, "
          "else over ours_fused_options_off")
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
    write_json(rows, micro, kernel_profiles)


if __name__ == "__main__":
    main()
