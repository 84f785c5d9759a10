"""torchrun worker (2 processes) for test_checkpointing.py.

    ckpt_worker.py first  ROOT OUT   at TP=2: train STEPS straight; then, from the same
                                     seed, train STEPS/2 and save; then one dropout-free
                                     step from the saved state (the resharding reference)
    ckpt_worker.py resume ROOT OUT   fresh processes, other seed: load at TP=2 and train
                                     to STEPS; load at TP=1 (DP=2) and redo the
                                     dropout-free step

Each variant (Megatron's plain and distributed optimizer) uses its own ROOT/<variant>.
Dropout is on, so an identical resume needs the RNG states restored too.
"""

import hashlib
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine_testutil import configs, gather_tp, tiny_gpt, train
from falcon_h1.megatron_compat.parallel import initialize_parallel
from recipes.checkpointing import load_latest_checkpoint, save_checkpoint
from recipes.optim import build_optimizer, wrap_model
from recipes.schedules import build_scheduler

STEPS, GLOBAL_BATCH, SEED = 6, 4, 21
VARIANTS = {"plain": False, "distributed_optimizer": True}


def setup(tp: int, seed: int, distributed_optimizer: bool):
    initialize_parallel(tp=tp, seed=seed)
    model, config = tiny_gpt(seed, dropout=0.1)
    train_cfg, parallel_cfg = configs(
        lr=0.01, min_lr=0.001, warmup_steps=2, max_steps=STEPS, lr_decay_style="cosine", weight_decay=0.1
    )
    parallel_cfg.distributed_optimizer = distributed_optimizer
    ddp = wrap_model(model, parallel_cfg, train_cfg, config)
    optimizer = build_optimizer(ddp, train_cfg, parallel_cfg)
    return ddp, optimizer, build_scheduler(optimizer, train_cfg)


def full_weights(ddp) -> dict:
    return {n: gather_tp(p) for n, p in ddp.module.named_parameters()}


def dropout_free_step(ddp, optimizer, scheduler, step: int) -> dict:
    ddp.eval()
    train(ddp, optimizer, scheduler, step, 1, GLOBAL_BATCH)
    ddp.train()
    return full_weights(ddp)


def rng_fingerprint() -> str:
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()


def first(root: Path, distributed_optimizer: bool) -> dict:
    straight = train(*setup(2, SEED, distributed_optimizer), 0, STEPS, GLOBAL_BATCH)

    ddp, optimizer, scheduler = setup(2, SEED, distributed_optimizer)
    half = train(ddp, optimizer, scheduler, 0, STEPS // 2, GLOBAL_BATCH)
    started = time.perf_counter()
    save_checkpoint(root, STEPS // 2, ddp, optimizer, scheduler, extra={"next_batch": STEPS // 2})
    save_seconds = time.perf_counter() - started
    fingerprints = [None, None]
    dist.all_gather_object(fingerprints, rng_fingerprint())
    saved = full_weights(ddp)
    after_step = dropout_free_step(ddp, optimizer, scheduler, STEPS // 2)
    return dict(straight=straight, half=half, rng=fingerprints, saved=saved,
                after_step=after_step, save_seconds=save_seconds)


def resume(root: Path, distributed_optimizer: bool) -> dict:
    ddp, optimizer, scheduler = setup(2, SEED + 1, distributed_optimizer)
    started = time.perf_counter()
    step, extra = load_latest_checkpoint(root, ddp, optimizer, scheduler)
    load_seconds = time.perf_counter() - started
    fingerprints = [None, None]
    dist.all_gather_object(fingerprints, rng_fingerprint())
    resumed = train(ddp, optimizer, scheduler, extra["next_batch"], STEPS - step, GLOBAL_BATCH)

    ddp, optimizer, scheduler = setup(1, SEED + 2, distributed_optimizer)  # DP=2 now
    step_tp1, _ = load_latest_checkpoint(root, ddp, optimizer, scheduler)
    loaded_tp1 = full_weights(ddp)
    after_step_tp1 = dropout_free_step(ddp, optimizer, scheduler, step_tp1)
    return dict(step=step, extra=extra, rng=fingerprints, resumed=resumed, step_tp1=step_tp1,
                loaded_tp1=loaded_tp1, after_step_tp1=after_step_tp1, load_seconds=load_seconds)


if __name__ == "__main__":
    phase, root, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    run = {"first": first, "resume": resume}[phase]
    results = {name: run(root / name, flag) for name, flag in VARIANTS.items()}
    if dist.get_rank() == 0:
        torch.save(results, out)
