"""The token data's checks (`data.kind = "tokens"`), with errors that name the field;
`recipes.data.config_checks.validate_data_config` runs them with the chat data's.

`data.paths` is either plain prefixes (["/a/prefix", "/b/prefix"], blended in
proportion to their sizes) or weight/prefix pairs (["0.7", "/a", "0.3", "/b"]),
Megatron's `--data-path` convention. "bundled" is the shipped corpus.

Each prefix's `.idx` is read (header and sizes only) and the `.bin` size checked against it,
so a truncated file is named before training. `check_token_ids_fit` compares the largest
token id in each `.bin` with the model's vocabulary (one scan per file, remembered in
`data.cache_dir` by the file's size and modification time).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Optional, Sequence

from falcon_h1.errors import ConfigValueError, is_int_at_least
from recipes.data.bundled import BUNDLED, resolve_cache_dir

# Megatron's .idx layout: magic, version (<Q), dtype code (<B), sequence count (<Q), document
# count (<Q), then int32 sequence lengths, int64 sequence pointers, int64 document indices.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
_SCAN_CHUNK = 1 << 26  # tokens per read while looking for the largest id

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
    """`data.paths` -> (prefixes, weights or None). Raises ConfigValueError naming data.paths."""
    if isinstance(paths, str) or not hasattr(paths, "__iter__"):
        raise ConfigValueError("data.paths", paths, PATHS_HELP, message=f"data.paths = {paths!r}: expected a list. {PATHS_HELP}")
    items = [str(item) for item in paths]
    if not items:
        raise ConfigValueError("data.paths", items, PATHS_HELP, message=f"data.paths is empty. {PATHS_HELP}")
    if _as_weight(items[0]) is None:
        numeric = [item for item in items if _as_weight(item) is not None]
        if numeric:
            raise ConfigValueError(
                "data.paths", items, PATHS_HELP,
                message=f"data.paths = {items}: mixes prefixes with weights ({', '.join(numeric)}); "
                f"either give no weights or start with a weight and alternate. {PATHS_HELP}"
            )
        return items, None
    if len(items) % 2:
        raise ConfigValueError(
            "data.paths", items, PATHS_HELP,
            message=f"data.paths = {items}: weighted form needs weight/prefix pairs, got an odd "
            f"number of entries ({len(items)}). {PATHS_HELP}"
        )
    weights, prefixes = [], []
    for position in range(0, len(items), 2):
        weight_text, prefix = items[position], items[position + 1]
        weight = _as_weight(weight_text)
        if weight is None:
            raise ConfigValueError(
                f"data.paths[{position}]", weight_text, "a weight (number)",
                message=f"data.paths[{position}] = {weight_text!r} is not a number; in the weighted "
                f"form every even entry is a weight. {PATHS_HELP}"
            )
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigValueError(
                f"data.paths[{position}]", weight_text, "a positive number",
                message=f"data.paths[{position}] = {weight_text!r}: weights must be positive numbers."
            )
        if _as_weight(prefix) is not None:
            raise ConfigValueError(
                f"data.paths[{position + 1}]", prefix, "a dataset prefix",
                message=f"data.paths[{position + 1}] = {prefix!r} is a number where a prefix was "
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
        raise ConfigValueError(
            "data.split", split, "up to three non-negative numbers 'train,valid,test'",
            message=f"data.split = {split!r}: expected up to three non-negative numbers "
            f"'train,valid,test', e.g. '98,2,0'."
        )
    values += [0.0] * (3 - len(values))
    if values[0] <= 0:
        raise ConfigValueError("data.split", split, "a train share (first number) > 0",
                               message=f"data.split = {split!r}: the train share (first number) must be > 0.")
    total = sum(values)
    return [value / total for value in values]


def missing_files_problem(prefix: str) -> Optional[str]:
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


class _IndexInfo:
    """What a `.idx` says about its `.bin`: the token dtype and how many bytes of tokens."""

    def __init__(self, dtype, bin_bytes: int):
        self.dtype, self.bin_bytes = dtype, bin_bytes


def read_index(prefix: str) -> _IndexInfo:
    """Read `prefix.idx` (header and last entry only); ValueError naming the file if it is
    truncated or not a Megatron index."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType

    idx = f"{prefix}.idx"
    size = os.path.getsize(idx)
    with open(idx, "rb") as stream:
        header = stream.read(_IDX_HEADER_BYTES)
        if len(header) < _IDX_HEADER_BYTES or header[:9] != _IDX_MAGIC:
            raise ValueError(f"{idx} is not a Megatron index file (bad or truncated header, {size} bytes); "
                             "re-create it with falcon-preprocess.")
        version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
        try:
            dtype = DType.dtype_from_code(code)
        except (KeyError, ValueError):
            raise ValueError(f"{idx} names token dtype code {code}, which Megatron does not know; "
                             "re-create it with falcon-preprocess.") from None
        expected = _IDX_HEADER_BYTES + sequences * (4 + 8) + documents * 8
        if version != 1 or size < expected:
            raise ValueError(
                f"{idx} is truncated: {size} bytes, but its header (version {version}, {sequences} sequences, "
                f"{documents} documents) needs {expected}; re-create it with falcon-preprocess.")
        if sequences == 0:
            return _IndexInfo(dtype, 0)
        stream.seek(_IDX_HEADER_BYTES + (sequences - 1) * 4)
        (last_length,) = struct.unpack("<i", stream.read(4))
        stream.seek(_IDX_HEADER_BYTES + sequences * 4 + (sequences - 1) * 8)
        (last_pointer,) = struct.unpack("<q", stream.read(8))
    return _IndexInfo(dtype, last_pointer + last_length * np.dtype(dtype).itemsize)


def index_files_problem(prefix: str) -> Optional[str]:
    """Why `prefix.idx` / `prefix.bin` cannot be read as one dataset, or None."""
    try:
        info = read_index(prefix)
    except ValueError as error:
        return f"data.paths entry {prefix!r}: {error}"
    size = os.path.getsize(f"{prefix}.bin")
    if size < info.bin_bytes:
        return (f"data.paths entry {prefix!r}: {prefix}.bin is truncated: {size} bytes, but {prefix}.idx "
                f"describes {info.bin_bytes} bytes of tokens; re-create both with falcon-preprocess.")
    return None


def raise_problems(problems: list[ConfigValueError]) -> None:
    """Raise every problem found at once: one ConfigValueError with the first one's key and value
    and all their messages, in order."""
    if problems:
        first = problems[0]
        raise ConfigValueError(first.key, first.value, first.allowed, message=" ".join(map(str, problems)))


def split_and_length_problems(data_cfg, least: int, why: str = "") -> list[ConfigValueError]:
    """The problems of `data.split` and of `data.seq_length` (an integer >= least; `why` says
    why, for the message)."""
    problems = []
    try:
        parse_split(data_cfg.split)
    except ConfigValueError as error:
        problems.append(error)
    seq_length = data_cfg.seq_length
    if not is_int_at_least(seq_length, least):
        allowed = "a positive integer" if least == 1 else f"an integer >= {least}"
        problems.append(ConfigValueError("data.seq_length", seq_length, allowed,
                                         message=f"data.seq_length = {seq_length!r}: expected {allowed}{why}."))
    return problems


def check_token_ids_fit(data_cfg, vocab_size: int) -> None:
    """Raise ConfigValueError naming each `.bin` of `data.paths` that holds a token id outside
    [0, vocab_size): the embedding would fail on it mid-run. The bundled corpus is tokenized
    by `data.tokenizer`, whose vocabulary is checked against the model's separately."""
    import numpy as np

    if data_cfg.kind != "text":
        return  # chat data checks its ids as it tokenizes (recipes.data.chat)
    prefixes, _ = parse_blend(data_cfg.paths)
    problems = []
    for prefix in prefixes:
        if prefix == BUNDLED:
            continue
        dtype = np.dtype(read_index(prefix).dtype)
        if dtype.kind not in "iu":
            problems.append(f"{prefix}.bin stores {dtype} values, not integer token ids")
            continue
        if dtype.kind == "u" and np.iinfo(dtype).max < vocab_size:
            continue  # every value the file can hold is a valid id
        low, high = _token_id_range(f"{prefix}.bin", dtype, resolve_cache_dir(data_cfg.cache_dir))
        if low < 0 or high >= vocab_size:
            problems.append(f"{prefix}.bin holds token ids {low}..{high}")
    if problems:
        raise ConfigValueError(
            "data.paths", data_cfg.paths, f"data whose token ids are below model.vocab_size = {vocab_size}",
            message=f"data.paths: {'; '.join(problems)}, but model.vocab_size = {vocab_size} allows ids 0..{vocab_size - 1}. "
            "Allowed: data tokenized with a tokenizer of at most model.vocab_size tokens (data.tokenizer, "
            "falcon-preprocess --tokenizer), or a model.vocab_size above the largest id.")


def _token_id_range(bin_path: str, dtype, cache_dir: Path) -> tuple[int, int]:
    """(smallest, largest) token id in `bin_path`, scanned once per file version."""
    import numpy as np

    stat = os.stat(bin_path)
    real = os.path.realpath(bin_path)
    record_path = cache_dir / "token_id_ranges" / f"{hashlib.sha256(real.encode()).hexdigest()[:16]}.json"
    key = {"path": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": str(dtype)}
    try:
        record = json.loads(record_path.read_text())
        if {name: record.get(name) for name in key} == key:
            return record["min"], record["max"]
    except (OSError, ValueError, KeyError):
        pass
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    low, high = 0, 0
    if tokens.size:
        low, high = int(tokens[:1][0]), int(tokens[:1][0])
        for start in range(0, tokens.size, _SCAN_CHUNK):
            chunk = tokens[start:start + _SCAN_CHUNK]
            low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**key, "min": low, "max": high}))
        os.replace(tmp, record_path)
    except OSError:
        pass  # a read-only cache only costs the next run another scan
    return low, high
