"""Micro-batches for one data-parallel rank, resumable from a sample count.

The global sample stream is the dataset's own order (Megatron's GPTDataset has
already shuffled it with the run's seed). Each step of the stream takes
`micro_batch_size * dp_size` consecutive samples and rank r keeps the r-th
slice, like Megatron's pretraining sampler. Hence:

* a global batch is the same set of samples whatever dp_size is (DP=2's two
  slices concatenated equal DP=1's micro-batch of twice the size), and
* restarting at `consumed_samples` (the global count, all ranks together)
  continues with exactly the samples an uninterrupted run would have seen.

Past the end of the dataset the stream wraps into another epoch, reshuffled
with `seed` so a repeated pass is not a verbatim replay.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class GlobalStreamSampler:
    """Yields this rank's list of dataset indices per micro-batch, forever."""

    def __init__(
        self,
        dataset_length: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        seed: int = 0,
    ) -> None:
        _check_positive("dataset length", dataset_length)
        _check_positive("micro_batch_size", micro_batch_size)
        _check_positive("dp_size", dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank = {dp_rank}: must be in [0, dp_size={dp_size}).")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples = {consumed_samples}: must be >= 0.")
        self.dataset_length = dataset_length
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self.seed = seed
        self._epoch_order: dict[int, np.ndarray] = {}

    def _dataset_index(self, stream_position: int) -> int:
        epoch, offset = divmod(stream_position, self.dataset_length)
        if epoch == 0:
            return offset
        if epoch not in self._epoch_order:
            self._epoch_order = {
                epoch: np.random.RandomState([self.seed, epoch]).permutation(self.dataset_length)
            }
        return int(self._epoch_order[epoch][offset])

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        while True:
            yield [self._dataset_index(start + i) for i in range(self.micro_batch_size)]
            start += step


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} = {value}: must be >= 1.")


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_KEYS}
    for key in ("tokens", "labels", "position_ids"):
        batch[key] = batch[key].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


def make_data_iterator(
    dataset,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
    seed: int = 0,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless iterator of {"tokens", "labels", "loss_mask", "position_ids"} [b, s] batches.

    `num_workers` > 0 reads samples in DataLoader worker processes (data.num_workers).
    """
    sampler = GlobalStreamSampler(
        len(dataset), micro_batch_size, dp_rank, dp_size, consumed_samples, seed
    )
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate,
            persistent_workers=True,
        )
        return iter(loader)
    return (collate([dataset[i] for i in indices]) for indices in sampler)
