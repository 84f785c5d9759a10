"""torchrun worker (2 processes, gloo): BitNet models at TP=2 and at TP=1 from the same seed;
rank 0 saves every snapshot (gathered ternary weights, scales, grads, outputs) to argv[1].

- the tiny BitNet GPT, with and without SubLN;
- a column -> row BitNet pair with sequence parallelism (the local GPT spec's torch norms
  refuse sequence parallelism, so it is tested on the layers alone), also on the int8 GEMM
  path (its CPU fallback: same communication, float64 GEMM), and what its backward keeps of
  the column layer's input.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bitnet_testutil import (  # noqa: E402
    HIDDEN,
    bitnet_snapshot,
    gather_tp,
    gpt_loss,
    tiny_batch,
    tiny_config,
    tiny_gpt,
)

from falcon_h1.megatron_compat.parallel import initialize_parallel  # noqa: E402
from recipes.config import BitNetConfig  # noqa: E402

SEED = 1234


def run_gpt(tp: int, subln: bool):
    initialize_parallel(tp, 1, SEED)  # also re-seeds: same master weights for every TP size
    model = tiny_gpt(BitNetConfig(enabled=True, subln=subln), tp=tp)
    loss = gpt_loss(model, tiny_batch())
    loss.backward()
    return bitnet_snapshot(model, loss.detach())


class ColumnRowPair(torch.nn.Module):
    def __init__(self, config, subln: bool, int8: bool):
        super().__init__()
        from bitnet.layers import BitNetColumnParallelLinear, BitNetLinearOptions, BitNetRowParallelLinear

        options = BitNetLinearOptions(subln=subln, int8_matmul=int8, keep_int8_input=True)  # the int8 path under SP
        init = torch.nn.init.normal_
        self.up = BitNetColumnParallelLinear(
            HIDDEN, 4 * HIDDEN, config=config, init_method=init, bias=True, gather_output=False,
            bitnet_options=options,
        )
        self.down = BitNetRowParallelLinear(
            4 * HIDDEN, HIDDEN, config=config, init_method=init, bias=False,
            input_is_parallel=True, skip_bias_add=False, bitnet_options=options,
        )

    def forward(self, x):
        h, _ = self.up(x)
        y, _ = self.down(torch.nn.functional.gelu(h))
        return y


def run_pair(tp: int, sequence_parallel: bool, subln: bool, int8: bool = False):
    from megatron.core import parallel_state

    initialize_parallel(tp, 1, SEED)
    config = tiny_config(tp, sequence_parallel=sequence_parallel)
    model = ColumnRowPair(config, subln, int8)
    # The bias is sharded and zero-initialised; give it the same full vector at every TP size.
    model.up.bias.data = torch.linspace(-1, 1, 4 * HIDDEN).chunk(tp)[
        parallel_state.get_tensor_model_parallel_rank()
    ].clone()
    x_full = torch.randn(8, 2, HIDDEN, generator=torch.Generator().manual_seed(7))
    loss_weights = torch.linspace(-1, 1, x_full.numel()).reshape(x_full.shape)

    def local(t):  # this rank's sequence slice under sequence parallelism
        if not sequence_parallel:
            return t
        return t.chunk(tp, dim=0)[parallel_state.get_tensor_model_parallel_rank()]

    x = local(x_full).clone().requires_grad_(True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = model(x)
    (y * local(loss_weights)).sum().backward()
    out = bitnet_snapshot(model, 0.0)
    seq_dim_gather = (lambda t: gather_tp(t, 0)) if sequence_parallel else (lambda t: t.detach().clone())
    out["y"] = seq_dim_gather(y.detach())
    out["x.grad"] = seq_dim_gather(x.grad)
    # (tokens, dtype) of what the backward keeps of the column layer's input (its feature width)
    kept_input = [(t.shape[0], str(t.dtype)) for t in kept if t.dim() == 3 and t.shape[-1] == HIDDEN]
    return out, kept_input


def main():
    out_path = sys.argv[1]
    results = {}
    for tp in (2, 1):
        for subln in (False, True):
            results[f"gpt_tp{tp}_subln{subln}"] = run_gpt(tp, subln)
            results[f"pair_tp{tp}_subln{subln}"], kept = run_pair(tp, tp > 1, subln)
            if not subln:
                results[f"kept_input_tp{tp}"] = kept
        results[f"pair_int8_tp{tp}"], results[f"kept_input_int8_tp{tp}"] = run_pair(tp, tp > 1, False, int8=True)
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
