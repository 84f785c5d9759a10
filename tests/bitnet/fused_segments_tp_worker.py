"""torchrun worker (2 processes, gloo): the Falcon-H1 micro model with BitNet and FUSED mixer
projections (segment-quantised) at TP=2 and at TP=1 from the same seed; rank 0 saves, per
variant and TP size, logits, loss, gradients and the fake-quantised weights (all in the HF
layout, gathered over TP) to argv[1].

float64 parameters: TP=2 and TP=1 (other summation orders) then differ by float64 rounding
only, far below anything that could move an activation across a quantisation boundary (in
float32 a one-ulp difference can, now and then, and the comparison would test luck). For the
same reason no variant uses the int8 GEMM, whose CPU reference rescales in float32; its TP
communication is the float path's (`_gather_input`, the segment absmax all-reduce).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from bitnet import reference
from bitnet.layers import bitnet_layers
from bitnet.spec import falcon_h1_linear_spec
from falcon_h1.megatron_compat.parallel import initialize_parallel
from falcon_h1.model import allreduce_sequence_parallel_grads, build_model
from falcon_h1.presets import get_preset
from falcon_h1.weights import gather_hf_state
from recipes.config import BitNetConfig

ALL = ["attention_qkv", "attention_out", "mamba_in", "mamba_out", "mlp"]
# variant -> (bitnet config, sequence parallel)
VARIANTS = {
    "all": (dict(layers=ALL), False),
    # q/k/v rows quantised, z..dt rows full precision; y_ssm columns quantised, o_attn not.
    "partial_sp": (dict(layers=["attention_qkv", "mamba_out", "mlp"]), True),
    "partial_subln_sp": (dict(layers=["mamba_in", "attention_out", "mlp"], subln=True), True),
}
SEED = 21


def build(tp: int, variant: str, fused: bool = True):
    bitnet, sequence_parallel = VARIANTS[variant]
    initialize_parallel(tp, 1, SEED)
    cfg = get_preset("falcon_h1_micro").replace(fused_projections=fused)
    linears = falcon_h1_linear_spec(BitNetConfig(enabled=True, **bitnet), cfg.kernel_backend)
    model = build_model(cfg, linears=linears, seed=SEED, sequence_parallel=sequence_parallel)
    return model.double()


def batch():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)


@torch.no_grad()
def fake_quantized_hf_state(model) -> dict:
    """HF-layout weights with every BitNet weight replaced by ternary * scale (what the GEMMs
    use; full-precision segments read 0)."""
    saved = []
    for _, layer in bitnet_layers(model):
        ternary, scale = layer.quantized_weight()
        dequantised = reference.dequantize_weights(ternary, scale, layer.weight.dtype, layer.bitnet_segments)
        saved.append((layer.weight, layer.weight.data))
        layer.weight.data = dequantised
    state = dict(gather_hf_state(model))
    for param, data in saved:
        param.data = data
    return state


def run(tp: int, variant: str) -> dict:
    model = build(tp, variant)
    ids, labels = batch()
    logits = model(ids)
    loss = model(ids, labels=labels).mean()
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    return {
        "logits": logits.detach(),
        "loss": loss.detach(),
        "grads": dict(gather_hf_state(model, grads=True)),
        "quantized": fake_quantized_hf_state(model),
        "segments": {n: repr(m.bitnet_segments) for n, m in bitnet_layers(model) if m.bitnet_segments},
    }


def main():
    out_path = sys.argv[1]
    results = {f"{variant}_tp{tp}": run(tp, variant) for tp in (2, 1) for variant in VARIANTS}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
