"""falcon_h1.linears: the model's projections are built from the LinearSpec it is given, and µP
folding asks each linear whether a scaled weight gives a scaled output."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from falcon_h1.linears import LinearSpec


class _WeightAsGiven:
    """A linear that refuses a weight handed to forward (as a quantising linear would change it)."""

    supports_weight_scaling = False

    def forward(self, input_, weight=None, **kwargs):
        if weight is not None:
            raise AssertionError("a linear with supports_weight_scaling = False was handed a scaled weight")
        return super().forward(input_, **kwargs)


class _Column(_WeightAsGiven, ColumnParallelLinear):
    pass


class _Row(_WeightAsGiven, RowParallelLinear):
    pass


@pytest.mark.parametrize("fused", [True, False])
def test_the_spec_chooses_every_projection_and_folding_asks_the_linear(megatron_single, tmp_path, fused):
    """Every projection (mixer, MLP, LM head) is the spec's class, the spec's finish hook sees
    the built model once, and with linears that must not be handed a scaled weight the model
    keeps the µP multipliers on the activations and still equals transformers' FalconH1."""
    from tests.falcon_h1.hf_built import build_from_hf, gradient_errors
    from tests.falcon_h1.hf_reference import make_hf_model

    asked, finished = [], []

    def linear(projection, parallel):
        asked.append(projection)
        return _Column if parallel == "column" else _Row

    def fused_linear(segments, parallel):
        asked.extend(projection for _, _, projection in segments)
        return _Column if parallel == "column" else _Row

    spec = LinearSpec(linear=linear, fused_linear=fused_linear, finish=finished.append)
    hf = make_hf_model(seed=4, mamba_rms_norm=False)
    hf.save_pretrained(tmp_path)
    ours = build_from_hf(tmp_path, linears=spec, fused_projections=fused)
    assert finished == [ours]
    per_layer = ["attention_qkv", "mamba_in", "mamba_out", "attention_out"] if fused else \
        ["attention_qkv", "attention_out", "mamba_in", "mamba_out"]
    assert asked == (per_layer + ["mlp", "mlp"]) * 2 + ["lm_head"]
    linears = [m for m in ours.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert len(linears) == 2 * (2 if fused else 4) + 2 * 2 + 1
    assert all(isinstance(m, _WeightAsGiven) for m in linears)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 13), generator=g)
    errors = gradient_errors(ours, hf, ids, torch.randn(2, 13, 97, generator=g))
    assert max(errors.values()) <= 1e-5, errors


class _ScalesOwnRows(_WeightAsGiven):
    """A linear that takes per-row output scales itself (as BitNet's column linear does after
    quantising) and refuses a scaled weight; records the scales it was handed."""

    supports_output_row_scale = True
    handed: list = []

    def forward(self, input_, weight=None, output_row_scale=None, **kwargs):
        out, bias = super().forward(input_, weight, **kwargs)
        if output_row_scale is not None:
            self.handed.append(output_row_scale)
            out = out * output_row_scale.reshape(-1)
        return out, bias


class _ScalingColumn(_ScalesOwnRows, ColumnParallelLinear):
    pass


@pytest.mark.parametrize("fused", [True, False])
def test_folding_hands_the_row_scales_to_a_linear_that_takes_them(megatron_single, tmp_path, fused):
    """Column linears with `supports_output_row_scale` (asked, not their type) get the µP
    multipliers of every in-projection and fc1 as output_row_scale, never a scaled weight, and
    the model still equals transformers' FalconH1; the row linears keep their inputs."""
    from tests.falcon_h1.hf_built import build_from_hf, gradient_errors
    from tests.falcon_h1.hf_reference import make_hf_model

    spec = LinearSpec(linear=lambda projection, parallel: _ScalingColumn if parallel == "column" else _Row,
                      fused_linear=lambda segments, parallel: _ScalingColumn if parallel == "column" else _Row)
    hf = make_hf_model(seed=4, mamba_rms_norm=False)
    hf.save_pretrained(tmp_path)
    ours = build_from_hf(tmp_path, linears=spec, fused_projections=fused)
    assert all(layer.mixer.scales_in_weights and layer.mlp.scales_in_weights for layer in ours.layers)
    _ScalesOwnRows.handed.clear()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 13), generator=g)
    errors = gradient_errors(ours, hf, ids, torch.randn(2, 13, 97, generator=g))
    assert max(errors.values()) <= 1e-5, errors
    # per layer: the in-projection(s) and fc1 (the LM head has no µP row scale)
    assert len(_ScalesOwnRows.handed) == len(ours.layers) * ((1 if fused else 2) + 1)
