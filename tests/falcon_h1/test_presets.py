"""Presets against the published Falcon-H1 configurations, and parameter counts against
independent numbers (the published configs' counts, or a formula written here)."""

import math

import pytest
import torch

from falcon_h1 import build_model
from falcon_h1.mup import derive_multipliers
from falcon_h1.presets import DERIVED_MULTIPLIERS, PRESETS, get_preset

# The published configs (config.json of tiiuae/Falcon-H1-<size>-Instruct as quoted by TII's
# Megatron-Bridge providers), copied field by field.
_COMMON = dict(
    mamba_d_conv=4, mamba_conv_bias=True, mamba_proj_bias=False, mamba_norm_before_gate=False,
    projectors_bias=False, attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5, rope_theta=1e11,
    mamba_expand=2, initializer_range=0.02, tie_word_embeddings=False, embedding_multiplier=5.656854249492381,
    attention_in_multiplier=1.0,
)
_SSM_DEEP = [0.3535533905932738, 0.25, 0.1767766952966369, 0.5, 0.3535533905932738]
PUBLISHED = {
    "falcon_h1_0_5b": dict(
        num_hidden_layers=36, hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1,
        mamba_d_state=128, mamba_chunk_size=128, mamba_rms_norm=False, vocab_size=32784,
        max_position_embeddings=16384, lm_head_multiplier=0.0390625, key_multiplier=0.39062499999999994,
        attention_out_multiplier=0.9375, ssm_in_multiplier=1.25, ssm_out_multiplier=0.23570226039551587,
        mlp_multipliers=[0.8838834764831844, 0.5859375],
        ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738]),
    "falcon_h1_1_5b_deep": dict(
        num_hidden_layers=66, hidden_size=1280, intermediate_size=3072, num_attention_heads=6,
        num_key_value_heads=2, head_dim=128, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1,
        mamba_d_state=256, mamba_chunk_size=128, mamba_rms_norm=True, vocab_size=65537,
        max_position_embeddings=131072, lm_head_multiplier=0.03125, key_multiplier=0.17677669529663687,
        attention_out_multiplier=0.5, ssm_in_multiplier=1.0, ssm_out_multiplier=0.23570226039551587,
        mlp_multipliers=[0.7071067811865476, 0.3125], ssm_multipliers=_SSM_DEEP),
    "falcon_h1_7b": dict(
        num_hidden_layers=44, hidden_size=3072, intermediate_size=12288, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, mamba_n_heads=24, mamba_d_head=128, mamba_n_groups=1,
        mamba_d_state=256, mamba_chunk_size=256, mamba_rms_norm=True, vocab_size=130049,
        max_position_embeddings=262144, lm_head_multiplier=0.013020833333333334,
        key_multiplier=0.030690398488999456, attention_out_multiplier=0.10416666666666667,
        ssm_in_multiplier=0.4166666666666667, ssm_out_multiplier=0.11785113019775793,
        mlp_multipliers=[0.2946278254943948, 0.032552083333333336], ssm_multipliers=_SSM_DEEP),
    "falcon_h1_34b": dict(
        num_hidden_layers=72, hidden_size=5120, intermediate_size=21504, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, mamba_n_heads=32, mamba_d_head=128, mamba_n_groups=2,
        mamba_d_state=256, mamba_chunk_size=128, mamba_rms_norm=True, vocab_size=261120,
        max_position_embeddings=262144, lm_head_multiplier=0.0078125, key_multiplier=0.011048543456039804,
        attention_out_multiplier=0.0375, ssm_in_multiplier=0.25, ssm_out_multiplier=0.08838834764831845,
        mlp_multipliers=[0.1767766952966369, 0.011160714285714284], ssm_multipliers=_SSM_DEEP),
}
# Parameter counts of the published configs (embedding + untied head + layers + final norm).
PUBLISHED_COUNTS = {
    "falcon_h1_0_5b": 521_411_104, "falcon_h1_1_5b_deep": 1_554_874_768,
    "falcon_h1_7b": 7_585_654_880, "falcon_h1_34b": 33_642_516_224,
}
# Shapes of the two sizes without a published config (third-party fixtures):
# layers, hidden, intermediate, heads, kv heads, head_dim, mamba heads, mamba head dim, groups, d_state, vocab
UNPUBLISHED_SHAPES = {
    "falcon_h1_1_5b": (24, 2048, 4608, 8, 2, 128, 48, 64, 1, 256, 65537),
    "falcon_h1_3b": (32, 2560, 6144, 10, 2, 128, 32, 128, 1, 256, 65537),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_field_equals_the_published_config(name):
    cfg = PRESETS[name]
    for field, value in {**_COMMON, **PUBLISHED[name]}.items():
        assert getattr(cfg, field) == value, field
    assert cfg.d_ssm == cfg.mamba_n_heads * cfg.mamba_d_head


def _formula_count(layers, H, F, heads, kv, d, mamba_heads, p, groups, N, V, conv_k=4, gated_norm=True) -> int:
    d_ssm = mamba_heads * p
    attention = H * heads * d + 2 * H * kv * d + heads * d * H
    conv_channels = d_ssm + 2 * groups * N
    mamba = (H * (2 * d_ssm + 2 * groups * N + mamba_heads) + conv_channels * (conv_k + 1)  # in_proj, conv + bias
             + 3 * mamba_heads + (d_ssm if gated_norm else 0) + d_ssm * H)        # dt_bias, A_log, D, norm, out
    mlp = 3 * H * F
    return 2 * V * H + H + layers * (attention + mamba + mlp + 2 * H)


def _counted(name) -> int:
    with torch.device("meta"):
        model = build_model(PRESETS[name], initialize=False, device=torch.device("meta"))
    padding_rows = model.vocab_padded - model.cfg.vocab_size
    return sum(p.numel() for p in model.parameters()) - padding_rows * model.cfg.hidden_size * 2


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_parameter_count_equals_the_published_configs(megatron_single, name):
    assert _counted(name) == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_formula_reproduces_the_published_counts(name):
    c = PUBLISHED[name]
    count = _formula_count(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                           c["num_key_value_heads"], c["head_dim"], c["mamba_n_heads"], c["mamba_d_head"],
                           c["mamba_n_groups"], c["mamba_d_state"], c["vocab_size"], gated_norm=c["mamba_rms_norm"])
    assert count == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name", sorted(UNPUBLISHED_SHAPES))
def test_parameter_count_of_unpublished_sizes_equals_the_formula(megatron_single, name):
    assert _counted(name) == _formula_count(*UNPUBLISHED_SHAPES[name])


@pytest.mark.parametrize("name", sorted(UNPUBLISHED_SHAPES))
def test_unpublished_sizes_have_the_fixture_shapes_and_derived_multipliers(name):
    layers, H, F, heads, kv, d, mh, p, g, N, V = UNPUBLISHED_SHAPES[name]
    cfg = PRESETS[name]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.kv_channels, cfg.mamba_n_heads, cfg.ssm_head_dim, cfg.mamba_n_groups,
            cfg.mamba_d_state, cfg.vocab_size) == (layers, H, F, heads, kv, d, mh, p, g, N, V)
    assert name in DERIVED_MULTIPLIERS
    assert cfg.lm_head_multiplier == 40 / H and cfg.ssm_in_multiplier == 1280 / H
    assert math.isclose(cfg.attention_out_multiplier, 491520 / (H * heads * d), rel_tol=1e-15)
    for field, value in derive_multipliers(cfg).items():
        assert getattr(cfg, field) == value, field


def test_1_5b_lm_head_multiplier_agrees_with_the_outside_suite():
    assert PRESETS["falcon_h1_1_5b"].lm_head_multiplier == 0.01953125


def test_get_preset_returns_an_independent_copy():
    a = get_preset("falcon_h1_7b")
    a.ssm_multipliers[0] = 99.0
    assert PRESETS["falcon_h1_7b"].ssm_multipliers[0] != 99.0
    assert PRESETS["falcon_h1_34b"].ssm_multipliers[0] != 99.0


def test_unknown_preset_lists_allowed():
    with pytest.raises(KeyError, match="falcon_h1_0_5b"):
        get_preset("falcon_h1_9b")
