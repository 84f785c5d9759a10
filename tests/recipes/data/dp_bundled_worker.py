"""torchrun worker: 2 gloo ranks build the bundled corpus datasets and read DP slices.

Rank 0 checks the gathered DP=2 micro-batches against its own DP=1 iteration.
"""

import sys

import torch
import torch.distributed as dist

from recipes.config import DataConfig
from recipes.data import build_tokenizer, build_train_valid_datasets, make_data_iterator

SEQ, MICRO, STEPS, CONSUMED, SEED = 32, 2, 3, 8, 7


def main(cache_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = build_tokenizer("byte")
    data_cfg = DataConfig(cache_dir=cache_dir)
    train, _ = build_train_valid_datasets(data_cfg, SEQ, SEED, 64, 8, tokenizer)
    mine_iter = make_data_iterator(train, MICRO, rank, world, CONSUMED, SEED)
    mine = torch.stack([next(mine_iter)["tokens"] for _ in range(STEPS)])
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        reference = make_data_iterator(train, MICRO * world, 0, 1, CONSUMED, SEED)
        for step in range(STEPS):
            joined = torch.cat([gathered[r][step] for r in range(world)])
            assert torch.equal(joined, next(reference)["tokens"]), f"step {step} differs"
        print("DP2 == DP1", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
