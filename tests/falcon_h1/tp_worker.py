"""torchrun worker: for each variant, build the same model at the TP size given, run
forward/backward, and save logits, loss and TP-gathered gradients (HF layout) from rank 0;
the odd-vocabulary variant also exports the model with falcon_h1.to_hf."""

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from falcon_h1.hf import to_hf
from falcon_h1.megatron_compat.parallel import initialize_parallel
from falcon_h1.model import allreduce_sequence_parallel_grads, build_model
from falcon_h1.presets import get_preset
from falcon_h1.weights import gather_hf_state

# variant -> (fused projections, sequence parallel, vocab size); 1001 is odd: the last rank's
# vocabulary slice ends in padding rows.
VARIANTS = {"fused": (True, False, 100), "unfused": (False, False, 100), "fused_sp": (True, True, 100),
            "odd_vocab": (True, False, 1001)}


def _exported(model, directory: str) -> dict:
    from safetensors.torch import load_file

    to_hf(model, directory)
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {"config": json.loads((Path(directory) / "config.json").read_text()),
            "tensors": load_file(Path(directory) / "model.safetensors")}


def run(tp: int, variant: str):
    fused, sequence_parallel, vocab = VARIANTS[variant]
    initialize_parallel(tp=tp)
    cfg = get_preset("falcon_h1_micro").replace(fused_projections=fused, vocab_size=vocab)
    model = build_model(cfg, seed=7, sequence_parallel=sequence_parallel)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = torch.randint(0, vocab, (2, 24), generator=g)
    logits = model(ids)
    loss = model(ids, labels=labels).mean()
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    grads = dict(gather_hf_state(model, grads=True))
    params = dict(gather_hf_state(model))
    out = {"logits": logits.detach(), "loss": loss.detach(), "grads": grads, "params": params}
    if variant == "odd_vocab":
        with tempfile.TemporaryDirectory() as directory:
            directory = [directory]
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(directory, src=0)  # one directory for the collective export
            out["hf_export"] = _exported(model, directory[0])
    return out


if __name__ == "__main__":
    tp, out = int(sys.argv[1]), sys.argv[2]
    results = {variant: run(tp, variant) for variant in VARIANTS}
    if dist.get_rank() == 0:
        torch.save(results, out)
