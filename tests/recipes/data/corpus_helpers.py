"""Small synthetic corpora and a tiny BPE tokenizer file, made inside the tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over a lazy dog while émigrés sip café crème at 東京 🦊"
).split()


def random_documents(count: int, seed: int, min_words: int = 5, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for _ in range(count)
    ]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as stream:
        for text in texts:
            stream.write(json.dumps({key: text, "meta": 1}, ensure_ascii=False) + "\n")
    return path


def train_tiny_bpe(path: Path, texts: list[str], eos: str = "<|endoftext|>") -> Path:
    """A byte-level BPE of ~300 tokens with an eos and a pad token, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[eos, "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path))
    return path
