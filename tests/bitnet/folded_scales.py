"""A BitNet Falcon-H1 with the µP multipliers folded (KernelOptions.fold_scales: fc1's and the
mixer in-projections' output rows through BitNet's `output_row_scale`, the conv output) against
the same model with them on the activations: logits, per-token loss and every gradient. Shared
by the reference-path test and the Triton-interpreter worker.

The multipliers are powers of two, all != 1: scaling by one is exact in floating point, so the
folded model must equal the unfolded one bit for bit, and any scale dropped, doubled or put on
the wrong rows shows. (With other values the two differ by fp32 rounding, which a downstream
per-token quantiser now and then turns into one flipped round-half step, a difference of one
int8 step in that element: real rounding, but too large to tell from a bug by a tolerance.)"""

import torch

from falcon_h1.presets import get_preset

# A larger init than the preset's so each branch's contribution is well above rounding.
CONFIG = get_preset("falcon_h1_micro").replace(
    initializer_range=0.1, key_multiplier=0.25, attention_in_multiplier=2.0, attention_out_multiplier=0.5,
    ssm_in_multiplier=2.0, ssm_out_multiplier=0.5, ssm_multipliers=[0.5, 0.25, 2.0, 4.0, 0.125],
    mlp_multipliers=[4.0, 0.25])
TOLERANCE = 1e-5  # fp32, relative L2 per output and per parameter gradient
EVERY_LAYER = ["attention_qkv", "attention_out", "mamba_in", "mamba_out", "mlp", "lm_head"]


def bitnet_model(bitnet_cfg, kernel_options, fused_projections: bool, as_built_on_gpu: bool = False,
                 **changes):
    """The BitNet model of CONFIG (with `changes` to it). as_built_on_gpu: keep every kernel option
    as asked, as build_model does on a GPU (on a CPU it turns the Triton kernels off), for Triton's
    interpreter."""
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.config import resolve
    from falcon_h1.model import FalconH1Model, build_model, make_transformer_config
    from falcon_h1.weights import init_weights

    cfg = CONFIG.replace(fused_projections=fused_projections, **changes)
    linears = falcon_h1_linear_spec(bitnet_cfg, cfg.kernel_backend)
    if not as_built_on_gpu:
        return build_model(cfg, linears=linears, kernel_options=kernel_options, seed=11)
    cfg = resolve(cfg)
    model = FalconH1Model(cfg, make_transformer_config(cfg), linears, kernel_options)
    linears.finish(model)
    init_weights(model, 11)
    return model


def folding(model) -> set[bool]:
    """Whether each mixer and MLP of `model` carries its scales on the linears' rows."""
    return {m.scales_in_weights for layer in model.layers for m in (layer.mixer, layer.mlp)}


def batch(vocab: int, b: int = 2, s: int = 37, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, vocab, (b, s), generator=g),
            "labels": torch.randint(0, vocab, (b, s), generator=g)}


def run(model, data) -> dict:
    """Logits, per-token loss and every parameter's gradient of the summed loss."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(data["ids"])
    loss = model(data["ids"], labels=data["labels"])
    loss.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.detach(), "grads": grads}
