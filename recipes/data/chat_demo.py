"""The bundled tiny chat set and its tokenizer, written by this module.

    python -m recipes.data.chat_demo            # rewrites the shipped files

`data.paths: [chat_demo]` trains on `corpus/chat_demo/train.jsonl`;
`data.tokenizer: chat_demo` is `tokenizers/chat_demo/` (a byte-level BPE of 320
tokens, the tiny model's vocabulary, with a ChatML chat template).
`corpus/chat_demo/heldout.jsonl` holds questions that never occur in the
training file, each with its one correct answer as the final assistant turn,
for an exact-match score before and after fine-tuning.

Four task families, every answer computable from the question:
  add      "What is 3 + 5?" -> "8" (digits 0-9; some pairs only in held-out)
  larger   "Which is larger, 3 or 8?" -> "8" (same)
  repeat   "Repeat: qzkw" -> "qzkw" (random letters)
  lookup   system "Facts: cup=red, owl=blue." user "What is owl?" -> "blue"
Some training conversations have a system prompt or two question turns, so
the assistant-only loss mask has several spans to find.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Optional, Sequence

from recipes.data.chat import read_chat_file

DATA_DIR = Path(__file__).resolve().parent
CHAT_DEMO = "chat_demo"
CORPUS_DIR = DATA_DIR / "corpus" / CHAT_DEMO
TRAIN_FILE = CORPUS_DIR / "train.jsonl"
HELDOUT_FILE = CORPUS_DIR / "heldout.jsonl"
TOKENIZER_DIR = DATA_DIR / "tokenizers" / CHAT_DEMO

TRAIN_CONVERSATIONS = 1500
HELDOUT_PER_FAMILY = 25
SEED = 20261202
# The tiny model's embedding has 320 rows (a multiple of 64, so no padding is added).
VOCAB_SIZE = 320
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
# ChatML; the {% generation %} tags let transformers' apply_chat_template return the
# assistant mask (the tests use it as a reference for the mask found from the rendering).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' + '\\n' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

SYSTEM_PROMPT = "You are a concise assistant."
KEYS = ("cup", "owl", "map", "key", "hat", "box", "pen", "sun", "car", "egg", "fox", "jar")
VALUES = ("red", "blue", "green", "gold", "pink", "gray", "white", "black")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _digit_pairs(rng: random.Random, distinct: bool) -> tuple[list, list]:
    """All ordered digit pairs, split into (train, held-out): 1 in 7 is held out."""
    pairs = [(a, b) for a in range(10) for b in range(10) if not distinct or a != b]
    rng.shuffle(pairs)
    cut = len(pairs) // 7
    return pairs[cut:], pairs[:cut]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


class _Families:
    """Question/answer makers; `heldout` draws only questions that training never shows."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.add_pairs = dict(zip(("train", "heldout"), _digit_pairs(rng, distinct=False)))
        self.larger_pairs = dict(zip(("train", "heldout"), _digit_pairs(rng, distinct=True)))
        self.train_words: set[str] = set()

    def add(self, part: str) -> tuple[Optional[str], str, str]:
        a, b = self.rng.choice(self.add_pairs[part])
        return None, f"What is {a} + {b}?", str(a + b)

    def larger(self, part: str) -> tuple[Optional[str], str, str]:
        a, b = self.rng.choice(self.larger_pairs[part])
        return None, f"Which is larger, {a} or {b}?", str(max(a, b))

    def _fresh_word(self, part: str) -> str:
        while True:
            word = _word(self.rng)
            if part == "train":
                self.train_words.add(word)
                return word
            if word not in self.train_words:
                return word

    def repeat(self, part: str) -> tuple[Optional[str], str, str]:
        word = self._fresh_word(part)
        return None, f"Repeat: {word}", word

    def lookup(self, part: str) -> tuple[Optional[str], str, str]:
        keys = self.rng.sample(KEYS, self.rng.randint(2, 3))
        values = [self.rng.choice(VALUES) for _ in keys]
        facts = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
        asked = self.rng.randrange(len(keys))
        return f"Facts: {facts}.", f"What is {keys[asked]}?", values[asked]

    NAMES = ("add", "larger", "repeat", "lookup")


def _conversation(families: _Families, rng: random.Random) -> list[dict]:
    turns = 2 if rng.random() < 0.25 else 1
    messages: list[dict] = []
    system = SYSTEM_PROMPT if rng.random() < 0.3 else None
    for _ in range(turns):
        own_system, question, answer = getattr(families, rng.choice(_Families.NAMES))("train")
        if own_system is not None and not messages:
            system = own_system
        elif own_system is not None:
            question = f"{own_system} {question}"
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def generate(seed: int = SEED) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training conversations, held-out conversations) as message lists."""
    rng = random.Random(seed)
    families = _Families(rng)
    train = [_conversation(families, rng) for _ in range(TRAIN_CONVERSATIONS)]
    heldout = []
    for name in _Families.NAMES:
        for _ in range(HELDOUT_PER_FAMILY):
            system, question, answer = getattr(families, name)("heldout")
            messages = [{"role": "system", "content": system}] if system else []
            heldout.append(messages + [{"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}])
    return train, heldout


def heldout_questions(path: Path | str = HELDOUT_FILE) -> list[tuple[list[dict], str]]:
    """(prompt messages, expected answer) per held-out conversation, for exact match: each line
    is checked as chat data is (file and line named) and must end with the assistant's answer."""
    chat_file = read_chat_file(path)
    if chat_file.skipped_no_assistant:
        raise ValueError(f"{chat_file.skipped_no_assistant[0]}: a held-out conversation without an assistant "
                         "answer to score; each must be a prompt followed by the expected assistant message.")
    questions = []
    for conversation in chat_file.conversations:
        *prompt, last = conversation.messages
        if last["role"] != "assistant" or not prompt:
            raise ValueError(f"{conversation.where}: a held-out conversation must be a prompt followed by the "
                             f"expected assistant message; this one ends with a {last['role']} message"
                             f"{'' if prompt else ' and has no prompt'}.")
        questions.append((prompt, last["content"]))
    return questions


def _write_jsonl(path: Path, conversations: list[list[dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        for messages in conversations:
            stream.write(json.dumps({"messages": messages}) + "\n")


def _template_text(conversations: list[list[dict]]) -> list[str]:
    """What the tokenizer will see: contents and the ChatML frame around them."""
    return ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            for messages in conversations]


def write_tokenizer(folder: Path, conversations: list[list[dict]]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_template_text(conversations), trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_chat_demo(corpus_dir: Path = CORPUS_DIR, tokenizer_dir: Path = TOKENIZER_DIR,
                    seed: int = SEED) -> None:
    train, heldout = generate(seed)
    _write_jsonl(corpus_dir / TRAIN_FILE.name, train)
    _write_jsonl(corpus_dir / HELDOUT_FILE.name, heldout)
    write_tokenizer(tokenizer_dir, train)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write the bundled tiny chat set and tokenizer.")
    parser.add_argument("--corpus-dir", type=Path, default=CORPUS_DIR)
    parser.add_argument("--tokenizer-dir", type=Path, default=TOKENIZER_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    write_chat_demo(args.corpus_dir, args.tokenizer_dir, args.seed)
    print(f"wrote {args.corpus_dir} and {args.tokenizer_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
