"""Tokenizers with the interface Megatron's GPTDataset reads.

`data.tokenizer` is "byte" (UTF-8 bytes, no download), "chat_demo" (the bundled
tiny chat tokenizer, see chat_demo.py) or the path of a Hugging Face `tokenizers`
JSON file (or of a folder holding `tokenizer.json`). Both classes subclass Megatron's
`MegatronTokenizerBase` and expose what `megatron.core.datasets` touches:
`eod` (appended after every document), `pad` (masked out of the loss),
`vocab_size` and `unique_identifiers` (hashed into the dataset-index cache key).

`vocab_size` is the number of embedding rows the model needs: the tokenizer's
own count rounded up to a multiple of 64, so the embedding and LM-head GEMMs
stay tensor-core friendly and split evenly over tensor-parallel ranks.

Chat data is rendered with the tokenizer's own chat template (the folder's
`tokenizer_config.json` "chat_template", or `chat_template.jinja`) through
transformers' `apply_chat_template`, so rendering is exactly what the model
sees at inference under Hugging Face.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
from megatron.core.tokenizers import MegatronTokenizerBase

from falcon_h1.errors import ConfigValueError
from recipes.data.tokenizer_files import BYTE_SPEC, CHAT_TEMPLATE_HELP, find_chat_template, resolve_tokenizer_file

VOCAB_MULTIPLE = 64

# Tried in order when the tokenizer ships no tokenizer_config.json naming its eos.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
# Megatron's own "no pad token" value: never a real id, so nothing gets masked.
NO_PAD_ID = -1


def pad_vocab_size(num_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-num_tokens // multiple) * multiple


class _TokenizerBase(MegatronTokenizerBase):
    """What both tokenizers share; subclasses set the ids and the encoders."""

    unpadded_vocab_size: int

    @property
    def vocab_size(self) -> int:
        return pad_vocab_size(self.unpadded_vocab_size)

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def special_tokens_dict(self) -> dict[str, int]:
        # Megatron checks pad against these to detect a pad id that collides with eod.
        return {"eos_token": self.eod, "pad_token": self.pad}

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(self.tokenize(text), dtype=np.int64) for text in texts]

    def chat_tokenizer(self):
        raise ConfigValueError(
            "data.tokenizer", self.path, "a tokenizer with a chat template",
            message=f"data.tokenizer = {self.path!r} has no chat template, which chat data "
            f"(data.kind = chat) needs: {CHAT_TEMPLATE_HELP}"
        )

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        """The conversation as text, rendered by transformers with the tokenizer's template."""
        return self.chat_tokenizer().apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


class ByteTokenizer(_TokenizerBase):
    """UTF-8 bytes are ids 0..255; eod = 256, pad = 257; vocab_size 320."""

    NUM_BYTES = 256

    def __init__(self) -> None:
        super().__init__(path=BYTE_SPEC, config={})
        self.unpadded_vocab_size = self.NUM_BYTES + 2

    @property
    def eod(self) -> int:
        return self.NUM_BYTES

    @property
    def pad(self) -> int:
        return self.NUM_BYTES + 1

    @property
    def fingerprint(self) -> str:
        return "byte-v1"

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            {
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "fingerprint": self.fingerprint,
            }
        )

    @property
    def vocab(self) -> dict[str, int]:
        vocab = {f"<0x{b:02X}>": b for b in range(self.NUM_BYTES)}
        vocab.update({"<|endoftext|>": self.eod, "<|pad|>": self.pad})
        return vocab

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def detokenize(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < self.NUM_BYTES)
        return data.decode("utf-8", errors="replace")


class HFJsonTokenizer(_TokenizerBase):
    """A Hugging Face `tokenizers` JSON file (`tokenizer.json`), loaded locally."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        super().__init__(path=str(Path(path).resolve()), config={})
        try:
            self._tokenizer = Tokenizer.from_file(self.path)
        except Exception as error:
            raise ConfigValueError(
                "data.tokenizer", path, "'byte' or the path of a tokenizer.json file",
                message=f"data.tokenizer = {path!r} could not be loaded as a Hugging Face tokenizers "
                f"JSON file ({error}). Allowed: 'byte' or the path of a tokenizer.json file."
            ) from error
        self.unpadded_vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._eod = self._find_eod(path)
        pad = self._find_token(PAD_CANDIDATES)
        self._pad = NO_PAD_ID if pad is None or pad == self._eod else pad
        self._fingerprint = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]
        self._chat_tokenizer = None

    def _find_token(self, names) -> Optional[int]:
        for name in names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def _find_eod(self, spec: str) -> int:
        names = list(EOD_CANDIDATES)
        declared = _declared_eos_token(Path(self.path).parent / "tokenizer_config.json")
        if declared is not None:
            names.insert(0, declared)
        token_id = self._find_token(names)
        if token_id is None:
            raise ConfigValueError(
                "data.tokenizer", spec, "a tokenizer with an end-of-document token",
                message=f"data.tokenizer = {spec!r} has no end-of-document token: documents need one "
                f"appended. Looked for tokenizer_config.json's eos_token and for "
                f"{', '.join(EOD_CANDIDATES)}. Add one of these as a special token."
            )
        return token_id

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            {
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "tokenizer_path": self.path,
                "fingerprint": self.fingerprint,
            }
        )

    @property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        # Special tokens (BOS etc. from a post-processor) are not added: pretraining
        # documents are separated by eod alone, as in Megatron's preprocess_data.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch runs on the Rust thread pool, so no Python multiprocessing is needed.
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def chat_fingerprint(self) -> str:
        """Changes with the tokenizer or its chat template: both decide a rendered conversation."""
        template = find_chat_template(Path(self.path).parent) or ""
        return hashlib.sha256(f"{self._fingerprint}\n{template}".encode()).hexdigest()[:16]

    def chat_tokenizer(self):
        """transformers' fast tokenizer of this folder, with its chat template (loaded once)."""
        if self._chat_tokenizer is None:
            folder = Path(self.path).parent
            if Path(self.path).name != "tokenizer.json" or find_chat_template(folder) is None:
                raise ConfigValueError(
                    "data.tokenizer", self.path, "a tokenizer with a chat template",
                    message=f"data.tokenizer = {self.path!r} has no chat template, which chat data "
                    f"(data.kind = chat) needs: {CHAT_TEMPLATE_HELP}"
                )
            from transformers import PreTrainedTokenizerFast

            self._chat_tokenizer = PreTrainedTokenizerFast.from_pretrained(
                str(folder), local_files_only=True
            )
        return self._chat_tokenizer


def _declared_eos_token(config_path: Path) -> Optional[str]:
    if not config_path.is_file():
        return None
    try:
        eos = json.loads(config_path.read_text()).get("eos_token")
    except (OSError, ValueError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def build_tokenizer(spec: str) -> ByteTokenizer | HFJsonTokenizer:
    """`data.tokenizer` -> tokenizer: "byte", "chat_demo" or a local tokenizer.json path."""
    if not isinstance(spec, str) or not spec:
        raise ConfigValueError(
            "data.tokenizer", spec, "'byte' or the path of a tokenizer.json file",
            message=f"data.tokenizer = {spec!r}: expected 'byte' or the path of a Hugging Face "
            f"tokenizers JSON file."
        )
    if spec == BYTE_SPEC:
        return ByteTokenizer()
    return HFJsonTokenizer(str(resolve_tokenizer_file(spec)))
