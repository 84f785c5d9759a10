"""Hugging Face interop: load a FalconH1 checkpoint directory into our Megatron
model (each TP rank reads only its slices) and write one back that
`transformers.AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from falcon_h1.config import UNSUPPORTED_BIASES, FalconH1Config, check_rope_scaling
from falcon_h1.errors import ConfigValueError
from falcon_h1.mup import MULTIPLIER_FIELDS
from falcon_h1.weights import gather_hf_state, load_local_from_hf, merge_hf_state, split_hf_state

# FalconH1Config fields that are not Hugging Face config keys of the same meaning.
_OWN_FIELDS = {"name", "attention_ratio", "layer_pattern", "fused_projections", "attention_backend",
               "kernel_backend", "ssd_kernels", "mamba_keep_conv_output", "rope_theta", "rope_scaling", "hf_extra_config", "hf_generation_config"}
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")
# config.json keys Hugging Face's FalconH1 reads that change the result although they are no
# field of ours: each is accepted only with the value this implementation computes.
_FIXED_VALUES = {"hidden_act": ("silu",), "attention_dropout": (0, 0.0), "quantization_config": (None,),
                 "pruned_heads": (None, {})}
_FIXED_REASONS = {
    "hidden_act": "'silu' (the MLP gate and the Mamba-2 conv/gate are SiLU in this implementation)",
    "attention_dropout": "0.0 (attention dropout is not implemented)",
    "quantization_config": "none (load a full-precision checkpoint; bitnet=on trains ternary weights)",
    "pruned_heads": "none (pruned attention heads are not supported)",
}
_DEFAULT_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # transformers' FalconH1Config
# What transformers' FalconH1Config assumes for a key config.json leaves out (where ours differs).
HF_DEFAULTS = dict(
    vocab_size=128000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, mamba_d_ssm=1024, mamba_n_heads=128, mamba_d_state=256,
    mamba_chunk_size=256, mamba_norm_before_gate=True, mamba_rms_norm=False, embedding_multiplier=1.0,
    lm_head_multiplier=1.0, key_multiplier=1.0, attention_out_multiplier=1.0, ssm_out_multiplier=1.0,
)
_DEFAULT_ROPE_THETA = 10000.0  # what transformers uses when a config names none
# Fields that change what a checkpoint's weights compute but not the weights' shapes (or, for
# tie_word_embeddings, whether lm_head.weight is read at all): a model built with other values
# loads the weights without a complaint and computes something else.
COMPUTE_FIELDS = ("rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "mamba_rms_norm",
                  "mamba_norm_before_gate", "time_step_limit", *MULTIPLIER_FIELDS)


def _refuse(key: str, value, allowed: str) -> None:
    raise ConfigValueError(f"config.json {key}", value, allowed,
                           message=f"config.json {key} = {value!r} is not supported; allowed: {allowed}.")


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) as transformers reads them: `rope_scaling` (legacy) over
    `rope_parameters`, theta from inside them or the top-level `rope_theta`."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA)))
    if hf.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    plain = params.get("rope_type", params.get("type", "default")) == "default" and set(params) <= {"rope_type"}
    return theta, None if plain else params


def config_from_hf(hf: dict, generation_config: dict | None = None, **overrides) -> FalconH1Config:
    """FalconH1Config from an HF config.json dict (plus our own overrides).

    Every key either maps to a field, is checked to hold the one value this implementation
    computes (biases, hidden_act, attention dropout, RoPE types; otherwise ConfigValueError naming
    the key, the value and what is supported), or does not change the result and is kept in
    `hf_extra_config` so `to_hf` writes it back.
    """
    hf = _decode_special_floats(hf)
    if hf.get("model_type") not in (None, "falcon_h1"):
        raise ValueError(f"config.json model_type = {hf.get('model_type')!r}; allowed: 'falcon_h1'.")
    for key, allowed in _FIXED_VALUES.items():
        if key in hf and hf[key] not in allowed:
            _refuse(key, hf[key], _FIXED_REASONS[key])
    for key in UNSUPPORTED_BIASES:
        if hf.get(key):
            _refuse(key, hf[key], "false (bias parameters are not implemented; the released Falcon-H1 models "
                    "have none)")
    fields = {f.name for f in dataclasses.fields(FalconH1Config)} - _OWN_FIELDS
    kwargs = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if k in fields}}
    kwargs["rope_theta"], kwargs["rope_scaling"] = _rope_from_hf(hf)
    # null means what transformers makes of it: the defaults (multipliers, time-step limit),
    # num_attention_heads (KV heads), "auto" sizes (head dims, mamba_d_ssm = expand * hidden)
    for key in ("mlp_multipliers", "ssm_multipliers", "time_step_limit"):
        if kwargs.get(key, 0) is None:
            kwargs.pop(key)
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    if kwargs.get("mamba_d_head") == "auto":
        kwargs["mamba_d_head"] = None
    if "time_step_limit" in kwargs:
        kwargs["time_step_limit"] = [float(v) for v in kwargs["time_step_limit"]]
    kwargs["name"] = hf.get("_name_or_path") or "falcon_h1_hf"
    kwargs["hf_extra_config"] = {k: v for k, v in hf.items()
                                 if k not in fields and k not in _ROPE_KEYS and k != "model_type"}
    kwargs["hf_generation_config"] = generation_config
    cfg = FalconH1Config(**{**kwargs, **overrides})
    try:
        check_rope_scaling(cfg)
    except ConfigValueError as err:
        raise ConfigValueError("config.json rope_parameters", err.value, err.allowed,
                               message=f"config.json rope_parameters: {err}") from None
    return cfg


def compute_field_differences(cfg: FalconH1Config, path: str | os.PathLike) -> list[tuple[str, object, object]]:
    """(field, cfg's value, config.json's value) for each COMPUTE_FIELDS entry on which `cfg`
    and the HF directory's config.json disagree (numbers to a relative 1e-6: printed floats)."""
    checkpoint = config_from_hf(_read_config(Path(path)))
    return [(name, getattr(cfg, name), getattr(checkpoint, name)) for name in COMPUTE_FIELDS
            if not _same_value(getattr(cfg, name), getattr(checkpoint, name))]


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b or math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _decode_special_floats(obj):
    """transformers writes infinity and NaN as {"__float__": "Infinity"} (strict JSON)."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj["__float__"]]
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_decode_special_floats(v) for v in obj]
    return obj


_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _encode_special_floats(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj


def strict_json(obj) -> str:
    """JSON that strict parsers accept (no bare Infinity/NaN), in transformers' encoding."""
    return json.dumps(_encode_special_floats(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def config_to_hf(cfg: FalconH1Config) -> dict:
    """The HF config.json dict of `cfg` (Python floats; `strict_json` encodes it)."""
    if cfg.layer_pattern and set(cfg.layer_pattern) != {"H"}:
        raise ValueError(f"model.layer_pattern = {cfg.layer_pattern!r} cannot be written as a Hugging Face "
                         "FalconH1 checkpoint; allowed: all 'H' (parallel hybrid) layers.")
    out = dict(cfg.hf_extra_config)
    out.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _OWN_FIELDS})
    scaling = dict(cfg.rope_scaling or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    out.update(
        model_type="falcon_h1", architectures=out.get("architectures", ["FalconH1ForCausalLM"]),
        hidden_act="silu", attention_dropout=out.get("attention_dropout", 0.0), head_dim=cfg.kv_channels,
        mamba_d_head=cfg.ssm_head_dim, mamba_d_ssm=cfg.d_ssm, rope_parameters={**scaling, "rope_theta": cfg.rope_theta},
        time_step_limit=list(cfg.time_step_limit),
    )
    for key, value in _DEFAULT_TOKEN_IDS.items():
        out.setdefault(key, value)
    return out


def generation_config_to_hf(cfg: FalconH1Config) -> dict:
    """generation_config.json: the source's when the model came from one, else the token ids."""
    if cfg.hf_generation_config is not None:
        return dict(cfg.hf_generation_config)
    hf = config_to_hf(cfg)
    out = {"_from_model_config": True, **{key: hf[key] for key in _DEFAULT_TOKEN_IDS}}
    for key in ("use_cache", "transformers_version"):
        if key in hf:
            out[key] = hf[key]
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

    path = Path(path)
    cfg = config_from_hf(_read_config(path), _read_generation_config(path), **overrides)
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


def _read_generation_config(path: Path) -> dict | None:
    file = path / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def load_hf_weights(model, path: str | os.PathLike) -> None:
    """Fill an existing model (this rank's slices) from an HF FalconH1 directory; the
    directory's shapes must match the model's config (a mismatch names the tensor)."""
    from safetensors import safe_open

    path = Path(path)
    config_from_hf(_read_config(path))  # refuses settings this implementation would not compute
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
    """Write `model` as an HF FalconH1 directory (collective over TP; rank 0 writes): weights with the
    config's vocabulary (padding rows dropped), config.json and generation_config.json, strict JSON."""
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
        dtype_key = "torch_dtype" if "torch_dtype" in hf_cfg else "dtype"  # the source's spelling
        hf_cfg[dtype_key] = str(dtype).replace("torch.", "")
        (path / "config.json").write_text(strict_json(hf_cfg))
        (path / "generation_config.json").write_text(strict_json(generation_config_to_hf(model.cfg)))
    if dist.is_initialized():
        dist.barrier()
