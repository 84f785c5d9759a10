"""µP width transfer: the width relations reproduce every published multiplier (within one ulp)."""

import math

import pytest

from falcon_h1.config import FalconH1Config
from falcon_h1.mup import MULTIPLIER_FIELDS, derive_multipliers, unit_multipliers, with_derived_multipliers
from tests.falcon_h1.test_presets import PUBLISHED

_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state")


def _within_one_ulp(got: float, published: float) -> bool:
    return abs(got - published) <= math.ulp(published)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_relations_reproduce_every_published_multiplier(name):
    published = PUBLISHED[name]
    shape = {k: published[k] for k in _SHAPE_FIELDS}
    cfg = FalconH1Config(mamba_d_ssm=shape["mamba_n_heads"] * shape["mamba_d_head"], **shape)
    derived = derive_multipliers(cfg)
    assert set(derived) == set(MULTIPLIER_FIELDS) and len(MULTIPLIER_FIELDS) == 9  # 7 scalars + 5 + 2 = 14
    expected = {**{"embedding_multiplier": 5.656854249492381, "attention_in_multiplier": 1.0},
                **{k: published[k] for k in MULTIPLIER_FIELDS if k in published}}
    for field, value in expected.items():
        values = value if isinstance(value, list) else [value]
        got = derived[field] if isinstance(value, list) else [derived[field]]
        assert len(got) == len(values), field
        for g, v in zip(got, values):
            assert _within_one_ulp(g, v), (field, g, v)


def test_a_new_width_gets_the_relations_values():
    cfg = FalconH1Config(hidden_size=1536, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128)
    m = derive_multipliers(cfg)
    assert m["lm_head_multiplier"] == 40 / 1536
    assert m["ssm_in_multiplier"] == 1280 / 1536
    assert m["attention_out_multiplier"] == 491520 / (1536 * 8 * 64)
    assert math.isclose(m["key_multiplier"], (1280 / 1536) ** 2 * math.sqrt(2) / 8 * math.sqrt(2), rel_tol=1e-15)
    assert math.isclose(m["mlp_multipliers"][1], 1228800 / (1536 * 2048), rel_tol=1e-15)


def test_relations_use_the_widths_after_the_attention_ratio():
    base = FalconH1Config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32, mamba_d_ssm=256, mamba_n_heads=8, mamba_d_head=32, mamba_d_state=16,
                          attention_ratio=0.5)
    derived = with_derived_multipliers(base)
    assert derived.attention_ratio == 0.5  # the config keeps its ratio; only the multipliers change
    # ratio 0.5 of the 384-channel mixer: 6 query heads of 32 (192 channels) and 192 SSM channels
    assert derived.attention_out_multiplier == 491520 / (256 * 6 * 32)
    assert derived.ssm_out_multiplier == 256 * math.sqrt(2) / 192


def test_a_missing_branch_keeps_unit_multipliers():
    cfg = FalconH1Config(hidden_size=128, layer_pattern="MMMM", num_attention_heads=4)
    m = derive_multipliers(cfg)
    assert m["attention_out_multiplier"] == 1.0 and m["key_multiplier"] == 1.0
    assert m["lm_head_multiplier"] == 40 / 128
    assert unit_multipliers()["ssm_multipliers"] == [1.0] * 5
