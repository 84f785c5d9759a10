"""Megatron's DDP, optimizer and lr schedule through recipes.optim / recipes.schedules.

The optimizer reference is float64 AdamW with decoupled weight decay (skipped for
biases and 1-D parameters) after clipping the global gradient L2 norm, as
published in Loshchilov & Hutter (2019) and Megatron's clip_grad_norm_fp32
(coefficient max_norm / (norm + 1e-6), applied only when below 1). The schedule
reference is the closed-form warmup + cosine/linear/constant decay.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # engine_testutil, shared with the workers
from engine_testutil import configs, tiny_gpt
from recipes.optim import build_optimizer, wrap_model
from recipes.schedules import build_scheduler
from tests.conftest import torchrun

WORKER = Path(__file__).with_name("optim_worker.py")
HYPER = dict(lr=0.05, min_lr=0.0, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6, grad_clip=1.0)


def reference_adamw(params: dict, grads_per_step: list[dict], decays: dict, hyper: dict):
    """float64 AdamW + global-norm clipping; returns (final params, grad norm of each step)."""
    p = {n: t.double().clone() for n, t in params.items()}
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    v = {n: torch.zeros_like(t) for n, t in p.items()}
    b1, b2, lr, eps = hyper["adam_beta1"], hyper["adam_beta2"], hyper["lr"], hyper["adam_eps"]
    norms = []
    for t, grads in enumerate(grads_per_step, start=1):
        g = {n: x.double() for n, x in grads.items()}
        norm = math.sqrt(sum(x.pow(2).sum().item() for x in g.values()))
        norms.append(norm)
        coeff = hyper["grad_clip"] / (norm + 1e-6)
        if coeff < 1.0:
            g = {n: x * coeff for n, x in g.items()}
        for n in p:
            if decays[n]:
                p[n] *= 1.0 - lr * hyper["weight_decay"]
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            m_hat, v_hat = m[n] / (1 - b1**t), v[n] / (1 - b2**t)
            p[n] -= lr * m_hat / (v_hat.sqrt() + eps)
    return p, norms


def expected_decay(name: str, param: torch.Tensor) -> bool:
    return not (name.endswith(".bias") or param.dim() == 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("fused_optimizer,fused_adamw", [(True, False), (False, False), (True, True)],
                         ids=["foreach_norm", "megatron_norm", "clip_in_fused_adamw"])
@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_two_steps_match_float64_adamw_with_clipping(megatron_single, monkeypatch, distributed_optimizer,
                                                     fused_optimizer, fused_adamw):
    # fused_optimizer: the gradient norm and the clipping scale go through megatron_compat.optimizer's foreach
    # replacements of Megatron's fallbacks. Training sets torch's fused AdamW on CUDA only (test_optim_gpu.py);
    # fused_adamw sets it here on the CPU, where the clipping factor must reach the AdamW's kernel instead
    # of Megatron's multiply, which is made to fail
    from megatron.core.optimizer import clip_grads

    from falcon_h1.megatron_compat.optimizer import _foreach_l2_norm, set_fused_adamw, torch_adamws

    model, config = tiny_gpt(seed=3)
    train_cfg, parallel_cfg = configs(**HYPER, fused_optimizer=fused_optimizer)
    parallel_cfg.distributed_optimizer = distributed_optimizer
    ddp = wrap_model(model, parallel_cfg, train_cfg, config)
    optimizer = build_optimizer(ddp, train_cfg, parallel_cfg)
    assert (clip_grads.l2_norm_impl is _foreach_l2_norm) == fused_optimizer
    if fused_adamw:
        set_fused_adamw(optimizer, True)

        def no_multiply(*args, **kwargs):
            raise AssertionError("Megatron's clipping multiply ran where the fused AdamW takes the factor")

        monkeypatch.setattr(clip_grads, "clip_grad_by_total_norm_fp32", no_multiply)

    named = dict(ddp.module.named_parameters())
    start = {n: p.detach().cpu().clone() for n, p in named.items()}
    generator = torch.Generator().manual_seed(5)
    # Step 1 clips (norm >> 1), step 2 does not (norm < 1).
    grads_per_step = [
        {n: torch.randn(p.shape, generator=generator) * scale for n, p in named.items()}
        for scale in (0.5, 0.002)
    ]
    norms = []
    for grads in grads_per_step:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        for n, p in named.items():
            p.main_grad.copy_(grads[n])
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful
        assert not any(hasattr(adamw, "grad_scale") for adamw in torch_adamws(optimizer))  # one step's factor
        # the foreach kernels keep the norm and the clipping factor on the device: no host read mid-step
        assert isinstance(grad_norm, torch.Tensor) == fused_optimizer
        norms.append(float(grad_norm))

    decays = {n: expected_decay(n, p) for n, p in named.items()}
    assert any(decays.values()) and not all(decays.values())
    expected, expected_norms = reference_adamw(start, grads_per_step, decays, HYPER)
    assert expected_norms[0] > HYPER["grad_clip"] > expected_norms[1]
    for got, want in zip(norms, expected_norms):
        assert got == pytest.approx(want, rel=1e-6)
    for n, p in named.items():
        got = p.detach().cpu()
        assert rel(got, expected[n]) <= 1e-6, n
        # The update itself, not only the parameter, must agree.
        assert rel(got - start[n], expected[n] - start[n].double()) <= 1e-5, n


def test_no_weight_decay_groups_follow_megatron_rule(megatron_single):
    model, config = tiny_gpt(seed=3)
    train_cfg, parallel_cfg = configs(**HYPER)
    optimizer = build_optimizer(wrap_model(model, parallel_cfg, train_cfg, config), train_cfg, parallel_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            want = HYPER["weight_decay"] if expected_decay(names[id(p)], p) else 0.0
            assert group["weight_decay"] == want, names[id(p)]


def test_bad_config_names_the_field(megatron_single):
    model, config = tiny_gpt(seed=3)
    train_cfg, parallel_cfg = configs(lr=1e-3, min_lr=1e-2)
    ddp = wrap_model(model, parallel_cfg, train_cfg, config)
    with pytest.raises(ValueError, match="train.min_lr"):
        build_optimizer(ddp, train_cfg, parallel_cfg)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("optim") / "results.pt"
    torchrun(WORKER, 2, str(out), timeout=240)
    return torch.load(out)


def test_dp2_averaged_grads_equal_full_batch_grads(two_process_results):
    """DP=2 with overlapped, bucketed all-reduce == one process on the concatenated batch."""
    for overlap in (False, True):
        result = two_process_results[f"dp2_overlap_{overlap}"]
        assert result["buckets"] > (2 if overlap else 0)
        for rank_errors in result["rel_errors"]:
            for name, error in rank_errors.items():
                assert error <= 1e-5, (overlap, name, error)


def test_tp2_step_counts_duplicated_params_once(two_process_results):
    """TP=2: the clipping norm and the update equal float64 AdamW on the full tensors."""
    result = two_process_results["tp2"]
    decays = {n: expected_decay(n, p) for n, p in result["start"].items()}
    expected, expected_norms = reference_adamw(result["start"], [result["grads"]], decays, HYPER)
    assert expected_norms[0] > HYPER["grad_clip"]
    assert result["grad_norm"] == pytest.approx(expected_norms[0], rel=1e-6)
    assert result["replicated"], "the tiny GPT has TP-replicated params (norms, row-parallel biases)"
    for n, p in result["final"].items():
        assert rel(p - result["start"][n], expected[n] - result["start"][n].double()) <= 1e-5, n


def closed_form_lr(n: int, style: str, lr: float, min_lr: float, warmup: int, total: int) -> float:
    if n <= warmup:
        return lr * n / warmup
    if style == "constant":
        return lr
    if n > total:
        return min_lr
    progress = (n - warmup) / (total - warmup)
    if style == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr + (lr - min_lr) * (1 - progress)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_schedule_matches_closed_form(megatron_single, style):
    model, config = tiny_gpt(seed=3)
    train_cfg, parallel_cfg = configs(lr=0.02, min_lr=0.002, warmup_steps=3, max_steps=10,
                                      lr_decay_style=style, weight_decay=0.1)
    optimizer = build_optimizer(wrap_model(model, parallel_cfg, train_cfg, config), train_cfg, parallel_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    for n in range(13):
        want = closed_form_lr(n, style, 0.02, 0.002, 3, 10)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), (style, n)
            assert group["weight_decay"] == (0.1 if group["wd_mult"] else 0.0)
        scheduler.step(1)

    # A resumed scheduler continues from the saved step.
    resumed = build_scheduler(optimizer, train_cfg)
    resumed.load_state_dict({**scheduler.state_dict()})
    assert resumed.num_steps == 13
    assert optimizer.param_groups[0]["lr"] == pytest.approx(closed_form_lr(13, style, 0.02, 0.002, 3, 10))


def test_wsd_schedule_holds_then_decays_exponentially_to_an_eighth(megatron_single):
    """TII's Falcon-H1 SFT schedule: warmup, lr held, then the last decay steps fall to lr / 8 in
    Megatron's "exponential" shape, lr/8 + (2 * 0.5**r - 1) * 7/8 lr at decay progress r."""
    model, config = tiny_gpt(seed=3)
    lr = 128e-6
    train_cfg, parallel_cfg = configs(lr=lr, min_lr=lr / 8, warmup_steps=2, max_steps=12, lr_decay_style="WSD",
                                      lr_wsd_decay_steps=4, weight_decay=0.0)
    optimizer = build_optimizer(wrap_model(model, parallel_cfg, train_cfg, config), train_cfg, parallel_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    want = [0.0, lr / 2] + [lr] * 7 + [lr / 8 + (2 * 0.5 ** (k / 4) - 1) * 7 / 8 * lr for k in (1, 2, 3)] + [lr / 8]
    got = []
    for _ in range(13):
        got.append(optimizer.param_groups[0]["lr"])
        assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)
        scheduler.step(1)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert got[-1] == pytest.approx(lr / 8, rel=1e-12)


@pytest.mark.parametrize(
    "overrides, field",
    [({"lr_decay_style": "wsd"}, "train.lr_decay_style"), ({"warmup_steps": 10, "max_steps": 10}, "train.warmup_steps"),
     ({"lr_decay_style": "WSD"}, r"train.lr_wsd_decay_steps = 0 .*1 \.\. max_steps - warmup_steps"),
     ({"lr_decay_style": "WSD", "lr_wsd_decay_steps": 5, "lr_wsd_decay_style": "step"}, "train.lr_wsd_decay_style"),
     ({"lr_wsd_decay_steps": 5}, "train.lr_wsd_decay_steps = 5 applies to train.lr_decay_style = WSD only")],
)
def test_bad_schedule_names_the_field(megatron_single, overrides, field):
    model, config = tiny_gpt(seed=3)
    train_cfg, parallel_cfg = configs(**overrides)
    with pytest.raises(ValueError, match=field):  # the optimizer and the scheduler check the schedule
        build_optimizer(wrap_model(model, parallel_cfg, train_cfg, config), train_cfg, parallel_cfg)
    with pytest.raises(ValueError, match=field):
        build_scheduler(None, train_cfg)


def test_fused_adamw_setting_survives_a_state_dict_load():
    # torch's load_state_dict brings back the saved groups' fused/foreach flags; set_fused_adamw
    # puts the run's own choice back, with the step counters where that path reads them
    from falcon_h1.megatron_compat.optimizer import set_fused_adamw

    def adamw(fused: bool):
        param = torch.nn.Parameter(torch.arange(4.0))
        optimizer = torch.optim.AdamW([param], lr=0.1)
        set_fused_adamw(optimizer, fused)
        param.grad = torch.ones(4)
        optimizer.step()
        return param, optimizer

    (p_fused, fused), (p_plain, plain) = adamw(True), adamw(False)
    assert fused.param_groups[0]["fused"] is True and plain.param_groups[0]["fused"] is None
    assert torch.allclose(p_fused, p_plain, rtol=1e-6)  # the same update on either path
    fused.load_state_dict(plain.state_dict())
    assert fused.param_groups[0]["fused"] is None  # what the load did
    set_fused_adamw(fused, True)
    assert fused.param_groups[0]["fused"] is True and fused.state[p_fused]["step"].dtype == torch.float32
    set_fused_adamw(fused, False)
    assert fused.param_groups[0]["fused"] is None and fused.state[p_fused]["step"].device.type == "cpu"


def test_ddp_bucket_size_sets_the_gradient_buckets(megatron_single):
    def buckets(bucket_size):
        model, config = tiny_gpt(seed=3)
        train_cfg, parallel_cfg = configs()
        parallel_cfg.overlap_grad_reduce, parallel_cfg.ddp_bucket_size = True, bucket_size
        ddp = wrap_model(model, parallel_cfg, train_cfg, config)
        return sum(len(group.buckets) for group in ddp.bucket_groups), sum(p.numel() for p in model.parameters())

    default, numel = buckets(None)
    assert default == 1  # Megatron's default bucket (>= 4e7 parameters) holds the whole tiny model
    small, _ = buckets(3000)
    assert small >= numel // 3000 // 2 and small > 2  # buckets of about 3000 parameters (whole tensors each)
