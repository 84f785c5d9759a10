"""Packed chat rows against one conversation per row: training throughput in tokens of real text.

    python -m benchmarks.packed_throughput_bench --json $OUT/packed_throughput.json   # H200: 0.5B, 4 x 4096
    python -m benchmarks.packed_throughput_bench --tiny                               # CPU smoke run

Conversation lengths are drawn like chat data (log-normal, median --median-len tokens, sigma
--sigma, between 16 tokens and the row length). The packed batch is what `data=chat` trains on:
the drawn conversations packed whole by the data pipeline's best-fit decreasing packer
(recipes.data.chat_packing) into --seq-token rows, positions restarting per conversation, the
first --batch rows taken. The unpacked batch is `data.packing=false`: --batch conversations, one
per row, padded. Each is timed as a full training step (forward, backward, AdamW) of the same
model; the packed one once per attention path for packed rows (KernelOptions.packed_attention).
Tokens of real text per second = conversation tokens in the batch / step time.

Exactness on the same path: one packed row through the model against each of its conversations
run alone (no position_ids): the largest relative L2 error of one conversation's logits, and of
the per-token loss (bf16 on the GPU, so rounding-level, not zero; fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from benchmarks.tables import print_rows
from recipes.data.chat_packing import one_per_row, pack_best_fit_decreasing, row_sample

MIN_LENGTH = 16


def conversation_lengths(count: int, median: float, sigma: float, cap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.exp(np.log(median) + sigma * rng.standard_normal(count))
    return np.clip(lengths.astype(np.int64), MIN_LENGTH, cap)


def conversations(lengths, vocab: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, assistant mask) per conversation: random tokens, the second half assistant."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for n in lengths:
        mask = np.zeros(n, dtype=np.uint8)
        mask[n // 2:] = 1
        out.append((rng.integers(0, vocab, n), mask))
    return out


def batch_of(rows: list[list[int]], convs, seq: int, device) -> dict:
    """The training batch of `rows` (conversation indices per row), with each row's conversation
    lengths and the batch's real token count."""
    samples = [row_sample([convs[i] for i in row], seq, filler=0) for row in rows]
    batch = {key: torch.as_tensor(np.stack([s[key] for s in samples])).to(device)
             for key in ("tokens", "labels", "loss_mask", "position_ids")}
    batch["lengths"] = [[len(convs[i][0]) for i in row] for row in rows]
    batch["real_tokens"] = sum(map(sum, batch["lengths"]))
    return batch


def packed_and_unpacked(args, vocab: int, device):
    # enough conversations that best-fit fills the first rows as training's packer would
    pool = max(64, 4 * args.batch * math.ceil(args.seq / args.median_len))
    lengths = conversation_lengths(pool, args.median_len, args.sigma, args.seq, args.seed)
    convs = conversations(lengths, vocab, args.seed)
    packed_rows = pack_best_fit_decreasing(lengths, args.seq)[: args.batch]
    unpacked_rows = one_per_row(len(lengths))[: args.batch]
    return batch_of(packed_rows, convs, args.seq, device), batch_of(unpacked_rows, convs, args.seq, device)


def build(args, packed_attention: str, device):
    from falcon_h1.kernels import KernelOptions
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    cfg = get_preset(args.size).replace(max_position_embeddings=max(args.seq, 4096))
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    precision = "bf16" if device.type == "cuda" else "fp32"
    return build_model(cfg, kernel_options=KernelOptions(packed_attention=packed_attention), precision=precision,
                       seed=args.seed, device=device)


def train_step(model, batch, packed: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=batch["tokens"].is_cuda)
    # an unpacked row is one conversation, then padding the conversation never sees: no documents
    positions = batch["position_ids"] if packed else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        per_token = model(batch["tokens"], position_ids=positions, labels=batch["labels"],
                          loss_mask=batch["loss_mask"])
        loss = per_token.sum() / batch["loss_mask"].sum()
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def ms_per_step(step, warmup: int, steps: int, device) -> float:
    if device.type == "cuda":
        from benchmarks.timing import time_steps

        return time_steps(step, warmup, steps)[0]
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def packed_vs_alone(model, batch) -> dict:
    """Row 0 of the packed batch against each of its conversations alone: worst logits error of a
    conversation, and the per-token loss error over the row's conversation tokens."""
    ids, positions = batch["tokens"][:1], batch["position_ids"][:1]
    labels, mask = batch["labels"][:1], batch["loss_mask"][:1]
    logits = model(ids, position_ids=positions).float()
    loss = model(ids, position_ids=positions, labels=labels, loss_mask=mask).float()
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    worst, alone_loss, start = 0.0, torch.zeros_like(loss), 0
    for length in batch["lengths"][0]:
        piece, start = slice(start, start + length), start + length
        worst = max(worst, rel(logits[:, piece], model(ids[:, piece]).float()))
        alone_loss[:, piece] = model(ids[:, piece], labels=labels[:, piece], loss_mask=mask[:, piece]).float()
    return {"conversations_in_row": len(batch["lengths"][0]), "max_rel_err_logits": worst,
            "rel_err_loss": rel(loss[:, :start], alone_loss[:, :start])}


def run(args) -> dict:
    from falcon_h1.megatron_compat.parallel import initialize_parallel

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    initialize_parallel(tp=1)
    probe = build(args, "sdpa", device)
    vocab = probe.cfg.vocab_size
    del probe
    packed, unpacked = packed_and_unpacked(args, vocab, device)
    row_tokens = args.batch * args.seq
    results = []
    candidates = args.packed_attention if device.type == "cuda" else ["sdpa"]   # one path on CPU
    for name, batch, attention in ([("one_per_row", unpacked, "sdpa")]
                                   + [(f"packed_{b}", packed, b) for b in candidates]):
        real = batch["real_tokens"]
        row = {"mode": name, "conversations": sum(map(len, batch["lengths"])), "real_tokens": real,
               "efficiency": real / row_tokens}
        try:
            model = build(args, attention, device)
            row["packed_attention"] = model.kernel_options.packed_attention
            ms = ms_per_step(train_step(model, batch, name != "one_per_row"), args.warmup, args.steps, device)
            row.update(ms=ms, real_tokens_per_s=real / (ms / 1e3), row_tokens_per_s=row_tokens / (ms / 1e3))
            if name != "one_per_row":
                row.update(packed_vs_alone(model.eval(), batch))
        except Exception as err:   # a path this device cannot run is reported, not fatal
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(row)
        print(json.dumps(row), flush=True)
        report = _report(args, device, results)
        if args.json:  # after every row: a run cut short keeps the rows it finished
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    return report


def _report(args, device, results: list[dict]) -> dict:
    base = results[0].get("real_tokens_per_s")
    for row in results:
        if base and "real_tokens_per_s" in row:
            row["speedup_vs_one_per_row"] = row["real_tokens_per_s"] / base
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": device_name, "torch": torch.__version__, "size": args.size, "seq": args.seq,
            "batch": args.batch, "median_len": args.median_len, "sigma": args.sigma, "results": results}


def print_table(report: dict) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, {report['size']}, {report['batch']} rows x {report['seq']} "
          f"tokens, conversation lengths log-normal median {report['median_len']:g} sigma {report['sigma']:g}")
    columns = ["mode", "ms", "conversations", "real_tokens", "efficiency", "real_tokens_per_s", "speedup_vs_one_per_row",
               "max_rel_err_logits", "rel_err_loss"]
    print_rows(report["results"], columns, width=20, digits=4, reason_key="error")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (a quicker run)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--median-len", type=float, default=600.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    # flex last: its first step compiles for minutes on a fresh machine
    parser.add_argument("--packed-attention", nargs="+", default=["varlen", "sdpa", "flex"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: the micro model, 2 rows of 128 tokens, median 24, 1 warm-up + 1 step")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.seq, args.batch, args.median_len, args.warmup, args.steps = "micro", 128, 2, 24.0, 1, 1
    print_table(run(args))


if __name__ == "__main__":
    main()
