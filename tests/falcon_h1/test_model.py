"""The residual stream between layers (falcon_h1.model with FalconH1Layer.forward's pending add).

Each layer's MLP output joins the stream in the next layer's first norm (or the final norm), whose
Triton kernel adds it in the same pass forward and backward. Reference: the same model adding each
MLP output in its own layer (KernelOptions.residual_across_layers off), which is the formula
h + mlp(norm(h)) as Hugging Face's FalconH1 writes it; tests/falcon_h1/test_hf_parity.py holds the
default against Hugging Face itself, and packed_model_interpret_worker.py the Triton norm against
the op-by-op add and norm."""

import pytest
import torch

from falcon_h1.kernels import KernelOptions
from falcon_h1.layers import RMSNorm
from falcon_h1.model import build_model
from falcon_h1.presets import get_preset
from falcon_h1.weights import gather_hf_state


def _run(across_layers: bool, recompute: str, monkeypatch):
    calls = []
    monkeypatch.undo()  # the unpatched norm, whichever run comes first
    add_and_norm = RMSNorm.add_and_norm

    def counted(self, x, delta):
        calls.append(self)
        return add_and_norm(self, x, delta)

    monkeypatch.setattr(RMSNorm, "add_and_norm", counted)
    model = build_model(get_preset("falcon_h1_micro"), recompute=recompute, seed=3,
                        kernel_options=KernelOptions(residual_across_layers=across_layers)).train()
    g = torch.Generator().manual_seed(4)
    ids, labels = torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)
    loss = model(ids, labels=labels).mean()
    loss.backward()
    forward_norms = {id(norm) for norm in calls}
    return model, loss.item(), dict(gather_hf_state(model, grads=True)), forward_norms


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_the_next_norm_adds_each_mlp_output_with_the_same_loss_and_gradients(megatron_single, monkeypatch, recompute):
    model, loss, grads, norms = _run(True, recompute, monkeypatch)
    reference, loss_ref, grads_ref, norms_ref = _run(False, recompute, monkeypatch)
    assert loss == loss_ref
    for name, grad in grads_ref.items():
        assert torch.equal(grads[name], grad), name
    layers = model.layers
    per_layer = {id(layer.pre_ff_layernorm) for layer in layers}
    # recomputation saves a layer's input alone, so there the stream enters the layer whole (a
    # selective layer adds it before its recomputed mixer), and after fully recomputed layers
    # the final norm has nothing to add
    inputs = {id(layer.input_layernorm) for layer in layers[1:]} if recompute == "none" else set()
    final = {id(model.final_layernorm)} if recompute != "full" else set()
    assert norms == per_layer | inputs | final
    assert norms_ref == {id(layer.pre_ff_layernorm) for layer in reference.layers}
