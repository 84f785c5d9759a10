"""The optimizer on a GPU, through train(). train.fused_optimizer: torch's fused AdamW and the
foreach gradient norm / parameter copies follow the run with Megatron's fallbacks (foreach AdamW,
per-tensor norms read back to the host). train.optimizer_offload_fraction: the state kept and
stepped on the host trains like the all-GPU distributed optimizer (such runs are not checkpointed:
refused on CPU). The memory check stops a state too large for the GPU. Skipped without CUDA; the
CPU side (foreach norm and clipping scale against a float64 AdamW, the offload's refusals and byte
counts) is tests/recipes/test_optim.py, test_optimizer_offload.py and test_memory_budget.py.

Bound: both runs see the same weights and batches; AdamW's fused and foreach kernels (and the CPU's
AdamW) round differently in the last fp32 bit, which the loss carries at ~1e-6 over a few steps."""

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

COMMON = ["logger=none", "data.seq_length=256", "train.precision=bf16", "train.max_steps=6",
          "train.micro_batch_size=8", "train.global_batch_size=8", "train.warmup_steps=2",
          "train.log_interval=1", "train.save_interval=0"]


def _train(run_dir, *overrides):
    """(loss, grad norm) of each step train() logged in run_dir, this and any earlier launch."""
    from recipes.api import compose_recipe
    from recipes.training import train

    train(compose_recipe(COMMON + [f"train.run_dir={run_dir}", *overrides]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["loss"], row["grad_norm"]) for row in rows if "loss" in row]


def _run(run_dir, fused: bool):
    return _train(run_dir, f"train.fused_optimizer={str(fused).lower()}")


def test_fused_optimizer_follows_megatron_fallbacks(tmp_path):
    fused, megatron = _run(tmp_path / "fused", True), _run(tmp_path / "megatron", False)
    assert len(fused) == len(megatron) == 6
    for (loss_f, norm_f), (loss_m, norm_m) in zip(fused, megatron):
        assert loss_f == pytest.approx(loss_m, rel=1e-4)
        assert norm_f == pytest.approx(norm_m, rel=1e-3)
    assert fused[-1][0] < fused[0][0]


def test_the_fused_optimizer_step_never_waits_for_the_host(tmp_path, monkeypatch):
    # Megatron without Apex/TE reads the gradient norm on the host to pick the clipping factor unless
    # it has a tensor-scale kernel; that read makes the optimizer's launches wait for the whole backward
    import recipes.optim

    build, norms = recipes.optim.build_optimizer, []

    def watched_build(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        step = optimizer.step

        def step_without_host_reads():
            if norms:  # the first step caches Megatron's host-side checks (gradient-norm groups)
                torch.cuda.set_sync_debug_mode("error")
            try:
                result = step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            norms.append(result[1])
            return result

        optimizer.step = step_without_host_reads
        return optimizer

    monkeypatch.setattr(recipes.optim, "build_optimizer", watched_build)
    logged = _train(tmp_path / "run", "train.fused_optimizer=true", "train.grad_clip=1.0")
    assert len(norms) == 6 and all(isinstance(norm, torch.Tensor) and norm.is_cuda for norm in norms)
    assert [norm for _, norm in logged] == pytest.approx([float(norm) for norm in norms], rel=1e-6)


def test_resumed_run_keeps_the_fused_optimizer_setting(tmp_path):
    # torch's load_state_dict restores the saved param groups' flags: a run resumed with
    # fused_optimizer=true from a checkpoint saved with false must still step fused
    from recipes.api import compose_recipe
    from recipes.training import train

    run = ["train.save_interval=2", f"train.run_dir={tmp_path / 'run'}"]
    train(compose_recipe(COMMON + run + ["train.fused_optimizer=false", "train.exit_after_steps=2"]))
    seen = []
    import falcon_h1.megatron_compat.optimizer_checkpoint as optim  # where the load sets it back

    original = optim.set_fused_adamw
    optim.set_fused_adamw = lambda opt, enabled: (original(opt, enabled), seen.append(
        [g["fused"] for inner in getattr(opt, "chained_optimizers", [opt]) for g in inner.optimizer.param_groups]))
    try:
        train(compose_recipe(COMMON + run + ["train.fused_optimizer=true"]))
    finally:
        optim.set_fused_adamw = original
    assert seen and all(flag is True for flag in seen[-1])  # after the checkpoint load


def test_a_training_state_larger_than_the_free_memory_stops_before_megatron_allocates_it(tmp_path, monkeypatch):
    """train() on a GPU that (as reported) has almost nothing free: the memory check refuses the
    run naming the layout, before DDP or the optimizer exist and before any metric is written."""
    from falcon_h1.errors import ConfigValueError
    from recipes.api import compose_recipe
    from recipes.training import train

    total = torch.cuda.mem_get_info()[1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1 << 20, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    with pytest.raises(ConfigValueError, match="parallel.tp = 1.*parallel.distributed_optimizer=true"):
        train(compose_recipe(COMMON + [f"train.run_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


DISTRIBUTED = "parallel.distributed_optimizer=true"


def _state_devices(megatron_optimizer) -> set[str]:
    """Where the AdamW moments of Megatron's distributed optimizer live (its HybridDeviceOptimizer's
    CPU and GPU sub-optimizers when offloading)."""
    inner = megatron_optimizer.optimizer
    optimizers = getattr(inner, "sub_optimizers", [inner])
    return {state["exp_avg"].device.type for opt in optimizers for state in opt.state.values() if "exp_avg" in state}


def test_an_offloaded_optimizer_trains_like_the_gpu_one_with_its_state_on_the_host(tmp_path, monkeypatch):
    import recipes.optim

    built = []
    original = recipes.optim.build_optimizer
    monkeypatch.setattr(recipes.optim, "build_optimizer", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    gpu = _train(tmp_path / "gpu", DISTRIBUTED)
    host = _train(tmp_path / "host", DISTRIBUTED, "train.optimizer_offload_fraction=1.0")
    half = _train(tmp_path / "half", DISTRIBUTED, "train.optimizer_offload_fraction=0.5")
    assert [_state_devices(opt) for opt in built] == [{"cuda"}, {"cpu"}, {"cpu", "cuda"}]
    assert len(gpu) == len(host) == len(half) == 6
    for (loss_g, norm_g), (loss_h, norm_h), (loss_5, norm_5) in zip(gpu, host, half):
        assert loss_h == pytest.approx(loss_g, rel=1e-4) and loss_5 == pytest.approx(loss_g, rel=1e-4)
        assert norm_h == pytest.approx(norm_g, rel=1e-3) and norm_5 == pytest.approx(norm_g, rel=1e-3)
    assert host[-1][0] < host[0][0]
