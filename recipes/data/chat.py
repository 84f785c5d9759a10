"""Conversations in JSON lines -> token ids and an assistant-token mask.

Each line of a `.jsonl`/`.json` file (optionally `.gz`) is one conversation in
the format TRL, axolotl and Hugging Face datasets use:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Other keys of a line are not read; other keys of a message reach the chat
template unchanged. A malformed line, a missing or non-list "messages", an
unknown role or non-string content stops with the file and line named. A
conversation without an assistant turn teaches nothing: it is skipped and
counted. A file with no conversation at all is an error.

Rendering is the tokenizer's own chat template (transformers), never a renderer
of ours. The assistant mask marks every token that overlaps an assistant span of
the rendered text (transformers' rule for `return_assistant_tokens_mask`):
templates with `{% generation %}` tags name the spans themselves; for any other
template the span of assistant turn k is what rendering the first k+1 messages
adds to rendering the first k with the generation prompt, checked to be a
prefix of the whole rendering (a template that rewrites earlier turns is
refused with a hint, since its spans cannot be found that way).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")
JSON_SUFFIXES = (".jsonl", ".json")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Conversations tokenized per call of the fast tokenizer (its Rust thread pool).
TOKENIZE_BATCH = 256


@dataclass
class Conversation:
    where: str  # "path:line", for error messages
    messages: list[dict]


@dataclass
class ChatFile:
    path: str
    conversations: list[Conversation]
    skipped_no_assistant: list[str] = field(default_factory=list)  # "path:line" of each


def is_chat_file(entry: str) -> bool:
    name = entry[: -len(".gz")] if entry.endswith(".gz") else entry
    return name.endswith(JSON_SUFFIXES)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _checked_messages(record, where: str) -> list[dict]:
    if not isinstance(record, dict) or "messages" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: expected an object with a \"messages\" list of {{\"role\", \"content\"}} "
            f"objects; the line has {keys}."
        )
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: \"messages\" = {messages!r}: expected a non-empty list.")
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: messages[{position}] = {message!r}: expected an object.")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(
                f"{where}: messages[{position}] has role {role!r}; allowed roles: "
                f"{', '.join(ROLES)}."
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"{where}: messages[{position}] ({role}) has content "
                f"{message.get('content')!r}; expected a string."
            )
    return messages


def read_chat_file(path: str | Path) -> ChatFile:
    """Every conversation of one file, checked (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data file {str(path)!r}: no such file")
    chat_file = ChatFile(str(path), [])
    with _open_text(path) as stream:
        for line_number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{where}: not valid JSON ({error}).") from error
            messages = _checked_messages(record, where)
            if any(m["role"] == "assistant" for m in messages):
                chat_file.conversations.append(Conversation(where, messages))
            else:
                chat_file.skipped_no_assistant.append(where)
    if not chat_file.conversations:
        detail = (f"all {len(chat_file.skipped_no_assistant)} conversations lack an assistant turn"
                  if chat_file.skipped_no_assistant else "it holds no conversation")
        raise ValueError(
            f"chat data file {str(path)!r}: {detail}; each line must be "
            f"{{\"messages\": [...]}} with at least one assistant message."
        )
    return chat_file


def _render(hf_tokenizer, conversation: Conversation, messages: list[dict],
            add_generation_prompt: bool = False, with_spans: bool = False):
    """transformers' own template rendering (what apply_chat_template runs), for any prefix
    of a conversation, the empty one included."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, spans = render_jinja_template(
            conversations=[messages], chat_template=hf_tokenizer.get_chat_template(),
            add_generation_prompt=add_generation_prompt, return_assistant_tokens_mask=with_spans,
            **hf_tokenizer.special_tokens_map,
        )
    except Exception as error:  # jinja's raise_exception, TemplateError, ...
        raise ValueError(
            f"{conversation.where}: the chat template refused this conversation ({error})."
        ) from error
    return (rendered[0], [tuple(span) for span in spans[0]]) if with_spans else rendered[0]


def _generation_tag_spans(hf_tokenizer, conversation: Conversation) -> tuple[str, list]:
    return _render(hf_tokenizer, conversation, conversation.messages, with_spans=True)


def _prefix_spans(hf_tokenizer, conversation: Conversation) -> tuple[str, list]:
    messages, where = conversation.messages, conversation.where
    text = _render(hf_tokenizer, conversation, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prompt = _render(hf_tokenizer, conversation, messages[:index], add_generation_prompt=True)
        except ValueError as error:
            if index:
                raise
            raise ValueError(
                f"{where}: opens with an assistant message, and the chat template cannot render "
                f"the empty prompt before it ({error.__cause__}); allowed: a conversation that "
                f"starts with a system or user message, or a template that marks assistant text "
                f"with {{% generation %}} ... {{% endgeneration %}} tags."
            ) from error
        through = _render(hf_tokenizer, conversation, messages[: index + 1])
        if not (text.startswith(prompt) and text.startswith(through)
                and len(prompt) <= len(through)):
            raise ValueError(
                f"{where}: the chat template renders the turns before assistant message "
                f"{index} differently once later turns follow, so the assistant tokens cannot "
                f"be found from the rendering; allowed: a template whose rendering of a "
                f"conversation extends the rendering of its first turns, or one that marks "
                f"assistant text with {{% generation %}} ... {{% endgeneration %}} tags."
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def _overlap_mask(offsets, spans) -> np.ndarray:
    """1 for every token whose characters overlap an assistant span (spans are in order)."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    span_index = 0
    for token, (start, end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        if end > spans[span_index][0]:
            mask[token] = 1
    return mask


def tokenize_conversations(
    conversations: Sequence[Conversation], tokenizer
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(token ids int64, assistant mask uint8) per conversation, in order.

    A conversation whose assistant turns render to no token is refused (its
    template drops assistant text, so training on it would teach nothing).
    """
    hf_tokenizer = tokenizer.chat_tokenizer()
    find_spans = (_generation_tag_spans if GENERATION_TAG.search(hf_tokenizer.get_chat_template())
                  else _prefix_spans)
    for start in range(0, len(conversations), TOKENIZE_BATCH):
        batch = conversations[start: start + TOKENIZE_BATCH]
        rendered = [find_spans(hf_tokenizer, conversation) for conversation in batch]
        encoded = hf_tokenizer([text for text, _ in rendered], add_special_tokens=False,
                               return_offsets_mapping=True)
        for conversation, (_, spans), ids, offsets in zip(
                batch, rendered, encoded["input_ids"], encoded["offset_mapping"]):
            mask = _overlap_mask(offsets, spans)
            if not mask.any():
                raise ValueError(
                    f"{conversation.where}: the chat template of data.tokenizer renders no "
                    f"assistant text for this conversation; nothing would be trained on."
                )
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and ids.max() >= tokenizer.vocab_size:
                raise ValueError(
                    f"{conversation.where}: token id {ids.max()} is beyond data.tokenizer's "
                    f"vocabulary of {tokenizer.vocab_size} (tokens added in tokenizer_config.json "
                    f"but not in tokenizer.json?); allowed: ids below the vocabulary size."
                )
            yield ids, mask
