"""torchrun worker (2 processes) for test_optim.py; writes its results to argv[1].

dp2_overlap_*: DP=2, Megatron DDP averages the two ranks' gradients; compared with
    the gradients of an unwrapped copy of the model on the concatenated batch.
tp2: TP=2, gradients set by hand (slices of one full tensor per parameter), one
    optimizer step; the full tensors before/after are saved for a float64 check.
"""

import sys

import torch
import torch.distributed as dist

from engine_testutil import batch, configs, dp_slice, gather_tp, lm_loss, tiny_gpt, tp_shard
from falcon_h1.megatron_compat.parallel import initialize_parallel
from recipes.optim import build_optimizer, wrap_model

HYPER = dict(lr=0.05, min_lr=0.0, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6, grad_clip=1.0)


def dp2_grad_errors(overlap: bool) -> dict:
    initialize_parallel(tp=1)
    tokens = batch(0, 4)

    reference, _ = tiny_gpt(seed=11)
    lm_loss(reference, tokens).backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}

    model, config = tiny_gpt(seed=11)
    train_cfg, parallel_cfg = configs(**HYPER)
    parallel_cfg.overlap_grad_reduce = overlap
    parallel_cfg.ddp_bucket_size = 3000  # several buckets, so bucketed async reduction runs
    ddp = wrap_model(model, parallel_cfg, train_cfg, config)
    ddp.zero_grad_buffer()
    lm_loss(ddp, dp_slice(tokens)).backward()
    ddp.finish_grad_sync()
    errors = {
        n: ((p.main_grad - expected[n]).norm() / expected[n].norm()).item()
        for n, p in ddp.module.named_parameters()
    }
    buckets = sum(len(group.buckets) for group in ddp.bucket_groups)
    gathered = [None, None]
    dist.all_gather_object(gathered, errors)
    return {"rel_errors": gathered, "buckets": buckets}


def tp2_step() -> dict:
    initialize_parallel(tp=2)
    model, config = tiny_gpt(seed=13)
    train_cfg, parallel_cfg = configs(**HYPER)
    ddp = wrap_model(model, parallel_cfg, train_cfg, config)
    optimizer = build_optimizer(ddp, train_cfg, parallel_cfg)
    named = dict(ddp.module.named_parameters())
    start = {n: gather_tp(p) for n, p in named.items()}
    generator = torch.Generator().manual_seed(17)  # same full gradients on both ranks
    grads = {n: torch.randn(start[n].shape, generator=generator) * 0.5 for n in named}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    for n, p in named.items():
        p.main_grad.copy_(tp_shard(grads[n], p))
    update_successful, grad_norm, _ = optimizer.step()
    assert update_successful
    return {
        "start": start,
        "grads": grads,
        "final": {n: gather_tp(p) for n, p in named.items()},
        "grad_norm": grad_norm,
        "replicated": [n for n, p in named.items() if not getattr(p, "tensor_model_parallel", False)],
    }


if __name__ == "__main__":
    results = {f"dp2_overlap_{overlap}": dp2_grad_errors(overlap) for overlap in (False, True)}
    results["tp2"] = tp2_step()
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
