"""`falcon-eval PATH`: perplexity over text files, or lm-evaluation-harness tasks.

    falcon-eval runs/my-run --data held_out.jsonl            # perplexity (JSON on stdout)
    falcon-eval hf_dir --data book.txt --seq-length 2048
    falcon-eval runs/my-run --tasks my_task --include-path tasks/ --limit 100
    torchrun --nproc_per_node 2 -m recipes.evaluate runs/my-run --tp 2 --data held_out.jsonl

Perplexity: each document (a .jsonl line's "text" field, or a whole other file) is tokenized
as in training and followed by the end-of-document token; the documents are concatenated and
cut into windows of seq_length predicted tokens (each window starts with the last token of
the one before), so every token but the first is scored exactly once. Reported: tokens,
mean negative log-likelihood per token (nats), perplexity exp(nll) and bits per UTF-8 byte of
the text (comparable across tokenizers).

Tasks run through the lm-evaluation-harness adapter (recipes.lm_eval_adapter) on the model
as it is, without exporting it to Hugging Face; --include-path adds local task YAML files.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional


def read_documents(paths: list[str], field: str = "text") -> list[str]:
    documents = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--data {name}: no such file; allowed: a text file or JSON lines with a "
                                    f"{field!r} field.")
        if path.suffix != ".jsonl":
            documents.append(path.read_text(encoding="utf-8"))
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"--data {name} line {number} is not JSON ({error.msg}).") from error
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise ValueError(f"--data {name} line {number} has no {field!r} string; allowed: --field naming "
                                 "the text field of every line.")
            documents.append(row[field])
    if not any(documents):
        raise ValueError(f"--data {', '.join(paths)} holds no text.")
    return documents


def token_windows(stream: list[int], seq_length: int) -> list[list[int]]:
    """Windows of up to seq_length + 1 tokens overlapping by one: each scores its last len - 1."""
    return [stream[start:start + seq_length + 1] for start in range(0, len(stream) - 1, seq_length)]


def perplexity(model, tokenizer, documents: list[str], seq_length: int, batch_size: int = 8) -> dict:
    """Scores documents with the model's per-token loss (vocab-parallel: no logits gathered)."""
    import torch

    from falcon_h1.megatron_compat.parallel import default_device

    stream = [i for doc in documents for i in tokenizer.encode(doc) + [tokenizer.eos_id]]
    windows = token_windows(stream, seq_length)
    device = default_device()
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for length in sorted({len(w) for w in windows}, reverse=True):
                same = [w for w in windows if len(w) == length]
                for start in range(0, len(same), batch_size):
                    batch = torch.tensor(same[start:start + batch_size], device=device)
                    loss = model(batch[:, :-1], labels=batch[:, 1:])          # [b, s] nats per token
                    nll += loss.double().sum().item()
                    count += loss.numel()
    finally:
        model.train(was_training)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    return {"documents": len(documents), "tokens": count, "nll_per_token": nll / count,
            "perplexity": math.exp(nll / count), "bits_per_byte": nll / math.log(2) / n_bytes,
            "seq_length": seq_length}


def run_tasks(loaded, tasks: list[str], include_path: Optional[str], limit: Optional[int], num_fewshot: Optional[int],
              batch_size: int, max_length: Optional[int], log_samples: bool) -> dict:
    """lm-evaluation-harness's simple_evaluate on the loaded model (imported only here)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from recipes.lm_eval_adapter import FalconH1LM

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return simple_evaluate(model=FalconH1LM(loaded=loaded, batch_size=batch_size, max_length=max_length),
                           tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=log_samples)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falcon-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a falcon-train run directory or a Hugging Face FalconH1 directory")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", action="append", help="text or .jsonl file to score (repeatable)")
    what.add_argument("--tasks", help="comma-separated lm-evaluation-harness task names")
    parser.add_argument("--field", default="text", help="the text field of .jsonl lines")
    parser.add_argument("--seq-length", type=int, help="tokens per window, and the tasks' max_length (default: the "
                                                       "run's data.seq_length, or the HF model's "
                                                       "max_position_embeddings)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--include-path", help="folder of local lm-eval task YAML files")
    parser.add_argument("--limit", type=int, help="score at most this many examples per task")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--log-samples", action="store_true", help="keep each example's scores in --output")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun with tp processes)")
    parser.add_argument("--tokenizer", help="tokenizer.json (or its folder, or 'byte') instead of the model's own")
    parser.add_argument("--output", help="also write the results as JSON here")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    from recipes.inference import run_command

    run_command("falcon-eval", _run, _parser().parse_args(argv))


def _run(args) -> None:
    import torch.distributed as dist

    from recipes.inference import load_for_inference, require_at_least_one, require_tokenizer

    require_at_least_one(batch_size=args.batch_size, seq_length=args.seq_length, tp=args.tp, limit=args.limit)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot {args.num_fewshot}; allowed: an integer >= 0.")
    if args.log_samples and (args.data or not args.output):
        raise ValueError("--log-samples needs --tasks and --output (the samples are written there).")
    documents = read_documents(args.data, args.field) if args.data else None
    loaded = load_for_inference(args.path, tp=args.tp, tokenizer=args.tokenizer)
    tokenizer = require_tokenizer(loaded, args.path)
    seq_length = args.seq_length or loaded.max_length
    if documents is not None:
        results = perplexity(loaded.model, tokenizer, documents, seq_length, args.batch_size)
        report = json.dumps(results, indent=2)
    else:
        results = run_tasks(loaded, [t for t in args.tasks.split(",") if t], args.include_path, args.limit,
                            args.num_fewshot, args.batch_size, seq_length, args.log_samples)
        from lm_eval.utils import make_table

        report = make_table(results)
        results = {key: results[key] for key in ("results", "n-samples", "samples") if key in results}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(report)
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
