"""Shared by the BitNet tests and their torchrun worker: a tiny Megatron GPT on CPU."""

from __future__ import annotations

import torch

VOCAB, HIDDEN, LAYERS, HEADS, SEQ, BATCH = 64, 32, 2, 4, 16, 2


def tiny_config(tp: int = 1, **overrides):
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.megatron_compat.transformer import MEGATRON_FUSIONS_OFF

    kwargs = dict(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=4 * HIDDEN,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        **MEGATRON_FUSIONS_OFF,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        add_bias_linear=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def tiny_gpt(bitnet_cfg, tp: int = 1, **config_overrides):
    from megatron.core.models.gpt import GPTModel

    from bitnet.gpt import bitnet_gpt_layer_spec

    return GPTModel(
        config=tiny_config(tp, **config_overrides),
        transformer_layer_spec=bitnet_gpt_layer_spec(bitnet_cfg, normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def tiny_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return tokens[:, :-1].contiguous(), position_ids, tokens[:, 1:].contiguous()


def causal_mask():
    # Megatron's default causal mask is built on "cuda"; True = masked.
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]


def gpt_loss(model, batch):
    tokens, position_ids, labels = batch
    per_token = model(tokens, position_ids, attention_mask=causal_mask(), labels=labels)
    return per_token.float().mean()


def gpt_logits(model, batch):
    tokens, position_ids, _ = batch
    return model(tokens, position_ids, attention_mask=causal_mask())


def gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate a tensor-parallel shard over the TP group along `dim`."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def bitnet_snapshot(model, loss):
    """Full (gathered) ternary weights, scales and weight gradients of every BitNet linear."""
    from bitnet.layers import BitNetRowParallelLinear, bitnet_layers

    out = {"loss": float(loss)}
    for name, layer in bitnet_layers(model):
        dim = 1 if isinstance(layer, BitNetRowParallelLinear) else 0
        ternary, scale = layer.quantized_weight()
        out[f"{name}.ternary"] = gather_tp(ternary, dim)
        out[f"{name}.scale"] = scale.clone()
        out[f"{name}.grad"] = gather_tp(layer.weight.grad, dim)
    return out


# ------------------------------------------------ independent float64 quantisers (numpy)
def np_weight_quant(w):
    """Spec formulas in float64 numpy: (ternary, scale m, v = w * s before rounding)."""
    import numpy as np

    w = np.asarray(w, dtype=np.float64)
    m = max(np.abs(w).mean(), 1e-5)
    v = w * (1.0 / m)
    return np.clip(np.floor(v + 0.5), -1, 1), m, v


def np_activation_quant(x, absmax=None):
    """Spec formulas in float64 numpy, per row of the last dim: (int8 values, scale, v)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x).max(axis=-1) if absmax is None else np.asarray(absmax, dtype=np.float64)
    a = np.maximum(a, 1e-5)
    v = x * (127.0 / a)[..., None]
    return np.clip(np.floor(v + 0.5), -128, 127), a / 127.0, v


def near_tie(v, rel=1e-5):
    """Where float32 rounding of v could move it across a rounding boundary (k + 0.5)."""
    import numpy as np

    frac = v - np.floor(v)
    return np.abs(frac - 0.5) <= rel * np.maximum(np.abs(v), 1.0)


def assert_same_forward_and_grads(reference, candidate, x, tol: float = 1e-5) -> None:
    """`candidate` (loaded with `reference`'s weights) gives the same output, input gradient and
    weight gradient as `reference` on `x`, within `tol`."""
    candidate.load_state_dict(reference.state_dict())
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = reference(xa)[0], candidate(xb)[0]
    torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(candidate.weight.grad, reference.weight.grad, rtol=tol, atol=tol)
