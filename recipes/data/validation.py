"""Check `data.*` before training starts, with errors that name the field.

`data.paths` is either plain prefixes (["/a/prefix", "/b/prefix"], blended in
proportion to their sizes) or weight/prefix pairs (["0.7", "/a", "0.3", "/b"]),
Megatron's `--data-path` convention. "bundled" is the shipped corpus.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

from recipes.data.bundled import BUNDLED
from recipes.data.tokenizer import BYTE_SPEC, resolve_tokenizer_file

PATHS_HELP = (
    "Each entry is an indexed-dataset path prefix without .bin/.idx (make one with "
    "falcon-preprocess) or 'bundled' for the shipped corpus, optionally weighted as "
    "['0.7', '/a/prefix', '0.3', '/b/prefix']."
)


def _as_weight(item: str) -> Optional[float]:
    try:
        return float(item)
    except ValueError:
        return None


def parse_blend(paths: Sequence) -> tuple[list[str], Optional[list[float]]]:
    """`data.paths` -> (prefixes, weights or None). Raises ValueError naming data.paths."""
    if isinstance(paths, str) or not hasattr(paths, "__iter__"):
        raise ValueError(f"data.paths = {paths!r}: expected a list. {PATHS_HELP}")
    items = [str(item) for item in paths]
    if not items:
        raise ValueError(f"data.paths is empty. {PATHS_HELP}")
    if _as_weight(items[0]) is None:
        numeric = [item for item in items if _as_weight(item) is not None]
        if numeric:
            raise ValueError(
                f"data.paths = {items}: mixes prefixes with weights ({', '.join(numeric)}); "
                f"either give no weights or start with a weight and alternate. {PATHS_HELP}"
            )
        return items, None
    if len(items) % 2:
        raise ValueError(
            f"data.paths = {items}: weighted form needs weight/prefix pairs, got an odd "
            f"number of entries ({len(items)}). {PATHS_HELP}"
        )
    weights, prefixes = [], []
    for position in range(0, len(items), 2):
        weight_text, prefix = items[position], items[position + 1]
        weight = _as_weight(weight_text)
        if weight is None:
            raise ValueError(
                f"data.paths[{position}] = {weight_text!r} is not a number; in the weighted "
                f"form every even entry is a weight. {PATHS_HELP}"
            )
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(
                f"data.paths[{position}] = {weight_text!r}: weights must be positive numbers."
            )
        if _as_weight(prefix) is not None:
            raise ValueError(
                f"data.paths[{position + 1}] = {prefix!r} is a number where a prefix was "
                f"expected. {PATHS_HELP}"
            )
        weights.append(weight)
        prefixes.append(prefix)
    return prefixes, weights


def parse_split(split: str) -> list[float]:
    """`data.split` ("98,2,0") -> normalised [train, valid, test] fractions."""
    parts = [part.strip() for part in str(split).split(",")]
    values = [_as_weight(part) for part in parts]
    if not 1 <= len(parts) <= 3 or any(v is None or v < 0 or not math.isfinite(v) for v in values):
        raise ValueError(
            f"data.split = {split!r}: expected up to three non-negative numbers "
            f"'train,valid,test', e.g. '98,2,0'."
        )
    values += [0.0] * (3 - len(values))
    if values[0] <= 0:
        raise ValueError(f"data.split = {split!r}: the train share (first number) must be > 0.")
    total = sum(values)
    return [value / total for value in values]


def _missing_files_problem(prefix: str) -> Optional[str]:
    missing = [path for path in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(path)]
    if not missing:
        return None
    where = "" if os.path.isabs(prefix) else f" (relative to {os.getcwd()})"
    hint = ""
    if prefix.endswith((".bin", ".idx")):
        hint = f" Drop the {prefix[-4:]!r} suffix: entries are prefixes."
    return (
        f"data.paths entry {prefix!r} is not a Megatron indexed dataset: missing "
        f"{' and '.join(missing)}{where}.{hint}"
    )


def validate_data_config(data_cfg) -> None:
    """Raise one ValueError listing every problem in `data.*`, before any work starts."""
    from recipes.data.chat_validation import data_kind_problems, validate_chat_data_config

    if data_cfg.kind == "chat":
        return validate_chat_data_config(data_cfg)
    prefixes, _ = parse_blend(getattr(data_cfg, "paths", [BUNDLED]))
    problems = [
        problem
        for prefix in prefixes
        if prefix != BUNDLED and (problem := _missing_files_problem(prefix))
    ]
    if problems:
        problems.append(PATHS_HELP)
    problems += data_kind_problems(data_cfg)
    tokenizer_spec = getattr(data_cfg, "tokenizer", BYTE_SPEC)
    if tokenizer_spec != BYTE_SPEC:
        try:
            resolve_tokenizer_file(str(tokenizer_spec))
        except ValueError as error:
            problems.append(str(error))
    try:
        parse_split(getattr(data_cfg, "split", "98,2,0"))
    except ValueError as error:
        problems.append(str(error))
    seq_length = getattr(data_cfg, "seq_length", 1)
    if not isinstance(seq_length, int) or isinstance(seq_length, bool) or seq_length < 1:
        problems.append(f"data.seq_length = {seq_length!r}: expected a positive integer.")
    if problems:
        raise ValueError(" ".join(problems))
