"""Small conversation files for the chat-data tests, each conversation carrying its own id."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer

from recipes.data.chat_demo import TOKENIZER_DIR

LIBRARY = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))

WORDS = "the quick brown fox jumps over a lazy dog while émigrés sip café at 東京 🦊".split()


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def conversation(tag: str, rng: random.Random, turns: int = 1, system: bool = False,
                 low: int = 1, high: int = 8) -> list[dict]:
    """User turns start with `tag`, so a decoded row shows which conversation it holds."""
    messages = [{"role": "system", "content": words(rng, 1, 4)}] if system else []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{tag} {words(rng, low, high)}"})
        messages.append({"role": "assistant", "content": words(rng, low, high)})
    return messages


def conversations(prefix: str, count: int, seed: int, **kwargs) -> list[list[dict]]:
    rng = random.Random(seed)
    return [conversation(f"<{prefix}{i}>", rng, turns=rng.randint(1, 3),
                         system=rng.random() < 0.3, **kwargs) for i in range(count)]


def write_chat_jsonl(path: Path, convs: list[list[dict]]) -> Path:
    with open(path, "w", encoding="utf-8") as stream:
        for messages in convs:
            stream.write(json.dumps({"messages": messages, "id": 1}, ensure_ascii=False) + "\n")
    return path


def copy_demo_tokenizer(folder: Path, config_update: dict | None = None,
                        with_config: bool = True) -> Path:
    """The bundled chat tokenizer in `folder`, its tokenizer_config.json edited or left out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes((TOKENIZER_DIR / "tokenizer.json").read_bytes())
    if with_config:
        config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
        config.update(config_update or {})
        config = {k: v for k, v in config.items() if v is not None}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def encode(text: str) -> list[int]:
    return LIBRARY.encode(text, add_special_tokens=False).ids


def reference(messages: list[dict], prefix: str = "") -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of a ChatML conversation, each piece tokenized alone by the
    `tokenizers` library: the assistant contents and their <|im_end|>\\n are marked."""
    ids = encode(prefix) if prefix else []
    mask = [0] * len(ids)
    for message in messages:
        head = encode(f"<|im_start|>{message['role']}\n")
        body = encode(message["content"] + "<|im_end|>\n")
        ids += head + body
        mask += [0] * len(head) + [int(message["role"] == "assistant")] * len(body)
    return ids, mask
