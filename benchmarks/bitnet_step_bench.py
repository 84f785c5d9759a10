"""BitNet b1.58 against bf16 on one GPU, side by side in one process (issue 17, benchmarks/NOTES.md
"BitNet quantise-once"):

    python -m benchmarks.bitnet_step_bench --size 0.5b --seq 4096 --batch 4 --json bitnet.json

Table 1, the training step. Every variant is the same preset built from the same seed, trained
with torch's fused AdamW on the same batch:
- graph: forward + backward captured once in a CUDA graph and replayed, the optimizer step eager
  (benchmarks.timing.graphed_train_step, as falcon-bench's *_cuda_graph variants): one micro-batch
  of batch x seq tokens;
- eager_accum: `--micro-batches` micro-batches of the same tokens accumulated into one optimizer
  step, eagerly: the weight is quantised once per step and reused by the later micro-batches;
  `bitnet_every_forward` quantises at every forward instead (weights_changed() before each).
  Eager steps are host-bound on these machines, so beside the wall time the summed GPU kernel
  time of one step (torch.profiler) is printed.
Variants: bf16; bitnet (defaults: fake-quantised bf16 GEMM, int8 input kept for the backward, µP
multipliers as fc1's and the mixer in-projections' output_row_scale); bitnet_int8_gemm (int8 x
ternary forward GEMM); bitnet_reference_ste (x + (q(x) - x).detach()); graphed only,
bitnet_scales_on_activations (KernelOptions(fold_scales=False): the multipliers on activations,
eager SwiGLU).
Peak GiB: torch.cuda.max_memory_allocated from after the model and optimizer are built.

Table 2, per projection of the preset (its first layer's BitNet linears, batch x seq tokens):
each quantisation kernel (what quantising once saves at every reuse, what keeping int8 adds),
the forward GEMM in bf16 and int8, each linear's forward + backward (Megatron's bf16 linear, the
BitNet variants), and the bytes each keeps for its backward; "x layers" = per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json

import torch

from benchmarks.timing import graphed_train_step, profile_kernels, time_steps

STEP_VARIANTS = {
    "bf16": None,
    "bitnet": {},
    "bitnet_int8_gemm": {"int8_matmul": True},
    "bitnet_reference_ste": {"fused": False},
}
UNFOLDED = "bitnet_scales_on_activations"  # the bitnet variant with KernelOptions(fold_scales=False)


# ------------------------------------------------------------------------------ helpers
def _build(preset, bitnet: dict | None, fold_scales: bool = True):
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.kernels import KernelOptions
    from falcon_h1.model import build_model
    from recipes.config import BitNetConfig

    cfg = None if bitnet is None else BitNetConfig(enabled=True, **bitnet)
    linears = falcon_h1_linear_spec(cfg, preset.kernel_backend)
    return build_model(preset, linears=linears, kernel_options=KernelOptions(fold_scales=fold_scales),
                       precision="bf16", seed=0).cuda().train()


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _accumulating_step(model, optimizer, micro_losses, every_forward: bool):
    from bitnet.weight_cache import weights_changed

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for loss_fn in micro_losses:
            if every_forward:
                weights_changed()
            loss = loss_fn(model) / len(micro_losses)
            loss.backward()
            total = total + loss.detach()
        optimizer.step()
        return total
    return step


def _print_row(row: dict) -> None:
    print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)


# ---------------------------------------------------------------------------- table 1
def step_table(preset, batch: int, seq: int, micro_batches: int, warmup: int, steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, preset.vocab_size, (batch, seq), generator=g).cuda()
    labels = torch.randint(0, preset.vocab_size, (batch, seq), generator=g).cuda()
    whole = lambda m: m(ids, labels=labels).float().mean()
    if batch % micro_batches:
        raise SystemExit(f"--micro-batches {micro_batches} must divide --batch {batch}")
    per = batch // micro_batches
    micro = [lambda m, i=i: m(ids[i * per:(i + 1) * per], labels=labels[i * per:(i + 1) * per]).float().mean()
             for i in range(micro_batches)]
    runs = [(name, "graph") for name in STEP_VARIANTS] + [(name, "eager_accum") for name in STEP_VARIANTS]
    runs.insert(runs.index(("bitnet", "eager_accum")) + 1, ("bitnet_every_forward", "eager_accum"))
    runs.insert(runs.index(("bitnet", "graph")) + 1, (UNFOLDED, "graph"))
    rows, baseline = [], {}
    print(f"Table 1: training step, {preset.name}, {batch} x {seq} tokens ({micro_batches} micro-batches "
          f"in eager_accum), {torch.cuda.get_device_name()}", flush=True)
    for name, mode in runs:
        row = {"variant": name, "mode": mode}
        model = optimizer = step = None
        try:
            model = _build(preset, STEP_VARIANTS.get(name, {}), fold_scales=name != UNFOLDED)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            torch.cuda.reset_peak_memory_stats()
            if mode == "graph":
                step = graphed_train_step(model, optimizer, whole)
            else:
                step = _accumulating_step(model, optimizer, micro, every_forward=name == "bitnet_every_forward")
            row["ms"], row["first_loss"], row["peak_gib"] = time_steps(step, warmup, steps)
            if mode == "eager_accum":
                row["kernel_ms"] = profile_kernels(step, top=0)[0]["total_ms"]
            if name == "bf16":
                baseline[mode] = row
            elif mode in baseline:
                row["ms_vs_bf16"] = row["ms"] / baseline[mode]["ms"]
                row["peak_vs_bf16"] = row["peak_gib"] / baseline[mode]["peak_gib"]
                if "kernel_ms" in row:
                    row["kernel_ms_vs_bf16"] = row["kernel_ms"] / baseline[mode]["kernel_ms"]
        except Exception as err:  # a variant that cannot run is reported, not fatal
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        model = optimizer = step = None
        _free()
        rows.append(row)
        _print_row(row)
    return rows


# ---------------------------------------------------------------------------- table 2
def _layout(layer):
    from bitnet.layers import BitNetRowParallelLinear
    from bitnet.segments import single_segment

    if layer.bitnet_segments is not None:
        return layer.bitnet_segments
    row = isinstance(layer, BitNetRowParallelLinear)
    return single_segment(layer.weight.shape[1 if row else 0], 1 if row else 0)


def _rebuilt(layer, plain: bool = False, **option_changes):
    """A linear of the same shape and segments with other options (or Megatron's own), same weight."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from bitnet.layers import BitNetRowParallelLinear

    row = isinstance(layer, BitNetRowParallelLinear)
    kwargs = dict(config=layer.config, init_method=torch.nn.init.zeros_, bias=False, skip_bias_add=True)
    kwargs.update(input_is_parallel=True) if row else kwargs.update(gather_output=False)
    if plain:
        new = (RowParallelLinear if row else ColumnParallelLinear)(layer.input_size, layer.output_size, **kwargs)
    else:
        segments = None if layer.bitnet_segments is None else list(layer.bitnet_segments.segments)
        new = type(layer)(layer.input_size, layer.output_size, bitnet_options=dataclasses.replace(
            layer.bitnet_options, **option_changes), bitnet_segments=segments, **kwargs)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
    return new.cuda()


def _kept_mib(forward, params) -> float:
    """MiB autograd keeps for the backward of `forward()`, parameters (no copies) left out."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    for p in params:
        unique.pop(p.untyped_storage().data_ptr(), None)
    return sum(unique.values()) / 2**20


def _mlp_rows(mlp, preset, batch: int, seq: int, bench) -> list[tuple[str, float, float]]:
    """(label, fwd+bwd ms, kept MiB) of one MLP block three ways: the bf16 model's (µP scales on
    fc1's weight rows, the Triton SwiGLU), BitNet with the scales on the activations (what
    KernelOptions(fold_scales=False) runs: eager silu(gate * m_gate) * up * m_down), and the
    BitNet model's own (`mlp`: the scales as fc1's output_row_scale, the Triton SwiGLU)."""
    import torch.nn.functional as F

    from falcon_h1.kernels.swiglu_triton import swiglu_triton

    if not (mlp.scales_in_weights and mlp.triton_swiglu):
        raise SystemExit("bitnet_step_bench: the BitNet model's MLP does not fold its µP scales into fc1")
    m_gate, m_down = preset.mlp_multipliers
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    plain1, plain2 = _rebuilt(fc1, plain=True), _rebuilt(fc2, plain=True)
    u = torch.randn(seq, batch, preset.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(seq, batch, preset.hidden_size, device="cuda", dtype=torch.bfloat16)

    def bf16_folded():
        return plain2(swiglu_triton(plain1(u, weight=plain1.weight * mlp.fc1_row_scale)[0]))[0]

    def bitnet_scales_on_activations():
        gate, up = fc1(u)[0].chunk(2, dim=-1)
        return fc2(F.silu(gate * m_gate) * up * m_down)[0]

    rows = []
    for label, forward, params in (
            ("MLP block: bf16, scales folded, Triton SwiGLU (the bf16 model)", bf16_folded, (plain1.weight, plain2.weight)),
            ("MLP block: BitNet, scales on activations, eager SwiGLU", bitnet_scales_on_activations,
             (fc1.weight, fc2.weight)),
            ("MLP block: BitNet, output_row_scale, Triton SwiGLU (the model)", lambda: mlp(u), (fc1.weight, fc2.weight))):
        ms = bench(lambda fwd=forward: fwd().backward(grad), (u, *params))
        rows.append((label, ms, _kept_mib(forward, params)))
    return rows


def layer_table(preset, batch: int, seq: int) -> list[dict]:
    from triton.testing import do_bench

    from bitnet import kernels
    from bitnet.layers import BitNetRowParallelLinear, bitnet_layers
    from bitnet.segments import single_segment
    from bitnet.weight_cache import weights_changed

    bench = lambda fn, grads=(): do_bench(fn, warmup=10, rep=50, grad_to_none=list(grads))
    one_layer = _build(preset.replace(num_hidden_layers=1), {})
    n_layers = preset.num_hidden_layers
    rows = []
    print(f"Table 2: per projection, {batch} x {seq} tokens, ms (x {n_layers} layers = per step)", flush=True)
    for name, layer in bitnet_layers(one_layer):
        if not name.startswith("layers.0."):
            continue
        layout, backend = _layout(layer), layer.bitnet_options.kernel_backend
        in_layout = layout if isinstance(layer, BitNetRowParallelLinear) else single_segment(layer.input_size, 1)
        k, n = layer.input_size, layer.weight.shape[0]
        x = torch.randn(seq, batch, k, device="cuda", dtype=torch.bfloat16)
        w = layer.weight.detach()
        stats = kernels.weight_stats(w, layout)
        q, scale, fq = kernels.quantize_and_dequantize_activations(x, None, in_layout)
        w_fq = kernels.fake_quantize_weights(w, stats, layout)
        w_q, w_scales = kernels.quantize_weights(w, stats, layout)
        row_scale = layout.along_weight(w_scales).reshape(-1) if layout.dim == 0 else w_scales[0]
        x2, q2, s2 = x.reshape(-1, k), q.reshape(-1, k), scale.reshape(-1, len(in_layout))[:, 0].contiguous()
        grad_out = torch.randn(seq, batch, n, device="cuda", dtype=torch.bfloat16)
        timings = {
            "weight stats + fake-quantise (per quantisation)": bench(
                lambda: kernels.fake_quantize_weights(w, kernels.weight_stats(w, layout), layout)),
            "activations -> int8 + dequantised (forward)": bench(
                lambda: kernels.quantize_and_dequantize_activations(x, None, in_layout)),
            "activations -> dequantised only (float input kept)": bench(
                lambda: kernels.fake_quantize_activations(x, None, in_layout)),
            "activations -> int8 only (int8 GEMM)": bench(lambda: kernels.quantize_activations(x, None, in_layout)),
            "int8 -> dequantised (backward, int8 kept)": bench(
                lambda: kernels.dequantize_activations(q, scale, torch.bfloat16, in_layout, backend)),
            "GEMM fwd bf16": bench(lambda: torch.nn.functional.linear(fq, w_fq)),
            "GEMM dgrad bf16": bench(lambda: grad_out.matmul(w_fq)),
            "GEMM wgrad bf16": bench(lambda: grad_out.reshape(-1, n).t().matmul(x2)),
        }
        if len(in_layout) == 1:
            timings["GEMM fwd int8 (Triton, rescale fused)"] = bench(
                lambda: kernels.int8_linear(q2, s2, w_q, row_scale, out_dtype=torch.bfloat16))
            timings["GEMM fwd int8 (torch._int_mm, then rescale)"] = bench(
                lambda: (torch._int_mm(q2, w_q.t()).float() * s2.unsqueeze(-1) * row_scale).to(torch.bfloat16))
        linears = {
            "Megatron bf16 linear": _rebuilt(layer, plain=True),
            "BitNet (weight cached, int8 input kept)": _rebuilt(layer),
            "BitNet, float input kept": _rebuilt(layer, keep_int8_input=False),
            "BitNet, int8 forward GEMM": _rebuilt(layer, int8_matmul=True),
            "BitNet, reference STE": _rebuilt(layer, fused=False),
        }
        xg = x.clone().requires_grad_(True)
        kept = {}
        for label, linear in linears.items():
            fwd_bwd = lambda lin=linear: lin(xg)[0].backward(grad_out)
            timings[f"fwd+bwd: {label}"] = bench(fwd_bwd, (xg, linear.weight))
            kept[label] = _kept_mib(lambda lin=linear: lin(xg), (linear.weight,))
        cached = linears["BitNet (weight cached, int8 input kept)"]
        timings["fwd+bwd: BitNet, weight quantised at this forward"] = bench(
            lambda: (weights_changed(), cached(xg)[0].backward(grad_out)), (xg, cached.weight))
        print(f" {name} ({type(layer).__name__}, K={k}, N={n}, segments {layout})", flush=True)
        for label, ms in timings.items():
            row = {"layer": name, "what": label, "ms": ms, "ms_per_step": ms * n_layers}
            rows.append(row)
            print(f"   {label:56s} {ms:8.4f} ms  x{n_layers} = {ms * n_layers:7.2f} ms", flush=True)
        for label, mib in kept.items():
            rows.append({"layer": name, "what": f"kept for backward: {label}", "mib": mib,
                         "gib_per_step": mib * n_layers / 1024})
            print(f"   kept for backward: {label:37s} {mib:9.2f} MiB x{n_layers} = {mib * n_layers / 1024:6.2f} GiB",
                  flush=True)
    print(" the MLP block (fc1, SwiGLU with µP multipliers, fc2), fwd+bwd", flush=True)
    for label, ms, mib in _mlp_rows(one_layer.layers[0].mlp, preset, batch, seq, bench):
        rows.append({"layer": "layers.0.mlp", "what": label, "ms": ms, "ms_per_step": ms * n_layers, "mib": mib,
                     "gib_per_step": mib * n_layers / 1024})
        print(f"   {label:64s} {ms:8.4f} ms x{n_layers} = {ms * n_layers:7.2f} ms; kept {mib:8.1f} MiB "
              f"x{n_layers} = {mib * n_layers / 1024:6.2f} GiB", flush=True)
    one_layer = None
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bitnet_step_bench")
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tables", default="layers,steps", help="comma-separated: layers, steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bitnet_step_bench needs a CUDA GPU")
    from falcon_h1.megatron_compat.parallel import initialize_parallel
    from falcon_h1.presets import get_preset

    initialize_parallel(tp=1)
    preset = get_preset(args.size)
    preset = preset.replace(max_position_embeddings=max(args.seq, preset.max_position_embeddings))
    tables = set(args.tables.split(","))
    unknown = tables - {"layers", "steps"}
    if unknown:
        raise SystemExit(f"--tables: {sorted(unknown)}; allowed: layers, steps")
    result = {"device": torch.cuda.get_device_name(), "size": args.size, "batch": args.batch, "seq": args.seq}
    if "layers" in tables:
        result["layers"] = layer_table(preset, args.batch, args.seq)
        _free()
    if "steps" in tables:
        result["steps"] = step_table(preset, args.batch, args.seq, args.micro_batches, args.warmup, args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
