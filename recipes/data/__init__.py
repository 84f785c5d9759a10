"""Training data: the bundled public-domain corpus, tokenizers, preprocessing into
Megatron indexed datasets, and the train/valid datasets and batch iterator; chat
data (conversations, assistant-only loss, packed rows) for fine-tuning.

Names are imported on first use, so `import recipes.data.iterator` (or a CLI's
--help) does not pay for importing Megatron Core.
"""

import importlib

_EXPORTS = {
    "BUNDLED": "recipes.data.bundled",
    "ensure_bundled_dataset": "recipes.data.bundled",
    "build_train_valid_datasets": "recipes.data.datasets",
    "build_chat_datasets": "recipes.data.chat_dataset",
    "ChatDataReport": "recipes.data.chat_dataset",
    "write_chat_indexed_dataset": "recipes.data.chat_sources",
    "heldout_questions": "recipes.data.chat_demo",
    "make_data_iterator": "recipes.data.iterator",
    "preprocess_files": "recipes.data.preprocess",
    "write_indexed_dataset": "recipes.data.preprocess",
    "ByteTokenizer": "recipes.data.tokenizer",
    "HFJsonTokenizer": "recipes.data.tokenizer",
    "build_tokenizer": "recipes.data.tokenizer",
    "parse_blend": "recipes.data.validation",
    "validate_data_config": "recipes.data.config_checks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recipes.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
