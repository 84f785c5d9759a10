"""torchrun worker: the model at context-parallel size CP (and tensor-parallel size TP): forward
and backward on this rank's shard of each sequence; saves from rank 0 the whole-sequence logits
and per-token loss (shards gathered over the CP group) and the gradients summed over it (what
Megatron's DDP does over the data x context-parallel group), gathered over TP in the HF layout.
The model runs in float64 (see `run`).

    cp_worker.py CP TP OUT

once without and once with full recomputation.
"""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from falcon_h1.megatron_compat.parallel import initialize_parallel
from falcon_h1.context_parallel import ContextParallelLayout
from falcon_h1.model import allreduce_sequence_parallel_grads, build_model
from falcon_h1.presets import get_preset
from falcon_h1.weights import gather_hf_state

# n_groups 2 (micro), attention heads from a ratio that is not 0.5, every layer kind; 96 tokens:
# at CP = 2 each rank's 48 are three SSD chunks of 16, its two sequence chunks one and a half each
CONFIG = dict(vocab_size=100, attention_ratio=0.25, num_hidden_layers=4, layer_pattern="HMAH")
BATCH, SEQ = 2, 96


def inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 100, (BATCH, SEQ), generator=g), torch.randint(0, 100, (BATCH, SEQ), generator=g)


RECOMPUTE = ("none", "full")  # full: each layer's collectives rerun in the backward


def run(cp: int, tp: int = 1, sequence_parallel: bool = False, recompute: str = "none"):
    initialize_parallel(tp=tp, cp=cp)
    cfg = get_preset("falcon_h1_micro").replace(**CONFIG)
    # float64: in fp32, any two summation orders already move small, cancelling gradients (conv
    # biases) by ~1e-6; in float64 a correct split agrees to ~1e-15 (fp32 islands: the loss, A)
    model = build_model(cfg, seed=7, sequence_parallel=sequence_parallel, recompute=recompute).double()
    ids, labels = inputs()
    layout = model.context_parallel
    if layout is not None:
        ids, labels = layout.shard(ids, dim=1), layout.shard(labels, dim=1)
    logits = model(ids)
    loss = model(ids, labels=labels)
    loss.sum().backward()
    allreduce_sequence_parallel_grads(model)
    if layout is not None:
        group = parallel_state.get_context_parallel_group()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
        logits, loss = (_whole_sequence(t.detach(), layout, group) for t in (logits, loss))
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": dict(gather_hf_state(model, grads=True))}


def _whole_sequence(local, layout: ContextParallelLayout, group):
    shards = [torch.empty_like(local) for _ in range(layout.cp)]
    dist.all_gather(shards, local.contiguous(), group=group)
    return layout.unshard(shards, dim=1)


if __name__ == "__main__":
    cp, tp, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    results = {recompute: run(cp, tp, sequence_parallel=tp > 1, recompute=recompute) for recompute in RECOMPUTE}
    if dist.get_rank() == 0:
        torch.save(results, out)
