"""A trained model and its tokenizer, for generation and evaluation.

PATH is a falcon-train run directory (its latest checkpoint; the tokenizer and sequence
length of its recipe) or a Hugging Face FalconH1 directory (config.json + *.safetensors,
with a tokenizer.json beside them unless one is named). Text is tokenized as training
documents are (no special tokens added); a plain prompt starts a document, so it follows
the end-of-document token as every training document after the first does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class TextTokenizer:
    """encode / decode / end-of-document id of the training tokenizer (recipes.data), and its
    chat template where it has one."""

    def __init__(self, spec: str):
        from recipes.data.tokenizer import build_tokenizer

        self.spec = spec
        self._tokenizer = build_tokenizer(spec)

    @property
    def eos_id(self) -> int:
        return self._tokenizer.eod

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (before padding the embedding)."""
        return self._tokenizer.unpadded_vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tokenizer.tokenize(text)]

    def decode(self, ids) -> str:
        return self._tokenizer.detokenize([int(i) for i in ids])

    def prompt_ids(self, text: str) -> list[int]:
        return [self.eos_id] + self.encode(text)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The conversation rendered with the tokenizer's chat template as chat training data is,
        ending with the assistant's turn opened (add_generation_prompt)."""
        return self.encode(self._tokenizer.apply_chat_template(messages, add_generation_prompt=True))


@dataclass
class InferenceModel:
    model: object                    # falcon_h1 FalconH1Model in eval mode
    tokenizer: Optional[TextTokenizer]
    max_length: int                  # the longest sequence the model saw: data.seq_length or max_position_embeddings
    source: str                      # "run" or "hf"


def load_for_inference(path: str | Path, tp: int = 1, tokenizer: Optional[str] = None) -> InferenceModel:
    """The model of a run directory or a Hugging Face directory at tensor-parallel size `tp`
    (launched under torchrun with tp processes for tp > 1), and its tokenizer."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        from recipes.trained_model import load_trained_model

        model, recipe, _ = load_trained_model(path, tp=tp)
        spec, max_length, source = tokenizer or recipe.data.tokenizer, recipe.data.seq_length, "run"
    elif (path / "config.json").is_file():
        import falcon_h1

        model = falcon_h1.from_hf(path, tp=tp)
        spec = tokenizer or (str(path) if (path / "tokenizer.json").is_file() else None)
        max_length, source = model.cfg.max_position_embeddings, "hf"
    else:
        raise FileNotFoundError(f"{path} is neither a falcon-train run directory (config.yaml + checkpoints/) nor a "
                                "Hugging Face FalconH1 directory (config.json + *.safetensors).")
    text = TextTokenizer(spec) if spec is not None else None
    if text is not None and text.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {text.vocab_size} tokens but the model's vocab_size is "
                         f"{model.cfg.vocab_size}; allowed: a tokenizer whose ids fit the model.")
    return InferenceModel(model, text, max_length, source)


def require_tokenizer(loaded: InferenceModel, path) -> TextTokenizer:
    if loaded.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json; allowed: pass --tokenizer PATH (a tokenizer.json or the "
                         "folder holding it, or 'byte').")
    return loaded.tokenizer


def require_at_least_one(**flags) -> None:
    """Refuse a command-line count below 1, naming the flag (`max_new_tokens=0` -> --max-new-tokens)."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}; allowed: an integer >= 1.")


def run_command(name: str, run, args) -> None:
    """Run a falcon-generate / falcon-eval body: a bad argument, a missing file, a model folder
    without what it needs or a checkpoint that cannot be read ends the command with one line and
    exit code 2, not a traceback."""
    import sys

    from recipes.run_errors import RunError

    try:
        run(args)
    except (ValueError, FileNotFoundError, KeyError, RunError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
