"""Decode speed of falcon_h1.generate next to Hugging Face transformers' generate (its own cache).

    python benchmarks/generate_bench.py --out $OUT                    # H200: 0.5B and 7B, batch 1 and 32
    python benchmarks/generate_bench.py --tiny                        # CPU smoke: micro model, seconds

For each size: our Megatron model with random weights (bf16 on GPU), and transformers'
FalconH1ForCausalLM of the same config with ITS random weights (speed does not depend on the
values; the greedy tokens of the two are not compared). Per batch size: random prompts of
--prompt-len tokens, --new-tokens new tokens, greedy, no stop token (every row runs to the
end), one warm-up call first. A streamer records the time each new token arrives (both
generate loops hand it the tokens, which waits for the GPU), so:
- prefill s: call start -> first new token;
- decode tokens/s: batch * (new tokens - 1) / (first -> last new token);
- per-position ms: mean step time over windows of --window steps, first vs last shown
  (flat for the Mamba part; attention reads a KV cache that grows by one token per step).
Writes generate_bench.json (+ .txt table) under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"0.5b": "falcon_h1_0_5b", "7b": "falcon_h1_7b", "micro": "falcon_h1_micro"}


class ArrivalTimes:
    """Streamer (put/end) recording when each step's tokens arrive; the first put is the prompt."""

    def __init__(self, device):
        self.device, self.times, self.puts = device, [], 0

    def put(self, value):
        self.puts += 1
        if self.puts > 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    def end(self):
        pass


def timed(run, device) -> dict:
    streamer = ArrivalTimes(device)
    start = time.perf_counter()
    run(streamer)
    t = streamer.times
    steps = [b - a for a, b in zip(t, t[1:])]
    return {"prefill_s": t[0] - start, "decode_s": t[-1] - t[0], "steps": steps}


def summarize(result: dict, batch: int, window: int) -> dict:
    steps = result.pop("steps")
    windows = [statistics.mean(steps[i:i + window]) * 1e3 for i in range(0, len(steps), window)]
    return {**result, "decode_tokens_per_s": batch * len(steps) / result["decode_s"] if steps else float("nan"),
            "ms_per_step_by_position": windows,
            "last_over_first_window": windows[-1] / windows[0] if windows else float("nan")}


def build_ours(preset: str, dtype: str, seed: int):
    from falcon_h1.megatron_compat.parallel import initialize_parallel
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    initialize_parallel(tp=1)
    model = build_model(get_preset(preset), precision=dtype, seed=seed)
    return model.eval()


def build_hf(cfg, dtype: torch.dtype, device):
    from transformers import FalconH1Config, FalconH1ForCausalLM

    from falcon_h1.hf import config_to_hf

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return FalconH1ForCausalLM(FalconH1Config(**config_to_hf(cfg))).eval()
    finally:
        torch.set_default_dtype(previous)


def bench_size(size: str, args, device, record) -> None:
    """Time every implementation at every batch size of `size`, handing each row to record()."""
    import falcon_h1

    dtype = "bf16" if device.type == "cuda" else "fp32"
    ours = build_ours(SIZES[size], dtype, args.seed)
    hf = None if args.no_hf else build_hf(ours.cfg, torch.bfloat16 if dtype == "bf16" else torch.float32, device)
    for batch in args.batches:
        ids = torch.randint(0, ours.cfg.vocab_size, (batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(batch)).to(device)
        runs = {"ours": lambda s, n=args.new_tokens: falcon_h1.generate(ours, ids, max_new_tokens=n, streamer=s)}
        if device.type == "cuda" and not args.no_eager:
            runs["ours_eager"] = lambda s, n=args.new_tokens: falcon_h1.generate(
                ours, ids, max_new_tokens=n, streamer=s, cuda_graph=False)
        if hf is not None:
            runs["hf"] = lambda s, n=args.new_tokens: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                use_cache=True, streamer=s, pad_token_id=0)
        for name, run in runs.items():
            with torch.no_grad():
                timed(lambda s: run(s, 4), device)  # warm-up: kernels compiled / autotuned
                result = summarize(timed(run, device), batch, args.window)
            if device.type == "cuda":
                result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            row = {"size": size, "impl": name, "batch": batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, **result}
            record(row)
    ours = hf = None  # frees both before the next size is built
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _line(row: dict) -> str:
    w = row["ms_per_step_by_position"]
    return (f"{row['size']:>5} {row['impl']:>4} batch {row['batch']:>3}: prefill {row['prefill_s']:.3f} s, "
            f"decode {row['decode_tokens_per_s']:,.0f} tokens/s, ms/step first {w[0]:.2f} last {w[-1]:.2f} "
            f"(x{row['last_over_first_window']:.2f})" if w else f"{row['size']} {row['impl']} batch {row['batch']}: "
            "too few steps")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.5b,7b")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--window", type=int, default=32, help="steps per per-position time window")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face's generate")
    parser.add_argument("--no-eager", action="store_true", help="skip our eager (no CUDA graph) decode on GPU")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke: micro model, batch 1 and 2, short prompt")
    parser.add_argument("--out", default=".", help="folder for generate_bench.json / .txt")
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.batches, args.prompt_len, args.new_tokens, args.window = "micro", "1,2", 24, 12, 4
    args.batches = [int(b) for b in args.batches.split(",")]
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        parser.error(f"--sizes {unknown}: allowed {', '.join(SIZES)}")
    from falcon_h1.megatron_compat.parallel import default_device

    device = default_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    rows = []

    def record(row: dict) -> None:  # the files are rewritten after every row: a call cut short keeps its rows
        rows.append(row)
        print(_line(row), flush=True)
        (out / "generate_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / "generate_bench.txt").write_text("\n".join(_line(r) for r in rows) + "\n")

    for size in args.sizes.split(","):
        bench_size(size, args, device, record)


if __name__ == "__main__":
    main()
