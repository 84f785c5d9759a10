"""Impossible configs fail with the field, the value and what is allowed."""

import pytest

from falcon_h1.config import FalconH1Config, apply_attention_ratio, resolve
from falcon_h1.errors import ConfigValueError
from falcon_h1.presets import get_preset


@pytest.mark.parametrize("changes,tp,field", [
    (dict(num_attention_heads=5, head_dim=None), 1, "num_attention_heads"),  # 128 % 5
    (dict(num_key_value_heads=3), 1, "num_key_value_heads"),
    (dict(attention_ratio=1.5), 1, "attention_ratio"),
    (dict(attention_ratio=-0.1), 1, "attention_ratio"),
    (dict(mamba_n_heads=7), 1, "mamba_n_heads"),
    (dict(layer_pattern="HHX-"), 1, "layer_pattern"),
    (dict(layer_pattern="HH"), 1, "layer_pattern"),
    (dict(ssm_multipliers=[1.0, 1.0]), 1, "ssm_multipliers"),
    (dict(num_key_value_heads=2), 4, "num_key_value_heads"),  # tp does not divide kv heads
    (dict(attention_backend="flash3"), 1, "attention_backend"),
    (dict(ssd_kernels="cuda"), 1, "ssd_kernels"),
    (dict(ssd_kernels="own", kernel_backend="reference"), 1, "ssd_kernels"),  # would run no Triton scan
    (dict(ssd_kernels="own", mamba_rms_norm=True, mamba_norm_before_gate=True), 1, "ssd_kernels"),  # the fused branch gates in the scan
    # only the fused branch recomputes its conv output: refused where the layers do not take it
    (dict(mamba_keep_conv_output=True, kernel_backend="reference"), 1, "mamba_keep_conv_output"),
    (dict(mamba_keep_conv_output=True, mamba_d_conv=3), 1, "mamba_keep_conv_output"),
    (dict(mamba_keep_conv_output="yes"), 1, "mamba_keep_conv_output"),
    (dict(projectors_bias=True), 1, "projectors_bias"),  # biases are not implemented: refused, not ignored
    (dict(attention_bias=True), 1, "attention_bias"),
    (dict(mlp_bias=True), 1, "mlp_bias"),
    (dict(mamba_proj_bias=True), 1, "mamba_proj_bias"),
    (dict(rope_scaling={"rope_type": "yarn"}), 1, "rope_scaling"),
])
def test_bad_config_names_field(changes, tp, field):
    cfg = get_preset("falcon_h1_tiny").replace(**changes)
    with pytest.raises(ConfigValueError) as err:
        resolve(cfg, tp)
    message = str(err.value)
    assert f"model.{field}" in message and "allowed" in message


def test_tp_not_dividing_heads_is_named():
    cfg = get_preset("falcon_h1_tiny").replace(num_attention_heads=8, num_key_value_heads=8)
    with pytest.raises(ConfigValueError, match=r"parallel.tp = 3"):
        resolve(cfg, 3)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_attention_ratio_keeps_mixer_width(ratio):
    base = get_preset("falcon_h1_0_5b")
    width = base.num_attention_heads * base.kv_channels + base.d_ssm
    cfg = resolve(base.replace(attention_ratio=ratio))
    attn = cfg.num_attention_heads * cfg.kv_channels if cfg.has_attention else 0
    ssm = cfg.d_ssm if cfg.has_mamba else 0
    assert attn + ssm == pytest.approx(width, abs=cfg.kv_channels * cfg.num_key_value_heads)
    assert attn / width == pytest.approx(ratio, abs=0.1)
    if ratio == 0.0:
        assert set(cfg.layer_pattern) == {"M"}
    if ratio == 1.0:
        assert set(cfg.layer_pattern) == {"A"}


def test_ratio_derived_heads_are_valid():
    cfg = apply_attention_ratio(get_preset("falcon_h1_3b").replace(attention_ratio=0.4))
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.d_ssm == cfg.mamba_n_heads * cfg.ssm_head_dim


def test_defaults_are_valid():
    resolve(FalconH1Config())
