"""Where a tokenizer's files are, read without importing Megatron or transformers, so the
checks made before any job starts (`recipes.data.validation`) stay fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from falcon_h1.errors import ConfigValueError
from recipes.data.chat_demo import CHAT_DEMO, TOKENIZER_DIR as CHAT_DEMO_TOKENIZER_DIR

BYTE_SPEC = "byte"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_HELP = (
    "allowed: 'chat_demo' or a Hugging Face tokenizer folder holding tokenizer.json and a "
    "chat template (\"chat_template\" in tokenizer_config.json, or chat_template.jinja), "
    "e.g. the folder of an instruct model."
)


def find_chat_template(folder: Path) -> Optional[str]:
    """The chat template shipped in a Hugging Face tokenizer folder, or None.

    Read without importing transformers, so a config check can report a missing one
    before any job starts; rendering itself goes through transformers.
    """
    template_file = folder / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(template, list):  # named templates: transformers renders "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def resolve_tokenizer_file(spec: str) -> Path:
    """The tokenizer JSON file named by `spec` (a file, or a folder holding tokenizer.json)."""
    if spec == CHAT_DEMO:
        return CHAT_DEMO_TOKENIZER_DIR / "tokenizer.json"
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    if path.is_file():
        return path
    raise ConfigValueError(
        "data.tokenizer", spec, "'byte', 'chat_demo' or the path of a tokenizer.json file (or a folder holding one)",
        message=f"data.tokenizer = {spec!r}: no such file. Allowed: 'byte' (built-in byte-level "
        f"tokenizer, no download), 'chat_demo' (the bundled tiny chat tokenizer) or the path "
        f"of a Hugging Face tokenizers JSON file (tokenizer.json, or a folder that holds one)."
    )
