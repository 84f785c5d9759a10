"""torchrun worker: for each variant, build the same model at the TP size given, run
forward/backward, and save logits, loss and TP-gathered gradients (HF layout) from rank 0."""

import sys

import torch
import torch.distributed as dist

from falcon_h1.megatron_compat.parallel import initialize_parallel
from falcon_h1.model import allreduce_sequence_parallel_grads, build_model
from falcon_h1.presets import get_preset
from falcon_h1.weights import gather_hf_state

VARIANTS = {"fused": (True, False), "unfused": (False, False), "fused_sp": (True, True)}


def run(tp: int, variant: str):
    fused, sequence_parallel = VARIANTS[variant]
    initialize_parallel(tp=tp)
    cfg = get_preset("falcon_h1_micro").replace(fused_projections=fused, vocab_size=100)
    model = build_model(cfg, seed=7, sequence_parallel=sequence_parallel)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 100, (2, 24), generator=g)
    labels = torch.randint(0, 100, (2, 24), generator=g)
    logits = model(ids)
    loss = model(ids, labels=labels).mean()
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    grads = dict(gather_hf_state(model, grads=True))
    params = dict(gather_hf_state(model))
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads, "params": params}


if __name__ == "__main__":
    tp, out = int(sys.argv[1]), sys.argv[2]
    results = {variant: run(tp, variant) for variant in VARIANTS}
    if dist.get_rank() == 0:
        torch.save(results, out)
