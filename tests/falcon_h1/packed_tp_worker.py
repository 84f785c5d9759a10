"""torchrun worker: the packed rows of tests/falcon_h1/packed_model.py through the model at TP=2
(per variant: fused or unfused projections, with or without sequence parallelism); rank 0 saves
the logits, the per-token loss and the TP-gathered gradients for the test to compare with every
document run alone at TP=1."""

import sys

import torch
import torch.distributed as dist

from falcon_h1.megatron_compat.parallel import initialize_parallel
from falcon_h1.model import allreduce_sequence_parallel_grads, build_model
from tests.falcon_h1.packed_model import CONFIG, ROWS, batch, run_packed

SEED = 7
# variant -> (fused projections, sequence parallel)
VARIANTS = {"fused": (True, False), "unfused": (False, False), "fused_sp": (True, True)}


def run(variant: str) -> dict:
    fused, sequence_parallel = VARIANTS[variant]
    model = build_model(CONFIG.replace(fused_projections=fused), seed=SEED, sequence_parallel=sequence_parallel)
    data = batch(ROWS, CONFIG.vocab_size)
    return run_packed(model, data, after_backward=allreduce_sequence_parallel_grads)


if __name__ == "__main__":
    initialize_parallel(tp=2)
    results = {variant: run(variant) for variant in VARIANTS}
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
