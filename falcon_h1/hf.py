"""Hugging Face interop: load a FalconH1 checkpoint directory into our Megatron
model (each TP rank reads only its slices) and write one back that
`transformers.AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from falcon_h1.config import FalconH1Config
from falcon_h1.weights import gather_hf_state, load_local_from_hf, merge_hf_state, split_hf_state

# Our field name -> HF config key, where they differ only by representation.
_OWN_FIELDS = {"name", "attention_ratio", "layer_pattern", "fused_projections", "attention_backend",
               "kernel_backend", "head_dim", "mamba_d_head", "rope_theta", "time_step_limit"}


def config_from_hf(hf: dict, **overrides) -> FalconH1Config:
    """FalconH1Config from an HF config.json dict (plus our own overrides)."""
    if hf.get("model_type") not in (None, "falcon_h1"):
        raise ValueError(f"config.json model_type = {hf.get('model_type')!r}; allowed: 'falcon_h1'.")
    fields = {f.name for f in dataclasses.fields(FalconH1Config)}
    kwargs = {k: v for k, v in hf.items() if k in fields and k not in _OWN_FIELDS}
    rope = hf.get("rope_parameters") or {}
    kwargs["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 1e11)))
    if hf.get("head_dim") is not None:
        kwargs["head_dim"] = int(hf["head_dim"])
    if hf.get("mamba_d_head") not in (None, "auto"):
        kwargs["mamba_d_head"] = int(hf["mamba_d_head"])
    limit = hf.get("time_step_limit")
    if limit is not None:
        kwargs["time_step_limit"] = [_json_float(v) for v in limit]
    kwargs["name"] = hf.get("_name_or_path") or "falcon_h1_hf"
    for key in ("mlp_multipliers", "ssm_multipliers"):
        if kwargs.get(key) is None:
            kwargs.pop(key, None)
    return FalconH1Config(**{**kwargs, **overrides})


def _json_float(v) -> float:
    # transformers writes infinity as {"__float__": "Infinity"}
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


def config_to_hf(cfg: FalconH1Config) -> dict:
    if cfg.layer_pattern and set(cfg.layer_pattern) != {"H"}:
        raise ValueError(f"model.layer_pattern = {cfg.layer_pattern!r} cannot be written as a Hugging Face "
                         "FalconH1 checkpoint; allowed: all 'H' (parallel hybrid) layers.")
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _OWN_FIELDS}
    out.update(
        model_type="falcon_h1", architectures=["FalconH1ForCausalLM"], head_dim=cfg.kv_channels,
        mamba_d_head=cfg.ssm_head_dim, mamba_d_ssm=cfg.d_ssm,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        time_step_limit=list(cfg.time_step_limit),
    )
    return out


def _ensure_parallel(tp: int) -> None:
    from falcon_h1.megatron_compat.parallel import initialize_parallel

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        initialize_parallel(tp=tp)


def from_hf(path: str | os.PathLike, tp: int | None = None, precision: str = "fp32", **overrides):
    """Load an HF FalconH1 directory (config.json + *.safetensors) on the current device.

    Starts a single-process gloo group when none exists. `overrides` set our own
    FalconH1Config fields (e.g. fused_projections=False, kernel_backend="reference").
    """
    from falcon_h1.model import build_model

    cfg = config_from_hf(_read_config(Path(path)), **overrides)
    _ensure_parallel(tp or 1)
    model = build_model(cfg, initialize=False, precision=precision)
    load_hf_weights(model, path)
    model.eval()
    return model


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist; allowed: a directory holding a "
                                "Hugging Face FalconH1 config.json and *.safetensors files.")
    return json.loads(config_file.read_text())


def load_hf_weights(model, path: str | os.PathLike) -> None:
    """Fill an existing model (this rank's slices) from an HF FalconH1 directory; the
    directory's shapes must match the model's config (a mismatch names the tensor)."""
    from safetensors import safe_open

    path = Path(path)
    _read_config(path)
    cfg = model.cfg
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}; allowed: a Hugging Face FalconH1 directory.")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    cache: dict[str, torch.Tensor] = {}

    def get_virtual(name: str) -> torch.Tensor:
        real = name.split(":")[0]
        if real not in where:
            raise KeyError(f"tensor {real!r} is missing from {path}; a FalconH1 checkpoint of this "
                           f"config needs it (num_hidden_layers={cfg.num_hidden_layers}, "
                           f"tie_word_embeddings={cfg.tie_word_embeddings}).")
        if name not in cache:
            cache.update(split_hf_state(cfg, {real: where[real].get_tensor(real)}))
        return cache[name]

    if not cfg.tie_word_embeddings and "lm_head.weight" not in where and "model.embed_tokens.weight" in where:
        raise KeyError(f"tensor 'lm_head.weight' is missing from {path} but the config says "
                       "tie_word_embeddings = false.")
    sample = next(iter(where.values())).get_slice(next(iter(where))).get_dtype()
    model.hf_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(sample, torch.float32)
    load_local_from_hf(model, get_virtual)


def to_hf(model, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write `model` as an HF FalconH1 directory (collective over TP; rank 0 writes)."""
    from safetensors.torch import save_file

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("to_hf with parallel.pp > 1 is not supported; allowed: pp = 1 (gather the stages first).")
    dtype = dtype or getattr(model, "hf_dtype", None) or next(model.parameters()).dtype
    state = merge_hf_state(dict(gather_hf_state(model)))
    if not (dist.is_initialized() and dist.get_rank() != 0):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        hf_cfg = config_to_hf(model.cfg)
        hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if dist.is_initialized():
        dist.barrier()
