"""Export a BitNet model as packed ternary weights (2 bits each) in safetensors, and run it back.

File layout (safetensors, metadata `format = falcon-bitnet-ternary/1`): for every BitNet
linear weight `P` (e.g. `decoder.layers.0.mlp.linear_fc1.weight`)
    P.packed   uint8 [ceil(numel / 4)]   4 weights a byte, see `pack_ternary`
    P.scale    float32 [1]                dequantised weight = ternary * scale
    P.shape    int64 [ndim]
and every other tensor of the state dict under its own name, in full precision. The metadata
key `bitnet_weights` lists the P names (JSON).

Fused linears with `bitnet_segments` (Falcon-H1's fused mixer projections; format
`falcon-bitnet-ternary/2`, written only when there is one) have one scale per segment:
    P.scale    float32 [n_segments]       segment i dequantised = its ternary * scale[i]
    P.full_precision  (only with full-precision segments) their weights, concatenated along
               the segmented dimension; their ternary values and scales are 0
and the metadata key `bitnet_segments` maps P to its layout (JSON: `dim` 0 = output rows or
1 = input columns, and per segment `name`, `start`, `end`, `quantized`).

`load_frozen_bitnet(model, export)` puts an export into a model built with the same spec; its
BitNet layers then run from the ternary weights and reproduce the training-time forward exactly.

`read_state_dict_file` reads a `torch.save`d file holding either `{"state_dict": ...,
"bitnet_param_names": [...], "bitnet_segments": {...}}` (what `save_bitnet_state_dict` writes)
or a plain state dict, whose BitNet weights are then found by name: the weights of the GPT
projections `linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2` (DEFAULT_BITNET_PATTERN).
The console entry `falcon-bitnet-export` (recipes/bitnet_export.py) exports such a file or a
falcon-train run directory.
"""

from __future__ import annotations

import json
import math
import re
from typing import NamedTuple

import torch

from bitnet import reference
from bitnet.layers import bitnet_layers, label_bitnet_layers
from bitnet.segments import SegmentLayout

FORMAT = "falcon-bitnet-ternary/1"
SEGMENTED_FORMAT = "falcon-bitnet-ternary/2"  # adds per-segment scales; /1 readers refuse it
READABLE_FORMATS = (FORMAT, SEGMENTED_FORMAT)
DEFAULT_BITNET_PATTERN = r"(^|\.)(linear_qkv|linear_proj|linear_fc1|linear_fc2)\.weight$"


class TernaryWeight(NamedTuple):
    ternary: torch.Tensor  # int8 in {-1, 0, 1}
    scale: torch.Tensor  # 0-d; dequantised = ternary * scale ([n_segments] with a layout)
    layout: SegmentLayout | None = None  # segments of a fused linear
    full_precision: torch.Tensor | None = None  # its full-precision segments, concatenated


# ------------------------------------------------------------------------------ packing
def pack_ternary(ternary: torch.Tensor) -> torch.Tensor:
    """int8 {-1, 0, 1} of any shape -> uint8 [ceil(numel / 4)]: element i is stored as
    (value + 1) in bits 2*(i % 4) .. 2*(i % 4) + 1 of byte i // 4 (row-major order)."""
    flat = ternary.detach().reshape(-1).to(torch.int16)
    bad = (flat < -1) | (flat > 1)
    if bool(bad.any()):
        raise ValueError(
            f"pack_ternary: value {int(flat[bad][0])} is not ternary; allowed values: -1, 0, 1"
        )
    codes = (flat + 1).to(torch.uint8).cpu()
    codes = torch.cat([codes, codes.new_ones((-codes.numel()) % 4)])  # pad with code of 0
    codes = codes.reshape(-1, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `pack_ternary`: uint8 bytes -> int8 tensor of `shape`."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 3) // 4:
        raise ValueError(
            f"unpack_ternary: expected uint8 [{(numel + 3) // 4}] for shape {shape}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    codes = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).reshape(-1)
    codes = codes[:numel]
    if bool((codes == 3).any()):
        raise ValueError("unpack_ternary: code 3 found; allowed codes: 0, 1, 2 (values -1, 0, 1)")
    return (codes.to(torch.int8) - 1).reshape(shape)


# ------------------------------------------------------------------------------ writing
def _ternary_entries(name: str, ternary: torch.Tensor, scale: torch.Tensor,
                     full_precision: torch.Tensor | None = None) -> dict:
    entries = {
        f"{name}.packed": pack_ternary(ternary),
        f"{name}.scale": scale.detach().reshape(-1).cpu().clone(),
        f"{name}.shape": torch.tensor(list(ternary.shape), dtype=torch.int64),
    }
    if full_precision is not None:
        entries[f"{name}.full_precision"] = full_precision.detach().cpu().clone()
    return entries


def _save(tensors: dict, bitnet_names: list, out_path: str, extra_metadata: dict | None = None,
          layouts: dict | None = None):
    from safetensors.torch import save_file

    metadata = {"format": SEGMENTED_FORMAT if layouts else FORMAT, "bitnet_weights": json.dumps(sorted(bitnet_names))}
    if layouts:
        metadata["bitnet_segments"] = json.dumps({k: v.to_json() for k, v in sorted(layouts.items())})
    metadata.update(extra_metadata or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_path, metadata=metadata)


def _plain_tensors(state_dict: dict, skip) -> dict:
    # Non-tensor entries (Megatron's `_extra_state` = None) carry nothing to export.
    return {
        k: v.detach().cpu().clone()
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and k not in skip
    }


def _require_tp1(model) -> None:
    for name, layer in bitnet_layers(model):
        if layer._tp_size > 1:
            raise ValueError(
                f"bitnet export: {name} is tensor-parallel (TP={layer._tp_size}); allowed: TP=1 "
                "models, or export_from_state_dict on a merged (unsharded) state dict"
            )


def export_bitnet_state_dict(model: torch.nn.Module, path: str) -> list[str]:
    """Write `model` (TP=1) to `path`; returns the names of the packed BitNet weights."""
    _require_tp1(model)
    label_bitnet_layers(model)
    tensors, names, layouts = {}, [], {}
    for name, layer in bitnet_layers(model):
        ternary, scale = layer.quantized_weight()  # raises on non-finite weights
        names.append(f"{name}.weight")
        layout = layer.bitnet_segments
        full_precision = None
        if layout is not None:
            layouts[f"{name}.weight"] = layout
            full_precision = layout.full_precision_part(layer.weight.detach())
        tensors.update(_ternary_entries(f"{name}.weight", ternary, scale, full_precision))
    tensors.update(_plain_tensors(model.state_dict(), skip=set(names)))
    options = {n: vars(layer.bitnet_options) for n, layer in bitnet_layers(model)}
    _save(tensors, names, path, {"bitnet_options": json.dumps(options)}, layouts)
    return names


def export_from_state_dict(state_dict: dict, bitnet_param_names, out_path: str,
                           segments: dict | None = None) -> list[str]:
    """Export a full (unsharded) state dict; `bitnet_param_names` are the BitNet weights;
    `segments` maps the fused ones to their SegmentLayout (or its JSON)."""
    names = list(bitnet_param_names)
    layouts = {k: v if isinstance(v, SegmentLayout) else SegmentLayout.from_json(v) for k, v in (segments or {}).items()}
    unknown = sorted(set(layouts) - set(names))
    if unknown:
        raise ValueError(f"export_from_state_dict: segments given for {unknown}, which are not BitNet weights")
    tensors = {}
    for name in names:
        if name not in state_dict:
            raise ValueError(f"export_from_state_dict: BitNet weight {name!r} is not in the state dict")
        weight = state_dict[name]
        layout = layouts.get(name)
        if layout is None:
            stats = reference.weight_stats(weight)
            quantized_sum = stats[0]
        else:
            stats = reference.weight_stats(weight, layout)
            quantized_sum = sum(stats[i, 0] for i, q in enumerate(layout.quantized) if q)
        if not math.isfinite(float(quantized_sum)):
            raise ValueError(f"export_from_state_dict: parameter {name} holds non-finite values")
        if layout is None:
            ternary, scale = reference.quantize_weights(weight, stats)
            tensors.update(_ternary_entries(name, ternary, scale))
        else:
            ternary, scale = reference.quantize_weights(weight, stats, layout)
            tensors.update(_ternary_entries(name, ternary, scale, layout.full_precision_part(weight)))
    tensors.update(_plain_tensors(state_dict, skip=set(names)))
    _save(tensors, names, out_path, layouts=layouts)
    return names


def save_bitnet_state_dict(model: torch.nn.Module, path: str) -> None:
    """torch.save the full-precision state dict with the list of BitNet weights (TP=1):
    the input format of `falcon-bitnet-export`."""
    _require_tp1(model)
    names = [f"{n}.weight" for n, _ in bitnet_layers(model)]
    segments = {f"{n}.weight": m.bitnet_segments.to_json() for n, m in bitnet_layers(model)
                if m.bitnet_segments is not None}
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save({"state_dict": state, "bitnet_param_names": names, "bitnet_segments": segments}, path)


# ------------------------------------------------------------------------------ reading
def load_bitnet_export(path: str) -> dict:
    """name -> Tensor (full precision) or TernaryWeight (BitNet weights, unpacked)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") not in READABLE_FORMATS:
            raise ValueError(
                f"load_bitnet_export: {path} has format {metadata.get('format')!r}; "
                f"allowed: {list(READABLE_FORMATS)}"
            )
        bitnet_names = json.loads(metadata["bitnet_weights"])
        layouts = {k: SegmentLayout.from_json(v) for k, v in json.loads(metadata.get("bitnet_segments", "{}")).items()}
        raw = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for name in bitnet_names:
        shape = raw.pop(f"{name}.shape").tolist()
        ternary = unpack_ternary(raw.pop(f"{name}.packed"), shape)
        scale = raw.pop(f"{name}.scale")
        layout = layouts.get(name)
        if layout is None:
            out[name] = TernaryWeight(ternary, scale.reshape(()))
        else:
            out[name] = TernaryWeight(ternary, scale.reshape(-1), layout, raw.pop(f"{name}.full_precision", None))
    out.update(raw)
    return out


def load_frozen_bitnet(model: torch.nn.Module, export) -> None:
    """Load an export (path or `load_bitnet_export` dict) into `model` (TP=1, same spec):
    full-precision tensors by name, BitNet layers frozen on their ternary weights."""
    _require_tp1(model)
    if isinstance(export, str):
        export = load_bitnet_export(export)
    label_bitnet_layers(model)
    for name, layer in bitnet_layers(model):
        entry = export.get(f"{name}.weight")
        if not isinstance(entry, TernaryWeight):
            raise ValueError(f"load_frozen_bitnet: the export has no ternary weight for {name}.weight")
        if entry.layout != layer.bitnet_segments:
            raise ValueError(
                f"load_frozen_bitnet: {name}.weight has segments {entry.layout} in the export, "
                f"{layer.bitnet_segments} in the model; allowed: the same layout (same model spec "
                "and bitnet.layers)"
            )
        layer.freeze_quantized(entry.ternary, entry.scale, entry.full_precision)
    plain = {k: v for k, v in export.items() if isinstance(v, torch.Tensor)}
    frozen = {f"{n}.weight" for n, _ in bitnet_layers(model)}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [k for k in missing if k not in frozen and not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"load_frozen_bitnet: export does not match the model: missing {missing}, "
            f"unexpected {unexpected}"
        )


# ------------------------------------------------------------------ torch-saved input files
def read_state_dict_file(path: str, pattern: str = DEFAULT_BITNET_PATTERN):
    """A `torch.save`d input of `export_from_state_dict` -> (state_dict, BitNet weight names,
    segments or None): what `save_bitnet_state_dict` writes, or a plain state dict whose BitNet
    weights are the names matching the regular expression `pattern`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    segments = None
    if isinstance(payload, dict) and "state_dict" in payload:
        state_dict = payload["state_dict"]
        names = payload.get("bitnet_param_names")
        segments = payload.get("bitnet_segments")
    else:
        state_dict, names = payload, None
    if names is None:
        regex = re.compile(pattern)
        names = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and regex.search(k)]
    if not names:
        raise ValueError(f"no BitNet weights in {path} (pattern {pattern!r})")
    return state_dict, names, segments
