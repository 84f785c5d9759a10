"""`falcon-generate PATH`: text from a run directory or a Hugging Face directory.

    falcon-generate runs/my-run --prompt "It is a truth universally acknowledged"
    falcon-generate hf_dir --chat --prompt "What is 2 + 3?" --max-new-tokens 64
    falcon-generate runs/my-run --file prompts.txt --do-sample --temperature 0.8 --seed 1
    torchrun --nproc_per_node 2 -m recipes.generate runs/my-run --tp 2 --prompt "..."

--file holds one prompt per line, or JSON lines with "prompt" (text) or "messages" (a
conversation, rendered with the chat template). --chat sends each --prompt / text line as a
user message through the chat template. Output streams as it is generated (one prompt at a
time; --batch-size N generates N together and prints each when done); --output FILE also
writes {"prompt", "completion"} JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


class TextStreamer:
    """Prints the text of one row's new tokens as they arrive (Hugging Face's streamer protocol:
    the first put is the prompt). A partial UTF-8 character waits for its remaining bytes."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += [int(i) for i in value.flatten()]
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def read_prompts(prompts: list[str], file: Optional[str], chat: bool) -> list[dict]:
    """Each prompt as {"text": str} or {"messages": [...]}, from --prompt and --file."""
    items = [{"messages": [{"role": "user", "content": p}]} if chat else {"text": p} for p in prompts]
    if file is not None:
        items += _read_prompt_file(file, chat)
    if not items:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) and/or --file FILE.")
    return items


def _read_prompt_file(file: str, chat: bool) -> list[dict]:
    items = []
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"--file {file}: no such file; allowed: a text file (one prompt per line) or JSON "
                                "lines with 'prompt' or 'messages'.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"--file {file} line {number} is not JSON ({error.msg}).") from error
            if isinstance(row, dict) and isinstance(row.get("messages"), list):
                items.append({"messages": row["messages"]})
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
                text = row["prompt"]
                items.append({"messages": [{"role": "user", "content": text}]} if chat else {"text": text})
            else:
                raise ValueError(f"--file {file} line {number} has neither a 'prompt' string nor a 'messages' list.")
        else:
            items.append({"messages": [{"role": "user", "content": line}]} if chat else {"text": line})
    return items


def prompt_ids(tokenizer, item: dict) -> list[int]:
    return tokenizer.chat_ids(item["messages"]) if "messages" in item else tokenizer.prompt_ids(item["text"])


def complete(model, tokenizer, ids_list: list[list[int]], streamer=None, **settings) -> list[str]:
    """Generate for a batch of token-id prompts (left-padded together); the new text of each."""
    import torch

    import falcon_h1
    from falcon_h1.megatron_compat.parallel import default_device

    device = default_device()
    longest = max(len(ids) for ids in ids_list)
    input_ids = torch.full((len(ids_list), longest), tokenizer.eos_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, ids in enumerate(ids_list):
        input_ids[r, longest - len(ids):] = torch.tensor(ids)
        mask[r, longest - len(ids):] = 1
    out = falcon_h1.generate(model, input_ids.to(device), attention_mask=mask.to(device),
                             eos_token_id=tokenizer.eos_id, streamer=streamer, **settings)
    texts = []
    for row in out[:, longest:].tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(row))
    return texts


def sample_after_training(model, recipe) -> Optional[str]:
    """The end-of-training sample: train.sample_tokens new tokens after train.sample_prompt,
    drawn at temperature 0.8 with the run's seed (collective over TP: every rank calls it).
    None when train.sample_tokens = 0; a sentence saying why when the layout cannot decode."""
    from megatron.core import parallel_state

    from recipes.inference import TextTokenizer

    train_cfg = recipe.train
    if train_cfg.sample_tokens == 0:
        return None
    if parallel_state.get_pipeline_model_parallel_world_size() > 1 or model.config.sequence_parallel:
        return "(no sample: generation needs parallel.pp = 1 and parallel.sequence_parallel = false)"
    tokenizer = TextTokenizer(recipe.data.tokenizer)
    text = complete(model, tokenizer, [tokenizer.prompt_ids(train_cfg.sample_prompt)], None,
                    max_new_tokens=train_cfg.sample_tokens, do_sample=True, temperature=0.8, seed=train_cfg.seed)[0]
    return train_cfg.sample_prompt + text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falcon-generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a falcon-train run directory or a Hugging Face FalconH1 directory")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--file", help="prompts: one per line, or .jsonl with 'prompt' or 'messages'")
    parser.add_argument("--chat", action="store_true", help="send prompts as user messages through the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int, default=1, help="prompts generated together (1: streamed)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun with tp processes)")
    parser.add_argument("--tokenizer", help="tokenizer.json (or its folder, or 'byte') instead of the model's own")
    parser.add_argument("--output", help="also write JSON lines {prompt, completion} here")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    from recipes.inference import run_command

    run_command("falcon-generate", _run, _parser().parse_args(argv))


def _run(args) -> None:
    import torch.distributed as dist

    from falcon_h1.generation.sampling import Sampler
    from recipes.inference import load_for_inference, require_at_least_one, require_tokenizer

    require_at_least_one(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, tp=args.tp)
    Sampler.of(args.do_sample, args.temperature, args.top_k, args.top_p, args.seed)  # before the model loads
    items = read_prompts(args.prompt, args.file, args.chat)
    loaded = load_for_inference(args.path, tp=args.tp, tokenizer=args.tokenizer)
    tokenizer = require_tokenizer(loaded, args.path)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    lead = not dist.is_initialized() or dist.get_rank() == 0
    records = []
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        streamed = len(batch) == 1 and lead
        if streamed:
            _print_prompt(batch[0])
        texts = complete(loaded.model, tokenizer, [prompt_ids(tokenizer, item) for item in batch],
                         TextStreamer(tokenizer) if streamed else None, **settings)
        for item, text in zip(batch, texts):
            if lead and not streamed:
                _print_prompt(item)
                print(text)
            records.append({"prompt": item.get("text", item.get("messages")), "completion": text})
    if args.output and lead:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _print_prompt(item: dict) -> None:
    text = item["text"] if "text" in item else item["messages"][-1]["content"]
    print(f"\n>>> {text}", flush=True)


if __name__ == "__main__":
    main()
