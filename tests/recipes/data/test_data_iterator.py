"""Batch iterator: determinism, resume from consumed_samples, DP slices == the DP=1 batch."""

import itertools

import pytest
import torch

from recipes.data.iterator import make_data_iterator


class NumberedSamples(torch.utils.data.Dataset):
    """Sample i holds the value i everywhere, so a batch shows which indices it took."""

    def __init__(self, length: int, seq: int = 4) -> None:
        self.length, self.seq = length, seq

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        full = torch.full((self.seq,), index, dtype=torch.int64)
        return {"tokens": full, "labels": full + 1, "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def take(iterator, count):
    return list(itertools.islice(iterator, count))


def indices(batch):
    return batch["tokens"][:, 0].tolist()


def test_batches_follow_the_dataset_order_with_expected_types():
    batches = take(make_data_iterator(NumberedSamples(100), 4, 0, 1, 0, seed=1), 3)
    assert [indices(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    batch = batches[0]
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    for key in ("tokens", "labels", "position_ids"):
        assert batch[key].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32 and batch["tokens"].shape == (4, 4)


def test_same_arguments_same_batches_and_resume_continues():
    dataset = NumberedSamples(50)
    full = take(make_data_iterator(dataset, 2, 0, 1, 0, seed=5), 40)  # wraps past one epoch
    again = take(make_data_iterator(dataset, 2, 0, 1, 0, seed=5), 40)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(full, again))
    resumed = take(make_data_iterator(dataset, 2, 0, 1, consumed_samples=26, seed=5), 27)
    assert [indices(b) for b in resumed] == [indices(b) for b in full[13:40]]


def test_dp_slices_concatenate_to_the_dp1_global_batch():
    dataset = NumberedSamples(37)
    global_batch, steps, consumed = 8, 12, 16  # start mid-run and wrap the epoch
    dp1 = take(make_data_iterator(dataset, global_batch, 0, 1, consumed, seed=2), steps)
    for dp_size in (2, 4):
        micro = global_batch // dp_size
        ranks = [take(make_data_iterator(dataset, micro, r, dp_size, consumed, seed=2), steps)
                 for r in range(dp_size)]
        for step in range(steps):
            joined = torch.cat([ranks[r][step]["tokens"] for r in range(dp_size)])
            assert torch.equal(joined, dp1[step]["tokens"])


def test_later_epochs_are_reshuffled_permutations():
    dataset = NumberedSamples(30)
    batches = take(make_data_iterator(dataset, 5, 0, 1, 0, seed=9), 18)
    stream = [index for batch in batches for index in indices(batch)]
    epochs = [stream[0:30], stream[30:60], stream[60:90]]
    assert epochs[0] == list(range(30))
    for epoch in epochs[1:]:
        assert sorted(epoch) == list(range(30)) and epoch != list(range(30))
    assert epochs[1] != epochs[2]


def test_worker_processes_give_the_same_batches():
    dataset = NumberedSamples(20)
    inline = take(make_data_iterator(dataset, 3, 1, 2, 4, seed=0), 6)
    workers = take(make_data_iterator(dataset, 3, 1, 2, 4, seed=0, num_workers=1), 6)
    assert [indices(b) for b in inline] == [indices(b) for b in workers]


@pytest.mark.parametrize("kwargs, field", [
    (dict(micro_batch_size=0, dp_rank=0, dp_size=1), "micro_batch_size"),
    (dict(micro_batch_size=1, dp_rank=2, dp_size=2), "dp_rank"),
    (dict(micro_batch_size=1, dp_rank=0, dp_size=1, consumed_samples=-1), "consumed_samples"),
])
def test_bad_arguments_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_data_iterator(NumberedSamples(5), **kwargs)
