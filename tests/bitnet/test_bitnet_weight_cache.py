"""The quantised-weight cache (bitnet.weight_cache) on CPU: training with it equals quantising
at every forward bit for bit, with gradient accumulation, under every optimizer path that
updates weights without bumping their version counter (torch's fused AdamW, Megatron's
mixed-precision and distributed optimizers); it quantises once per optimizer step; activation
recompute reuses it; writes behind the optimizer's back are seen."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bitnet_testutil import tiny_config  # noqa: E402

from recipes.config import BitNetConfig, ParallelConfig, TrainConfig  # noqa: E402

STEPS, MICRO_BATCHES = 3, 2


@pytest.fixture(scope="module", autouse=True)
def megatron_cpu():
    from falcon_h1.megatron_compat.parallel import initialize_parallel

    initialize_parallel(1, 1, 1234)


@pytest.fixture
def quantisations(monkeypatch):
    """Counts the weight quantisations of every BitNet layer (calls of the one function that
    makes a layer's GEMM weight)."""
    from bitnet.layers import _BitNetLinearMixin

    counts = {"n": 0}
    make = _BitNetLinearMixin._make_gemm_weight

    def counted(self, weight, row_scale):
        counts["n"] += 1
        return make(self, weight, row_scale)

    monkeypatch.setattr(_BitNetLinearMixin, "_make_gemm_weight", counted)
    return counts


def _micro(precision="fp32", recompute="none", **bitnet):
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    cfg = get_preset("falcon_h1_micro")
    linears = falcon_h1_linear_spec(BitNetConfig(enabled=True, **bitnet), cfg.kernel_backend)
    return build_model(cfg, linears=linears, precision=precision, recompute=recompute, seed=3)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g))
            for _ in range(STEPS * MICRO_BATCHES)]


def _quantise_at_every_forward(model):
    """The uncached behaviour, whatever the cache's staleness rules: every forward starts from an
    empty entry."""
    from bitnet.layers import bitnet_layers

    for _, layer in bitnet_layers(model):
        layer.register_forward_pre_hook(lambda module, _: module._weight_cache.clear())


def _torch_optimizer(kind):
    def build(model):
        fused = kind == "adamw_fused"
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, fused=fused, foreach=not fused)

        def step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return model, step
    return build


def _megatron_optimizer(distributed: bool):
    def build(model):
        from recipes.optim import build_optimizer, wrap_model

        train = TrainConfig(max_steps=STEPS + 1, warmup_steps=0, precision="bf16", lr=3e-2, min_lr=3e-3)
        parallel = ParallelConfig(distributed_optimizer=distributed)
        ddp = wrap_model(model, parallel, train, model.config)
        optimizer = build_optimizer(ddp, train, parallel)

        def step():
            ddp.finish_grad_sync()
            assert optimizer.step()[0]
            ddp.zero_grad_buffer()
            optimizer.zero_grad()

        return ddp, step
    return build


OPTIMIZERS = {
    "adamw_fused": ("fp32", _torch_optimizer("adamw_fused")),
    "adamw_foreach": ("fp32", _torch_optimizer("adamw_foreach")),
    "megatron_bf16": ("bf16", _megatron_optimizer(distributed=False)),
    "megatron_distributed_bf16": ("bf16", _megatron_optimizer(distributed=True)),
}


def _train(kind, cached: bool, **bitnet):
    """Losses of every micro-batch and the final weights, STEPS optimizer steps of
    MICRO_BATCHES accumulated micro-batches each."""
    precision, build = OPTIMIZERS[kind]
    model = _micro(precision, **bitnet)
    if not cached:
        _quantise_at_every_forward(model)
    wrapped, step = build(model)
    losses, batches = [], iter(_batches())
    for _ in range(STEPS):
        for _ in range(MICRO_BATCHES):
            ids, labels = next(batches)
            loss = wrapped(ids, labels=labels).float().mean() / MICRO_BATCHES
            loss.backward()
            losses.append(loss.detach())
        step()
    return torch.stack(losses), {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_training_with_the_cache_equals_quantising_every_forward(kind, quantisations):
    """Bit for bit. None of these optimizers bumps the weights' version counter (a cache keyed
    on it alone would reuse the first step's ternary weights and fail here)."""
    from bitnet.layers import bitnet_layers

    n_layers = len(bitnet_layers(_micro()))
    losses, weights = _train(kind, cached=True)
    assert quantisations["n"] == STEPS * n_layers  # once per layer and optimizer step
    quantisations["n"] = 0
    losses_ref, weights_ref = _train(kind, cached=False)
    assert quantisations["n"] == STEPS * MICRO_BATCHES * n_layers
    assert torch.equal(losses, losses_ref), (losses, losses_ref)
    assert weights.keys() == weights_ref.keys()
    for name in weights:
        assert torch.equal(weights[name], weights_ref[name]), name
    initial = dict(_micro(OPTIMIZERS[kind][0]).named_parameters())
    assert not torch.equal(weights["layers.0.mlp.linear_fc1.weight"], initial["layers.0.mlp.linear_fc1.weight"])


def test_int8_gemm_training_with_the_cache_equals_quantising_every_forward(quantisations):
    losses, weights = _train("adamw_fused", cached=True, int8_matmul=True, subln=True)
    cached_count, quantisations["n"] = quantisations["n"], 0
    losses_ref, weights_ref = _train("adamw_fused", cached=False, int8_matmul=True, subln=True)
    assert cached_count * MICRO_BATCHES == quantisations["n"]
    assert torch.equal(losses, losses_ref)
    assert all(torch.equal(weights[name], weights_ref[name]) for name in weights)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_reuses_the_cached_weight(recompute, quantisations):
    """Activation recompute runs the forward again inside the backward: it quantises nothing,
    and gradients are those of the run without recompute, bit for bit."""
    from bitnet.layers import bitnet_layers

    ids, labels = _batches()[0]
    grads = {}
    for mode in ("none", recompute):
        model = _micro(recompute=mode)
        quantisations["n"] = 0
        model(ids, labels=labels).mean().backward()
        assert quantisations["n"] == len(bitnet_layers(model)), mode
        grads[mode] = {name: p.grad for name, p in model.named_parameters()}
    assert all(torch.equal(grads[recompute][name], grads["none"][name]) for name in grads["none"])


def _column():
    from bitnet.layers import BitNetColumnParallelLinear

    return BitNetColumnParallelLinear(24, 40, config=tiny_config(), init_method=torch.nn.init.normal_, bias=False,
                                      gather_output=False)


def _fresh_output(layer, x):
    """The layer's output with nothing cached: a new layer holding the same weight."""
    fresh = _column()
    fresh.load_state_dict(layer.state_dict())
    return fresh(x)[0]


def test_reentrant_checkpoint_reuses_the_cached_weight(quantisations):
    from torch.utils.checkpoint import checkpoint

    layer = _column()
    x = torch.randn(5, 2, 24, requires_grad=True)
    y = checkpoint(lambda t: layer(t)[0], x, use_reentrant=True)
    y.square().sum().backward()
    assert quantisations["n"] == 1
    x_ref = x.detach().clone().requires_grad_(True)
    reference = _column()
    reference.load_state_dict(layer.state_dict())
    reference(x_ref)[0].square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(layer.weight.grad, reference.weight.grad)


def test_writes_outside_an_optimizer_step_are_seen():
    from bitnet.weight_cache import weights_changed

    layer = _column()
    x = torch.randn(3, 2, 24)
    before = layer(x)[0]
    with torch.no_grad():  # an in-place write autograd records: the version counter moves
        layer.weight.mul_(-1.0)
    assert torch.equal(layer(x)[0], _fresh_output(layer, x)) and not torch.equal(layer(x)[0], before)
    layer.weight.data = torch.randn(40, 24)  # new storage
    assert torch.equal(layer(x)[0], _fresh_output(layer, x))
    layer.weight.data.copy_(torch.randn(40, 24))  # neither: the writer says so
    weights_changed()
    assert torch.equal(layer(x)[0], _fresh_output(layer, x))


def test_a_weight_handed_to_forward_is_never_cached():
    """Only the layer's own parameter is cached: another tensor handed in (a temporary whose
    memory may come back with other values) is quantised at every call."""
    layer = _column()
    x = torch.randn(3, 2, 24)
    for seed in (1, 2):
        w = torch.randn(40, 24, generator=torch.Generator().manual_seed(seed))
        other = _column()
        with torch.no_grad():
            other.weight.copy_(w)
        assert torch.equal(layer(x, weight=w)[0], other(x)[0])


def test_inference_mode_keeps_nothing_a_later_backward_would_need():
    layer = _column()
    x = torch.randn(3, 2, 24)
    with torch.inference_mode():
        layer(x)
    assert not layer._weight_cache.holds
    y = layer(x.requires_grad_(True))[0]  # builds the entry outside inference mode
    y.sum().backward()
    assert layer._weight_cache.holds and layer.weight.grad is not None
