"""Where a decode step's time goes: torch.profiler over a few falcon_h1.generate decode steps
(0.5B random weights, bf16, batch 1) and the top operators by self CPU and by CUDA time.

    python benchmarks/decode_profile.py --prompt-len 256 --new-tokens 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="falcon_h1_0_5b")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    import falcon_h1
    from benchmarks.generate_bench import build_ours

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_ours(args.preset, "bf16" if device.type == "cuda" else "fp32", 1234)
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.prompt_len), device=device)
    with torch.no_grad():
        falcon_h1.generate(model, ids, max_new_tokens=4)  # compile / autotune outside the profile
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            falcon_h1.generate(model, ids, max_new_tokens=args.new_tokens)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if device.type == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
