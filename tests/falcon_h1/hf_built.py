"""A saved Hugging Face FalconH1 loaded into a model that build_model makes with given linears and
kernel options (falcon_h1.from_hf builds with the defaults), and gradients compared to HF's."""

import json

import torch

from falcon_h1.hf import config_from_hf, load_hf_weights
from falcon_h1.kernels import KernelOptions
from falcon_h1.linears import MEGATRON_LINEARS
from falcon_h1.model import build_model
from falcon_h1.weights import gather_hf_state


def build_from_hf(path, linears=MEGATRON_LINEARS, kernel_options=KernelOptions(), **overrides):
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), **overrides)
    model = build_model(cfg, linears=linears, kernel_options=kernel_options, initialize=False)
    load_hf_weights(model, path)
    return model


def gradient_errors(ours, hf, ids, probe) -> dict[str, float]:
    """Relative error of every parameter's gradient of sum(logits * probe) against HF's, and of the logits."""
    hf.zero_grad(set_to_none=True)
    expected = hf(ids).logits
    (expected * probe).sum().backward()
    got = ours(ids)
    (got * probe).sum().backward()
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    errors = {"logits": rel(got.detach(), expected.detach())}
    pieces = {}
    for name, grad in gather_hf_state(ours, grads=True):
        pieces.setdefault(name.split(":")[0], []).append(grad)
    for name, param in hf.named_parameters():
        errors[name] = rel(torch.cat(pieces[name]).reshape(param.shape), param.grad)
    return errors
