"""Segments of a fused BitNet linear: one GEMM standing for several projections.

A fused projection (Falcon-H1's mixer: one in-projection for [q, k, v, z, x, B, C, dt], one
out-projection over [y_ssm, o_attn]) is the same model as its separate projections only if
every segment is quantised as its own projection would be:
- column linear (segments over its OUTPUT rows): each segment's rows get their own absmean
  scale; the input is shared, so its per-token scale is shared too;
- row linear (segments over its INPUT features = weight columns): each segment's columns get
  their own absmean scale and each segment's input features their own per-token absmax;
- a segment whose layer type is not in `bitnet.layers` stays full precision (weight and input).

`SegmentLayout` holds that description for one layer; the quantisers in `bitnet.reference`
and `bitnet.triton_kernels` take it. A plain projection is the one-segment layout
(`single_segment`), so plain and fused linears run the same code.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch


@dataclass(frozen=True)
class Segment:
    name: str
    size: int  # this rank's rows (column linear) or input features (row linear)
    quantized: bool = True


class SegmentTables(NamedTuple):
    """Device copies of a layout, read by the kernels (built once per device)."""

    bounds: torch.Tensor  # int32 [n + 1]: segment i spans [bounds[i], bounds[i + 1])
    flags: torch.Tensor  # int8 [n]: 1 = quantised
    index: torch.Tensor  # int64 [size]: segment of every position along the segmented dim
    quantized: torch.Tensor  # bool [n]
    sizes: torch.Tensor  # float64 [n]: rows (dim 0) or columns (dim 1) of each segment


class SegmentLayout:
    """Contiguous segments along one weight dimension: `dim` 0 (a column linear's output rows)
    or 1 (a row linear's input columns; also the last dim of its input activations)."""

    def __init__(self, segments: Sequence, dim: int):
        if dim not in (0, 1):
            raise ValueError(f"SegmentLayout: dim={dim!r}; allowed: 0 (output rows), 1 (input columns)")
        parsed = tuple(_as_segment(s) for s in segments)
        if not parsed:
            raise ValueError("bitnet_segments: empty list; allowed: at least one (name, size) segment")
        names = [s.name for s in parsed]
        if len(set(names)) != len(names):
            raise ValueError(f"bitnet_segments: duplicate segment names in {names}; allowed: unique names")
        self.segments = parsed
        self.dim = dim
        bounds = [0]
        for s in parsed:
            bounds.append(bounds[-1] + s.size)
        self.bounds = tuple(bounds)
        self._tables: dict = {}

    # ------------------------------------------------------------------------ description
    def __len__(self) -> int:
        return len(self.segments)

    def __eq__(self, other) -> bool:
        return isinstance(other, SegmentLayout) and (self.segments, self.dim) == (other.segments, other.dim)

    def __hash__(self) -> int:
        return hash((self.segments, self.dim))

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}:{s.size}{'' if s.quantized else ':fp'}" for s in self.segments)
        return f"SegmentLayout(dim={self.dim}, [{parts}])"

    @property
    def size(self) -> int:
        return self.bounds[-1]

    @property
    def quantized(self) -> tuple[bool, ...]:
        return tuple(s.quantized for s in self.segments)

    @property
    def all_quantized(self) -> bool:
        return all(self.quantized)

    @property
    def any_quantized(self) -> bool:
        return any(self.quantized)

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:]))

    def runs(self) -> list[tuple[int, int, bool]]:
        """Maximal runs of neighbouring segments with the same quantised flag: (start, end, flag)."""
        runs: list[list] = []
        for (start, end), quantized in zip(self.ranges(), self.quantized):
            if runs and runs[-1][2] == quantized:
                runs[-1][1] = end
            else:
                runs.append([start, end, quantized])
        return [tuple(r) for r in runs]

    def split(self, t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """Views of `t` per segment along `dim` (one segment: `t` itself, so autograd has no
        slice to scatter back)."""
        if len(self.segments) == 1 and t.shape[dim] == self.size:
            return [t]
        return [t.narrow(dim, start, end - start) for start, end in self.ranges()]

    def full_precision_part(self, w: torch.Tensor) -> torch.Tensor | None:
        """The full-precision segments of a weight, concatenated along `dim` (None: none)."""
        parts = [p for p, q in zip(self.split(w, self.dim), self.quantized) if not q]
        return torch.cat(parts, dim=self.dim) if parts else None

    # ------------------------------------------------------------------------- on a device
    def tables(self, device) -> SegmentTables:
        device = torch.device(device)
        tables = self._tables.get(device)
        if tables is None:
            sizes = torch.tensor([s.size for s in self.segments])
            flags = torch.tensor(self.quantized, dtype=torch.int8)
            tables = SegmentTables(
                bounds=torch.tensor(self.bounds, dtype=torch.int32).to(device),
                flags=flags.to(device),
                index=torch.repeat_interleave(torch.arange(len(self)), sizes).to(device),
                quantized=flags.bool().to(device),
                sizes=sizes.to(torch.float64).to(device),
            )
            self._tables[device] = tables
        return tables

    def along_weight(self, per_segment: torch.Tensor) -> torch.Tensor:
        """[n] per-segment values -> one per weight row ([size, 1], dim 0) or column ([size],
        dim 1): broadcasts against the weight [rows, cols]."""
        values = per_segment.index_select(0, self.tables(per_segment.device).index)
        return values.unsqueeze(-1) if self.dim == 0 else values

    def along_features(self, per_segment: torch.Tensor) -> torch.Tensor:
        """[..., n] per-segment values of activations -> [..., size], one per feature."""
        return per_segment.index_select(-1, self.tables(per_segment.device).index)

    # --------------------------------------------------------------------------- export
    def to_json(self) -> dict:
        return {
            "dim": self.dim,
            "segments": [
                {"name": s.name, "start": a, "end": b, "quantized": s.quantized}
                for s, (a, b) in zip(self.segments, self.ranges())
            ],
        }

    @staticmethod
    def from_json(data) -> "SegmentLayout":
        if isinstance(data, str):
            data = json.loads(data)
        segments, expected_start = [], 0
        for entry in data["segments"]:
            if entry["start"] != expected_start:
                raise ValueError(
                    f"segment layout: segment {entry['name']!r} starts at {entry['start']}, "
                    f"expected {expected_start}; allowed: contiguous segments from 0"
                )
            segments.append(Segment(entry["name"], entry["end"] - entry["start"], bool(entry["quantized"])))
            expected_start = entry["end"]
        return SegmentLayout(segments, int(data["dim"]))


@functools.lru_cache(maxsize=None)
def single_segment(size: int, dim: int) -> SegmentLayout:
    """The layout of a plain projection: one quantised segment spanning `size` along `dim`.
    Cached, so its device tables are built once however many layers or calls use it."""
    return SegmentLayout([Segment("all", size)], dim)


def weight_layout(w: torch.Tensor, layout: SegmentLayout | None):
    """(w as 2-D [rows, cols], its layout): `layout` as given, or for a plain tensor (None) the
    whole tensor as one row of one segment, whatever its shape."""
    if layout is not None:
        return w, layout
    return w.reshape(1, -1), single_segment(1, 0)


def feature_layout(x: torch.Tensor, layout: SegmentLayout | None) -> SegmentLayout:
    """The segments of x's last dimension (the features of activations): `layout` as given, or
    one segment over all of them for a plain tensor (None)."""
    if x.dim() < 1:
        raise ValueError(f"BitNet activation quantisers: x must have rank >= 1, got shape {tuple(x.shape)}")
    return layout if layout is not None else single_segment(x.shape[-1], 1)


def _as_segment(s) -> Segment:
    if isinstance(s, Segment):
        seg = s
    elif isinstance(s, (tuple, list)) and len(s) in (2, 3):
        seg = Segment(str(s[0]), s[1], bool(s[2]) if len(s) == 3 else True)
    else:
        raise ValueError(
            f"bitnet_segments: entry {s!r}; allowed: Segment or (name, size[, quantized]) tuples"
        )
    if not isinstance(seg.size, int) or isinstance(seg.size, bool) or seg.size <= 0:
        raise ValueError(
            f"bitnet_segments: segment {seg.name!r} has size {seg.size!r}; allowed: a positive int "
            "(leave empty segments out)"
        )
    return seg
