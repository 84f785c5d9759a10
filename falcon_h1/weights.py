"""The Hugging Face layout is the model's canonical weight format.

Each local (per-TP-rank) parameter is a concatenation of rank slices of named
Hugging Face tensors; `_local_pieces` states that recipe once, and loading,
saving (gathering over TP) and initialisation all use it. Initialising in the
HF layout and slicing makes every TP size start from the same weights.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from falcon_h1.config import FalconH1Config

# Hugging Face's mamba in_proj and conv1d hold several logical tensors back to back;
# we address them as virtual tensors "<name>:<segment>".
MAMBA_IN_SEGMENTS = ("z", "x", "B", "C", "dt")
CONV_SEGMENTS = ("x", "B", "C")


@dataclass(frozen=True)
class Piece:
    hf_name: str      # real or virtual ("...in_proj.weight:z") HF tensor
    split_dim: int | None  # dim along which TP ranks take contiguous slices; None: replicated
    pad_rows_to: int = 0  # vocab padding of embeddings / lm_head


def _segment_sizes(cfg: FalconH1Config) -> dict[str, int]:
    gn = cfg.mamba_n_groups * cfg.mamba_d_state
    return {"z": cfg.d_ssm, "x": cfg.d_ssm, "B": gn, "C": gn, "dt": cfg.mamba_n_heads}


def _local_pieces(model) -> dict[str, tuple[list[Piece], int]]:
    """local parameter name -> (pieces, concatenation dim)."""
    cfg: FalconH1Config = model.cfg
    out: dict[str, tuple[list[Piece], int]] = {}
    if model.pre_process:
        out["embedding.weight"] = ([Piece("model.embed_tokens.weight", 0, model.vocab_padded)], 0)
    for j, layer in enumerate(model.layers):
        i = j + model.layer_offset
        hf = f"model.layers.{i}."
        loc = f"layers.{j}."
        out[loc + "pre_ff_layernorm.weight"] = ([Piece(hf + "pre_ff_layernorm.weight", None)], 0)
        out[loc + "mlp.linear_fc1.weight"] = (
            [Piece(hf + "feed_forward.gate_proj.weight", 0), Piece(hf + "feed_forward.up_proj.weight", 0)], 0)
        out[loc + "mlp.linear_fc2.weight"] = ([Piece(hf + "feed_forward.down_proj.weight", 1)], 1)
        if layer.kind == "mlp":
            continue
        out[loc + "input_layernorm.weight"] = ([Piece(hf + "input_layernorm.weight", None)], 0)
        mixer = layer.mixer
        attn_in = [Piece(hf + f"self_attn.{n}_proj.weight", 0) for n in "qkv"] if mixer.attention else []
        ssm_in = [Piece(hf + f"mamba.in_proj.weight:{s}", 0) for s in MAMBA_IN_SEGMENTS] if mixer.mamba else []
        ssm_out = [Piece(hf + "mamba.out_proj.weight", 1)] if mixer.mamba else []
        attn_out = [Piece(hf + "self_attn.o_proj.weight", 1)] if mixer.attention else []
        m = loc + "mixer."
        if mixer.fused:
            out[m + "in_proj.weight"] = (attn_in + ssm_in, 0)
            out[m + "out_proj.weight"] = (ssm_out + attn_out, 1)
        else:
            if mixer.attention:
                out[m + "attn_in_proj.weight"] = (attn_in, 0)
                out[m + "attn_out_proj.weight"] = (attn_out, 1)
            if mixer.mamba:
                out[m + "mamba_in_proj.weight"] = (ssm_in, 0)
                out[m + "mamba_out_proj.weight"] = (ssm_out, 1)
        if mixer.mamba:
            out[m + "conv1d_weight"] = ([Piece(hf + f"mamba.conv1d.weight:{s}", 0) for s in CONV_SEGMENTS], 0)
            if cfg.mamba_conv_bias:
                out[m + "conv1d_bias"] = ([Piece(hf + f"mamba.conv1d.bias:{s}", 0) for s in CONV_SEGMENTS], 0)
            for name in ("dt_bias", "A_log", "D"):
                out[m + name] = ([Piece(hf + f"mamba.{name}", 0)], 0)
            if cfg.mamba_rms_norm:
                out[m + "norm_weight"] = ([Piece(hf + "mamba.norm.weight", 0)], 0)
    if model.post_process:
        out["final_layernorm.weight"] = ([Piece("model.final_layernorm.weight", None)], 0)
        if not cfg.tie_word_embeddings:
            out["output_layer.weight"] = ([Piece("lm_head.weight", 0, model.vocab_padded)], 0)
    return out


def hf_tensor_shapes(cfg: FalconH1Config) -> dict[str, tuple[int, ...]]:
    """Shapes of the (virtual) Hugging Face tensors of a whole model."""
    H, V, F = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    d, seg = cfg.kv_channels, _segment_sizes(cfg)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.final_layernorm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i, kind in enumerate(cfg.layer_kinds):
        p = f"model.layers.{i}."
        shapes.update({
            p + "pre_ff_layernorm.weight": (H,), p + "feed_forward.gate_proj.weight": (F, H),
            p + "feed_forward.up_proj.weight": (F, H), p + "feed_forward.down_proj.weight": (H, F)})
        if kind != "mlp":
            shapes[p + "input_layernorm.weight"] = (H,)
        if kind in ("hybrid", "attention"):
            hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
            shapes.update({p + "self_attn.q_proj.weight": (hq * d, H), p + "self_attn.k_proj.weight": (hkv * d, H),
                           p + "self_attn.v_proj.weight": (hkv * d, H), p + "self_attn.o_proj.weight": (H, hq * d)})
        if kind in ("hybrid", "mamba"):
            for s in MAMBA_IN_SEGMENTS:
                shapes[p + f"mamba.in_proj.weight:{s}"] = (seg[s], H)
            for s in CONV_SEGMENTS:
                shapes[p + f"mamba.conv1d.weight:{s}"] = (seg[s], cfg.mamba_d_conv)
                if cfg.mamba_conv_bias:
                    shapes[p + f"mamba.conv1d.bias:{s}"] = (seg[s],)
            nh = cfg.mamba_n_heads
            shapes.update({p + "mamba.dt_bias": (nh,), p + "mamba.A_log": (nh,), p + "mamba.D": (nh,),
                           p + "mamba.out_proj.weight": (H, cfg.d_ssm)})
            if cfg.mamba_rms_norm:
                shapes[p + "mamba.norm.weight"] = (cfg.d_ssm,)
    return shapes


# ---- virtual <-> real Hugging Face tensors ----
def split_hf_state(cfg: FalconH1Config, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real HF tensors -> virtual ones (mamba in_proj / conv split into segments, conv [C,1,k] -> [C,k])."""
    seg = _segment_sizes(cfg)
    out = {}
    for name, t in hf_state.items():
        if name.endswith("mamba.in_proj.weight"):
            for s, part in zip(MAMBA_IN_SEGMENTS, t.split([seg[s] for s in MAMBA_IN_SEGMENTS])):
                out[f"{name}:{s}"] = part
        elif name.endswith("mamba.conv1d.weight") or name.endswith("mamba.conv1d.bias"):
            t = t.squeeze(1) if t.dim() == 3 else t
            for s, part in zip(CONV_SEGMENTS, t.split([seg[s] for s in CONV_SEGMENTS])):
                out[f"{name}:{s}"] = part
        else:
            out[name] = t
    return out


def merge_hf_state(virtual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of split_hf_state."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in virtual.items():
        if ":" in name:
            base, s = name.split(":")
            groups.setdefault(base, {})[s] = t
        else:
            out[name] = t
    for base, parts in groups.items():
        order = MAMBA_IN_SEGMENTS if "in_proj" in base else CONV_SEGMENTS
        t = torch.cat([parts[s] for s in order if s in parts])
        out[base] = t.unsqueeze(1) if base.endswith("conv1d.weight") else t
    return out


def _rank_slice(t: torch.Tensor, piece: Piece, tp: int, rank: int) -> torch.Tensor:
    if piece.split_dim is None:
        return t
    if piece.pad_rows_to and t.shape[0] < piece.pad_rows_to:
        t = torch.cat([t, t.new_zeros(piece.pad_rows_to - t.shape[0], *t.shape[1:])])
    return t.chunk(tp, dim=piece.split_dim)[rank]


@torch.no_grad()
def load_local_from_hf(model, get_hf: Callable[[str], torch.Tensor]) -> None:
    """Fill this rank's parameters from (virtual) HF tensors returned by get_hf(name)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    for local_name, (pieces, cat_dim) in _local_pieces(model).items():
        parts = [_rank_slice(get_hf(p.hf_name), p, tp, rank) for p in pieces]
        value = torch.cat(parts, dim=cat_dim) if len(parts) > 1 else parts[0]
        target = params[local_name]
        if target.shape != value.shape:
            raise ValueError(f"shape mismatch for {local_name}: model {tuple(target.shape)}, "
                             f"from checkpoint {tuple(value.shape)} (pieces {[p.hf_name for p in pieces]})")
        target.copy_(value.to(target.dtype))


@torch.no_grad()
def gather_hf_state(model, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (virtual HF name, full tensor) gathered over tensor parallelism, on CPU.

    grads=True gathers the gradients (`main_grad` under Megatron DDP, else `.grad`).
    """
    cfg = model.cfg
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    params = dict(model.named_parameters())
    shapes = hf_tensor_shapes(cfg)
    for local_name, (pieces, cat_dim) in _local_pieces(model).items():
        param = params[local_name]
        local = accumulated_grad(param) if grads else param.detach()
        if pieces[0].split_dim is None:
            yield pieces[0].hf_name, local.cpu().clone()
            continue
        if tp > 1:
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local.contiguous(), group=group)
        else:
            shards = [local]
        per_piece = []
        for p in pieces:
            full_rows = p.pad_rows_to or shapes[p.hf_name][p.split_dim]
            per_piece.append(full_rows // tp)
        for k, p in enumerate(pieces):
            start = sum(per_piece[:k])
            parts = [s.narrow(cat_dim, start, per_piece[k]) for s in shards]
            full = torch.cat(parts, dim=p.split_dim)
            if p.pad_rows_to:
                full = full[: shapes[p.hf_name][0]]
            yield p.hf_name, full.cpu().clone()


def accumulated_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient as training sees it: `main_grad` under Megatron DDP, else `.grad`."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


# ---- initialisation in the HF layout ----
def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def init_hf_tensor(cfg: FalconH1Config, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic initial value of one (virtual) HF tensor, independent of TP and order."""
    g = _generator(seed, name)
    std = cfg.initializer_range
    if name.endswith("layernorm.weight") or name.endswith("norm.weight") or name.endswith("mamba.D"):
        return torch.ones(shape)
    if name.endswith("mamba.A_log"):
        return torch.log(torch.empty(shape).uniform_(1.0, 16.0, generator=g))
    if name.endswith("mamba.dt_bias"):
        # Mamba-2: dt ~ logU(1e-3, 1e-1), bias = softplus^-1(dt)
        dt = torch.exp(torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g)).clamp(min=1e-4)
        return dt + torch.log(-torch.expm1(-dt))
    if ":" in name and "conv1d" in name:
        bound = 1.0 / math.sqrt(cfg.mamba_d_conv)
        return torch.empty(shape).uniform_(-bound, bound, generator=g)
    if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
        std = std / math.sqrt(2.0 * cfg.num_hidden_layers)  # Megatron's scaled output init
    return torch.empty(shape).normal_(0.0, std, generator=g)


def init_weights(model, seed: int) -> None:
    shapes = hf_tensor_shapes(model.cfg)
    load_local_from_hf(model, lambda name: init_hf_tensor(model.cfg, name, shapes[name], seed))
