"""Train/valid datasets from `data.*` through Megatron's dataset builder.

Megatron's `BlendedMegatronDatasetBuilder` + `GPTDataset` do the sampling
(document shuffling, packing documents into seq_length+1 windows, blending by
weight) and cache their index arrays under `<cache>/indices`. They run on CPU
as they are: the index helpers are the compiled `helpers_cpp` shipped in the
wheel, and the only torch.distributed calls are rank-0-first barriers, taken
when a process group (gloo or NCCL) is initialised. Every rank builds the
datasets (`is_built_on_rank` defaults to True), so each reads its own slice
without a broadcast; under multi-node training `data.cache_dir` should be on a
shared filesystem, as Megatron's other ranks load the indices rank 0 wrote.
"""

from __future__ import annotations

from typing import Callable, Optional

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from falcon_h1.errors import ConfigValueError
from recipes.data.bundled import BUNDLED, ensure_bundled_dataset, resolve_cache_dir
from recipes.data.config_checks import validate_data_config
from recipes.data.validation import parse_blend, parse_split

SPLIT_NAMES = ("train", "valid", "test")


def _check_splits_have_documents(prefixes: list[str], split: str) -> None:
    """Megatron loops forever on a split with no tokens; say which split is empty instead."""
    fractions = parse_split(split)
    bounds = [0.0]
    for fraction in fractions:
        bounds.append(bounds[-1] + fraction)
    for prefix in prefixes:
        num_documents = len(IndexedDataset(prefix).sequence_lengths)
        for index, name in enumerate(SPLIT_NAMES):
            if fractions[index] == 0:
                continue
            begin = int(round(bounds[index] * num_documents))
            end = int(round(bounds[index + 1] * num_documents))
            if end <= begin:
                raise ConfigValueError(
                    "data.split", split, f"a split that gives the {name} split documents",
                    message=f"data.split = {split!r} leaves the {name} split of data.paths entry "
                    f"{prefix!r} without documents (it has {num_documents}); give that split a "
                    f"larger share, set its share to 0, or use a dataset with more documents."
                )


def build_gpt_dataset_config(data_cfg, seq_length: int, seed: int, tokenizer, prefixes, weights):
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=data_cfg.split,
        path_to_cache=str(resolve_cache_dir(data_cfg.cache_dir) / "indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # The model builds its own causal mask; a [s, s] mask per sample is waste.
        create_attention_mask=False,
    )


def build_train_valid_datasets(
    data_cfg,
    seq_length: int,
    seed: int,
    num_train_samples: int,
    num_valid_samples: int,
    tokenizer,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
):
    """(train, valid) Megatron datasets for `data_cfg`; valid is None when its split is 0.

    Each sample is a dict of `seq_length`-long "tokens", "labels" (tokens shifted
    by one, read from a seq_length+1 window), "loss_mask" and "position_ids".
    Call on every rank when torch.distributed is initialised.
    """
    if data_cfg.kind != "text":
        raise ConfigValueError(
            "data.kind", data_cfg.kind, "text for pretraining datasets",
            message=f"data.kind = {data_cfg.kind!r} is not allowed for pretraining datasets (documents "
            f"packed without boundaries, loss on every token): allowed data.kind = text; chat "
            f"data is built by recipes.data.build_chat_datasets for fine-tuning."
        )
    validate_data_config(data_cfg)
    prefixes, weights = parse_blend(data_cfg.paths)
    cache_dir = data_cfg.cache_dir
    prefixes = [
        ensure_bundled_dataset(tokenizer, cache_dir) if prefix == BUNDLED else prefix
        for prefix in prefixes
    ]
    sizes = [num_train_samples, num_valid_samples, 0]
    _check_splits_have_documents(prefixes, data_cfg.split)
    config = build_gpt_dataset_config(data_cfg, seq_length, seed, tokenizer, prefixes, weights)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    train, valid, _ = builder.build()
    return train, valid
