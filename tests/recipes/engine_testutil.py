"""A tiny Megatron GPTModel and a training step, shared by the optimizer and
checkpointing tests and their torchrun workers (which import this file from
their own folder). Runs on the GPU when there is one (CI: CPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from falcon_h1.megatron_compat.parallel import default_device
from falcon_h1.megatron_compat.transformer import MEGATRON_FUSIONS_OFF
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from recipes.config import ParallelConfig, TrainConfig

VOCAB, HIDDEN, LAYERS, HEADS, SEQ = 64, 32, 2, 4, 16


def tiny_gpt(seed: int, dropout: float = 0.0) -> tuple[GPTModel, TransformerConfig]:
    """Weights depend on `seed` only, not on the TP size (CPU init slices one master weight)."""
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        **MEGATRON_FUSIONS_OFF,
        hidden_dropout=dropout,
        attention_dropout=dropout,
    )
    torch.manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    return model.to(default_device()), config


def batch(index: int, size: int) -> torch.Tensor:
    """Token batch number `index` of a fixed synthetic stream, [size, SEQ + 1]."""
    generator = torch.Generator().manual_seed(1000 + index)
    return torch.randint(0, VOCAB, (size, SEQ + 1), generator=generator).to(default_device())


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of `tokens` [b, SEQ + 1]."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    b, s = inputs.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)
    # Megatron's default causal mask is created on 'cuda'; pass one (True = masked).
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), diagonal=1)
    mask = mask.expand(b, 1, s, s)
    return model(inputs, positions, mask, labels=labels).float().mean()


def dp_slice(tokens: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's equal share of a global batch."""
    size = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    per_rank = tokens.shape[0] // size
    return tokens[rank * per_rank : (rank + 1) * per_rank]


def train(ddp_model, optimizer, scheduler, first_step: int, steps: int, global_batch: int) -> list[float]:
    """Plain training steps on batch(step); returns the DP-averaged loss of each step."""
    losses = []
    for step in range(first_step, first_step + steps):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = lm_loss(ddp_model, dp_slice(batch(step, global_batch)))
        loss.backward()
        ddp_model.finish_grad_sync()
        update_successful, _, _ = optimizer.step()
        assert update_successful
        scheduler.step(1)
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=parallel_state.get_data_parallel_group())
        losses.append((reported / parallel_state.get_data_parallel_world_size()).item())
    return losses


def gather_tp(param: torch.Tensor) -> torch.Tensor:
    """The full (TP=1) tensor of a tensor-parallel shard, on the CPU."""
    if not getattr(param, "tensor_model_parallel", False):
        return param.detach().cpu().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, param.detach().contiguous(), group=group)
    return torch.cat(shards, dim=param.partition_dim).cpu()


def tp_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of `full`, laid out like the parameter `like`."""
    if not getattr(like, "tensor_model_parallel", False):
        return full
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=like.partition_dim)[rank]


def adam_state(optimizer, param: torch.Tensor) -> dict:
    """The torch Adam state of a model parameter inside Megatron's (chained) optimizer."""
    megatron_optimizer = getattr(optimizer, "unwrapped", optimizer)
    for inner in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        if param in inner.optimizer.state:
            return inner.optimizer.state[param]
    raise KeyError("parameter has no optimizer state")


def configs(**train_overrides) -> tuple[TrainConfig, ParallelConfig]:
    train = TrainConfig(**train_overrides)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return train, ParallelConfig(tp=tp, overlap_grad_reduce=False)
