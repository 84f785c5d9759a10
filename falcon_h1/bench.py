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


def _hf_config(preset):
    from transformers import FalconH1Config

    from falcon_h1.hf import config_to_hf

    fields = config_to_hf(preset)
    fields["time_step_limit"] = tuple(fields["time_step_limit"])
    return FalconH1Config(**fields)


def _time_steps(step_fn, warmup: int, steps: int) -> tuple[float, float, float]:
    """Median ms per step, first-step loss, peak GiB."""
    torch.cuda.reset_peak_memory_stats()
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


def _free(*objs):
    del objs
    gc.collect()
    torch.cuda.empty_cache()


def run(size: str, seq: int, batch: int, warmup: int, steps: int, variants: list[str], layers: int | None):
    from falcon_h1.compat import initialize_parallel
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
    from transformers import FalconH1ForCausalLM

    torch.manual_seed(0)
    hf = FalconH1ForCausalLM(_hf_config(preset)).to(torch.bfloat16)
    hf.save_pretrained(workdir)
    _free(hf)
    flops_tok = training_flops_per_token(preset, seq)
    results = []

    def ours(**overrides):
        def build():
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

    builders = {
        "ours_fused": ours(),
        "ours_fused_compiled": ours_compiled,
        "ours_unfused_unfused_attention": ours(fused_projections=False, attention_backend="unfused"),
        "ours_unfused_sdpa": ours(fused_projections=False),
        "hf_transformers": hf_model,
        "ours_bf16_random_init": ours_bf16_random,
        "ours_bitnet_fused": ours_bitnet(True),
        "ours_bitnet_reference_ste": ours_bitnet(False),
    }
    for name in variants:
        row = {"variant": name}
        try:
            model, fwd = builders[name]()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            ms, loss, peak = _time_steps(_train_step(model, optimizer, fwd), warmup, steps)
            tps = batch * seq / (ms / 1e3)
            row.update(ms=ms, tokens_per_s=tps, tflops=tps * flops_tok / 1e12, mfu=tps * flops_tok / H100_BF16_PEAK,
                       peak_gib=peak, first_loss=loss, params=sum(p.numel() for p in model.parameters()))
            _free(model, optimizer)
        except Exception as err:  # a variant that cannot run is reported, not fatal
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            _free()
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def kernel_microbench(seq: int = 4096, batch: int = 4):
    """SSD scan and causal conv + SiLU, fwd+bwd, at the 0.5B shape (ms, median)."""
    import triton.testing

    from falcon_h1 import kernels

    h, p, n, groups, chunk = 24, 64, 128, 1, 128
    out = {}
    x = torch.randn(batch, seq, h, p, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dt = torch.randn(batch, seq, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = -torch.rand(h, device="cuda", requires_grad=True)
    B = torch.randn(batch, seq, groups, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    C = torch.randn(batch, seq, groups, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    D, dt_bias = torch.ones(h, device="cuda", requires_grad=True), torch.zeros(h, device="cuda", requires_grad=True)
    dy = torch.randn(batch, seq, h, p, device="cuda", dtype=torch.bfloat16)

    def ssd():
        kernels.ssd_scan(x, dt, A, B, C, chunk, D, dt_bias, (0.0, math.inf), True).backward(dy)
    out["ssd_fwd_bwd_ms"] = triton.testing.do_bench(ssd, return_mode="median")
    channels = h * p + 2 * groups * n
    xc = torch.randn(batch, seq, channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(channels, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dyc = torch.randn_like(xc)

    def conv():
        kernels.causal_conv1d_silu(xc, w, bias, True).backward(dyc)
    out["conv_silu_fwd_bwd_ms"] = triton.testing.do_bench(conv, return_mode="median")
    return out


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
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("falcon-bench needs a CUDA GPU.")
    started = time.time()
    rows = run(args.size, args.seq, args.batch, args.warmup, args.steps, args.variants.split(","), args.layers)
    micro = kernel_microbench(args.seq, args.batch)
    ref = {r["variant"]: r for r in rows if "error" not in r}
    print(f"\n{torch.cuda.get_device_name()}  size={args.size} seq={args.seq} batch={args.batch} bf16")
    print(f"{'variant':34s} {'ms/step':>9s} {'tok/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'GiB':>6s} "
          f"{'loss0':>7s} {'vs HF':>6s} {'vs unfused':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:34s} ERROR {r['error']}")
            continue
        vs_hf = r["tokens_per_s"] / ref["hf_transformers"]["tokens_per_s"] if "hf_transformers" in ref else math.nan
        base = ref.get("ours_unfused_unfused_attention")
        vs_unf = r["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
        print(f"{r['variant']:34s} {r['ms']:9.1f} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {r['mfu']:6.1%} "
              f"{r['peak_gib']:6.1f} {r['first_loss']:7.4f} {vs_hf:6.2f} {vs_unf:10.2f}")
    print("kernels (fwd+bwd, ms):", json.dumps(micro))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args),
            "rows": rows, "kernels": micro, "wall_s": time.time() - started}, indent=2))


if __name__ == "__main__":
    main()
