"""Released presets have the published parameter counts (counted on the meta device)."""

import pytest
import torch

from falcon_h1 import build_model
from falcon_h1.presets import PRESETS, PUBLISHED_PARAMETERS, get_preset


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_published(megatron_single, name):
    with torch.device("meta"):
        model = build_model(PRESETS[name], initialize=False, device=torch.device("meta"))
    cfg = model.cfg
    padding_rows = model.vocab_padded - cfg.vocab_size
    count = sum(p.numel() for p in model.parameters())
    count -= padding_rows * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    assert abs(count / PUBLISHED_PARAMETERS[name] - 1) <= 0.01


def test_0_5b_matches_to_the_parameter(megatron_single):
    # 521,411,104: the safetensors count of tiiuae/Falcon-H1-0.5B-Base
    with torch.device("meta"):
        model = build_model(PRESETS["falcon_h1_0_5b"], initialize=False, device=torch.device("meta"))
    padding = (model.vocab_padded - 32784) * 1024 * 2
    assert sum(p.numel() for p in model.parameters()) - padding == 521_411_104


def test_unknown_preset_lists_allowed():
    with pytest.raises(KeyError, match="falcon_h1_0_5b"):
        get_preset("falcon_h1_9b")
