"""benchmarks/mup_coord_check.py, smoke-tested at two small widths and one step: the records have
the documented shape, and the initial logits' RMS is what the init and the multipliers give
(RMSNorm output of RMS 1 times lm_head rows of std initializer_range = 0.02, times lm_head_multiplier)."""

import importlib.util
import math

import pytest

from tests.conftest import REPO


def _module():
    spec = importlib.util.spec_from_file_location("mup_coord_check", REPO / "benchmarks" / "mup_coord_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coord_check_records_every_layer_and_the_logits(megatron_single):
    coord = _module()
    results = coord.coord_check(widths=(64, 128), steps=1, batch=2, seq_len=16)
    assert set(results) == {"derived", "unit"}
    for mode, per_width in results.items():
        assert set(per_width) == {64, 128}
        for width, records in per_width.items():
            assert set(records) == {"layer_0", "layer_1", "layer_2", "layer_3", "logits"}
            assert all(len(values) == 2 and all(math.isfinite(v) for v in values) for values in records.values())
            lm_head = 40 / width if mode == "derived" else 1.0
            assert records["logits"][0] == pytest.approx(0.02 * math.sqrt(width) * lm_head, rel=0.1)
    assert "rms(widest)/rms(narrowest)" in coord.growth_table(results)
