"""Activation recomputation (train.recompute) changes memory, not results."""

import pytest
import torch

from falcon_h1.model import build_model
from falcon_h1.presets import get_preset
from falcon_h1.weights import gather_hf_state


def _loss_and_grads(recompute: str, recompute_layers=None, calls=None):
    model = build_model(get_preset("falcon_h1_micro"), recompute=recompute, recompute_layers=recompute_layers,
                        seed=1).train()
    if calls is not None:  # forward calls per layer: a recomputed layer runs again in the backward
        for index, layer in enumerate(model.layers):
            layer.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls.get(index, 0) + 1))
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


def test_recomputing_the_first_layers_only(megatron_single):
    """train.recompute_layers = N: the first N layers run their forward again in the backward, the
    others keep their activations; loss and gradients are those of no recomputation."""
    loss, grads = _loss_and_grads("none")
    layers = get_preset("falcon_h1_micro").num_hidden_layers
    calls = {}
    loss_r, grads_r = _loss_and_grads("full", recompute_layers=1, calls=calls)
    assert calls == {0: 2, **{i: 1 for i in range(1, layers)}}
    assert loss_r == loss
    for name, grad in grads.items():
        assert torch.equal(grads_r[name], grad), name


@pytest.mark.parametrize("recompute,layers,message", [
    ("none", 1, "null unless the recomputation is full"),
    ("selective", 1, "null unless the recomputation is full"),
    ("full", 0, r"an integer in 1\.\.2"),
    ("full", 3, r"an integer in 1\.\.2"),
    ("full", True, r"an integer in 1\.\.2"),
])
def test_impossible_recompute_layers_are_refused_by_name(megatron_single, recompute, layers, message):
    with pytest.raises(ValueError, match="recompute_layers = .*" + message):
        build_model(get_preset("falcon_h1_micro"), recompute=recompute, recompute_layers=layers)
