"""Check `data.*` for `data.kind: chat` before any job starts, naming the field.

Only file existence and shapes are checked here (no tokenization): a missing
file, a text dataset where a chat set is expected, a tokenizer without a chat
template, an unknown `data.overlong`. Problems inside the files (a malformed
line, an unknown role) are found while reading them, with file and line.
"""

from __future__ import annotations

import os
from typing import Optional

from falcon_h1.errors import ConfigValueError
from recipes.data.chat import is_chat_file
from recipes.data.chat_demo import CHAT_DEMO
from recipes.data.chat_sources import MASK_SUFFIX, chat_indexed_files
from recipes.data.tokenizer_files import (BYTE_SPEC, CHAT_TEMPLATE_HELP, find_chat_template,
                                    resolve_tokenizer_file)
from recipes.data.validation import parse_blend, raise_problems, split_and_length_problems

DATA_KINDS = ("text", "chat")
OVERLONG_POLICIES = ("truncate", "drop")
CHAT_PATHS_HELP = (
    "For data.kind = chat each entry is a .jsonl/.json[.gz] file of {\"messages\": [...]} "
    "lines, a prefix made by falcon-preprocess --chat, or 'chat_demo' (the bundled set), "
    "optionally weighted as ['0.7', 'a.jsonl', '0.3', 'b.jsonl']."
)
# The DataConfig fields only chat data reads, with the defaults text data must keep.
CHAT_ONLY_DEFAULTS = {"packing": True, "overlong": "truncate", "heldout": None}


def data_kind_problems(data_cfg) -> list[ConfigValueError]:
    """An unknown data.kind, or a chat-only field changed for text data (it would be ignored)."""
    if data_cfg.kind not in DATA_KINDS:
        return [ConfigValueError("data.kind", data_cfg.kind, f"one of {DATA_KINDS}")]
    if data_cfg.kind == "chat":
        return []
    return [
        ConfigValueError(
            f"data.{name}", getattr(data_cfg, name), f"{default!r} for data.kind = {data_cfg.kind!r}",
            message=f"data.{name} = {getattr(data_cfg, name)!r} applies to data.kind = chat only; for "
                    f"data.kind = {data_cfg.kind!r} leave it at {default!r}.")
        for name, default in CHAT_ONLY_DEFAULTS.items()
        if getattr(data_cfg, name) != default
    ]


def _entry_problem(entry: str) -> Optional[str]:
    if entry == CHAT_DEMO:
        return None
    where = "" if os.path.isabs(entry) else f" (relative to {os.getcwd()})"
    if is_chat_file(entry):
        return None if os.path.isfile(entry) else f"data.paths entry {entry!r}: no such file{where}."
    missing = [path for path in chat_indexed_files(entry) if not os.path.isfile(path)]
    if not missing:
        return None
    if os.path.isfile(f"{entry}.bin") and not os.path.isfile(f"{entry}{MASK_SUFFIX}.bin"):
        return (f"data.paths entry {entry!r} is a text dataset (no assistant mask): make chat "
                f"sets with falcon-preprocess --chat.")
    return (f"data.paths entry {entry!r} is neither a chat file nor a preprocessed chat set: "
            f"missing {', '.join(missing)}{where}.")


def _heldout_problem(entry) -> Optional[str]:
    if entry == CHAT_DEMO:
        return None
    if not isinstance(entry, str) or not is_chat_file(entry):
        return (f"data.heldout = {entry!r}: expected 'chat_demo' or a .jsonl/.json[.gz] file of "
                f"{{\"messages\": [...]}} lines whose last message is the expected assistant answer.")
    if not os.path.isfile(entry):
        return f"data.heldout entry {entry!r}: no such file (relative to {os.getcwd()})."
    return None


def _tokenizer_problem(spec: str) -> Optional[str]:
    if spec == BYTE_SPEC:
        return f"data.tokenizer = {spec!r} has no chat template: {CHAT_TEMPLATE_HELP}"
    try:
        tokenizer_file = resolve_tokenizer_file(str(spec))
    except ValueError as error:
        return str(error)
    if tokenizer_file.name != "tokenizer.json" or find_chat_template(tokenizer_file.parent) is None:
        return f"data.tokenizer = {spec!r} has no chat template: {CHAT_TEMPLATE_HELP}"
    return None


def validate_chat_data_config(data_cfg) -> None:
    """Raise one ConfigValueError listing every problem of a chat `data.*`."""
    def problem(key: str, value, allowed: str, message: str) -> ConfigValueError:
        return ConfigValueError(key, value, allowed, message=message)

    problems = data_kind_problems(data_cfg)
    if data_cfg.kind != "chat":
        problems.append(problem("data.kind", data_cfg.kind, "chat",
                                f"data.kind = {data_cfg.kind!r}: chat datasets need data.kind = chat."))
    try:
        entries, _ = parse_blend(data_cfg.paths)
    except ConfigValueError as error:
        problems.append(problem(error.key, error.value, CHAT_PATHS_HELP, f"{error} {CHAT_PATHS_HELP}"))
        entries = []
    entry_problems = [(entry, text) for entry in entries if (text := _entry_problem(entry))]
    if entry_problems:
        problems.append(problem("data.paths", entry_problems[0][0], CHAT_PATHS_HELP,
                                " ".join([text for _, text in entry_problems] + [CHAT_PATHS_HELP])))
    if text := _tokenizer_problem(data_cfg.tokenizer):
        problems.append(problem("data.tokenizer", data_cfg.tokenizer, "a tokenizer with a chat template", text))
    problems += split_and_length_problems(data_cfg, 2, " (a chat row needs a token and its label)")
    if not isinstance(data_cfg.packing, bool):
        problems.append(problem("data.packing", data_cfg.packing, "true or false",
                                f"data.packing = {data_cfg.packing!r}: expected true or false."))
    if data_cfg.overlong not in OVERLONG_POLICIES:
        problems.append(problem("data.overlong", data_cfg.overlong, f"one of {OVERLONG_POLICIES}",
                                f"data.overlong = {data_cfg.overlong!r} is not allowed: one of "
                                f"{OVERLONG_POLICIES} (cut a too-long conversation to seq_length, or "
                                f"skip it; both are counted and reported)."))
    if data_cfg.heldout is not None and (text := _heldout_problem(data_cfg.heldout)):
        problems.append(problem("data.heldout", data_cfg.heldout, "null, 'chat_demo' or an existing .jsonl file",
                                text))
    if data_cfg.cache_dir is not None:
        problems.append(problem(
            "data.cache_dir", data_cfg.cache_dir, "null for data.kind = chat",
            f"data.cache_dir = {data_cfg.cache_dir!r} is not used by data.kind = chat (small "
            f"sets are tokenized at start; preprocess large ones with falcon-preprocess --chat); "
            f"leave it null."))
    raise_problems(problems)
