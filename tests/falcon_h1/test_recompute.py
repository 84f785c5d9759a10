"""Activation recomputation (train.recompute) changes memory, not results."""

import pytest
import torch

from falcon_h1.model import build_model
from falcon_h1.presets import get_preset
from falcon_h1.weights import gather_hf_state


def _loss_and_grads(recompute: str):
    model = build_model(get_preset("falcon_h1_micro"), recompute=recompute, seed=1).train()
    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)
    loss = model(ids, labels=labels).mean()
    loss.backward()
    return loss.item(), dict(gather_hf_state(model, grads=True))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_the_same_loss_and_gradients(megatron_single, mode):
    loss, grads = _loss_and_grads("none")
    loss_r, grads_r = _loss_and_grads(mode)
    assert loss_r == loss
    for name, grad in grads.items():
        assert torch.equal(grads_r[name], grad), name
