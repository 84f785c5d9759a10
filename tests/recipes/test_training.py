"""The training loop end to end on CPU: loss falls, kill + rerun resumes identically,
and DP=2 / TP=2 on two processes follow the one-process loss curve."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.api import compose_recipe
from recipes.recipe_file import recipe_to_yaml
from tests.conftest import REPO, free_port

COMMON = ["model=falcon_h1_micro", "model.vocab_size=320", "logger.wandb=false", "logger.progress_bar=false",
          "data.seq_length=64", "train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=3e-3",
          "train.warmup_steps=2"]


def _write_recipe(tmp_path: Path, name: str, *overrides: str) -> Path:
    recipe = compose_recipe(COMMON + [f"train.run_dir={tmp_path / name}", *overrides])
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe_to_yaml(recipe))
    return path


def _worker(recipe: Path, nproc: int = 1, wait: bool = True):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if nproc == 1:
        cmd = [sys.executable, "-m", "recipes.worker", str(recipe)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "recipes.worker", str(recipe)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _sigkill_after_checkpoint(proc, run_dir: Path, step: int) -> None:
    """Kill -9 the worker once checkpoint `step` is recorded: mid-run, no chance to clean up."""
    marker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while time.time() < deadline and not (marker.exists() and int(marker.read_text().strip() or 0) >= step):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    _worker(_write_recipe(tmp, "ref", "train.max_steps=12", "train.save_interval=0"))
    return tmp / "ref"


@pytest.fixture(scope="module")
def reference_run(reference_dir):
    return _losses(reference_dir)


def test_loss_falls(reference_run):
    losses = [reference_run[s] for s in sorted(reference_run)]
    assert len(losses) == 12
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow  # CI covers it by test_sft.py's killed chat run and test_stop_signals.py
def test_killed_run_resumes_and_continues_identically(tmp_path, reference_run):
    recipe = _write_recipe(tmp_path, "resumed", "train.max_steps=12", "train.save_interval=4")
    proc = _worker(recipe, wait=False)
    _sigkill_after_checkpoint(proc, tmp_path / "resumed", 4)
    assert not (tmp_path / "resumed" / "checkpoints" / "iter_0000012").exists()
    out = _worker(recipe)
    assert "finished 12 steps" in out.stdout
    resumed = _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == reference_run  # bit-identical continuation


@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.tp=2"], ["parallel.pp=2"]],
                         ids=["dp2", "tp2", "pp2"])
def test_two_processes_follow_one_process_curve(tmp_path, reference_dir, reference_run, layout):
    _worker(_write_recipe(tmp_path, "two", "train.max_steps=12", "train.save_interval=0", *layout), nproc=2)
    _assert_follows_one_process_curve(tmp_path / "two", reference_dir, reference_run)


def _assert_follows_one_process_curve(run_dir, reference_dir, reference_run):
    two = _losses(run_dir)
    assert sorted(two) == sorted(reference_run)
    # The gradient itself, not only the loss (Adam hides a uniformly scaled gradient, e.g. one
    # pre-divided by the DP size on top of the per-token normalisation): step 1's norm agrees.
    norm_one, norm_two = _losses(reference_dir, "grad_norm")[1], _losses(run_dir, "grad_norm")[1]
    assert abs(norm_two - norm_one) <= 1e-5 * norm_one, (norm_two, norm_one)
    # Steps 1-2 see the same weights and data, so they agree to rounding. Later steps differ
    # only by fp32 summation order (2 micro-batches on 1 rank vs 1 per rank), which Adam's
    # m/sqrt(v) amplifies in near-zero gradients: a few 1e-4 relative, not a different curve.
    for step in (1, 2):
        assert abs(two[step] - reference_run[step]) <= 1e-6 * reference_run[step]
    for step, loss in reference_run.items():
        assert abs(two[step] - loss) <= 1e-3 * abs(loss), (step, two[step], loss)


@pytest.fixture(scope="module")
def cp2_run(tmp_path_factory):
    """Context parallelism on two processes: each holds half of every sequence (parallel.cp=2)."""
    tmp = tmp_path_factory.mktemp("cp2")
    _worker(_write_recipe(tmp, "cp2", "train.max_steps=12", "train.save_interval=6", "parallel.cp=2"), nproc=2)
    return tmp / "cp2"


def test_context_parallel_follows_one_process_curve(cp2_run, reference_dir, reference_run):
    # the data shards, the loss over all shards' tokens and the gradients reduced over both ranks
    _assert_follows_one_process_curve(cp2_run, reference_dir, reference_run)


def test_cp2_checkpoint_resumes_at_cp1_with_the_same_losses(cp2_run, tmp_path):
    resumed = tmp_path / "resumed" / "checkpoints"
    shutil.copytree(cp2_run / "checkpoints" / "iter_0000006", resumed / "iter_0000006")
    (resumed / "latest_checkpointed_iteration.txt").write_text("6")
    out = _worker(_write_recipe(tmp_path, "resumed", "train.max_steps=12", "train.save_interval=0"))
    assert "finished 12 steps" in out.stdout
    cp1, cp2 = _losses(tmp_path / "resumed"), _losses(cp2_run)
    assert sorted(cp1) == list(range(7, 13))
    assert abs(cp1[7] - cp2[7]) <= 1e-6 * cp2[7]  # the same weights and batch, one process instead of two
    for step in range(8, 13):  # then the same optimizer state carries on
        assert abs(cp1[step] - cp2[step]) <= 1e-4 * cp2[step], (step, cp1[step], cp2[step])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.cp=2"], ["parallel.cp=2", "parallel.pp=2"]], ids=["cp2_dp2", "cp2_pp2"])
def test_context_parallel_on_four_processes_follows_one_process_curve(tmp_path, reference_dir, reference_run, layout):
    _worker(_write_recipe(tmp_path, "four", "train.max_steps=12", "train.save_interval=0", *layout), nproc=4)
    _assert_follows_one_process_curve(tmp_path / "four", reference_dir, reference_run)


@pytest.fixture(scope="module")
def tracked_runs(tmp_path_factory):
    """Two real tiny runs with W&B (offline) and TensorBoard on: dense and BitNet."""
    tmp = tmp_path_factory.mktemp("tracked")
    for name, extra in (("dense", []), ("ternary", ["bitnet=on"])):
        _worker(_write_recipe(tmp, name, "train.max_steps=8", "train.save_interval=8", "logger.wandb=true",
                              "logger.wandb_mode=offline", "logger.tensorboard=true", *extra))
    return tmp / "dense", tmp / "ternary"


def test_tensorboard_and_wandb_hold_the_logged_values(tracked_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dense, _ = tracked_runs
    losses = _losses(dense)
    events = EventAccumulator(str(dense / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops", "train/peak_mem_gib"):
        assert len(events.Scalars(tag)) == 8, tag
    offline = list((dense / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert (dense / "wandb_run_id").read_text().strip() in offline[0].name
    config = (dense / "config.yaml").read_text()
    assert "falcon_h1_micro" in config


def test_report_draws_two_real_runs(tracked_runs, tmp_path):
    from matplotlib import image as mpimg
    import numpy as np

    from recipes.report import main

    main([str(p) for p in tracked_runs] + ["--out", str(tmp_path)])
    pixels = mpimg.imread(tmp_path / "report.png")[..., :3]
    for rgb in ((0x1F / 255, 0x77 / 255, 0xB4 / 255), (0xFF / 255, 0x7F / 255, 0x0E / 255)):  # tab10 run 0, 1
        curve = np.all(np.abs(pixels - np.array(rgb)) < 0.1, axis=-1)
        assert curve.sum() > 300, rgb
    html = (tmp_path / "report.html").read_text()
    assert "dense" in html and "ternary" in html and "data:image/png;base64," in html


def test_bitnet_run_exports_ternary_weights_that_reproduce_its_forward(tracked_runs, tmp_path, megatron_single):
    import torch

    from bitnet.export import load_frozen_bitnet
    from bitnet.spec import falcon_h1_linear_spec
    from recipes.bitnet_export import main as export_main
    from falcon_h1.model import build_model
    from recipes.api import load_trained_model
    from recipes.build import effective_model_config

    _, ternary = tracked_runs
    out = tmp_path / "ternary.safetensors"
    export_main([str(ternary), str(out)])
    trained, recipe, step = load_trained_model(ternary)
    assert step == 8
    model_cfg = effective_model_config(recipe)
    frozen = build_model(model_cfg, linears=falcon_h1_linear_spec(recipe.bitnet, model_cfg.kernel_backend),
                         initialize=False).eval()
    load_frozen_bitnet(frozen, str(out))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(frozen(ids), trained(ids))
    dense_size = sum(p.numel() * 4 for p in trained.parameters())
    assert out.stat().st_size < 0.75 * dense_size  # mixer/MLP weights at 2 bits each


def test_checkpoint_saved_at_tp2_resumes_at_tp1(tmp_path, reference_run):
    tp2 = _write_recipe(tmp_path, "reshard", "train.max_steps=12", "train.save_interval=6",
                        "train.exit_after_steps=6", "parallel.tp=2")
    _worker(tp2, nproc=2)
    assert (tmp_path / "reshard" / "checkpoints" / "iter_0000006").is_dir()
    tp1 = _write_recipe(tmp_path, "reshard", "train.max_steps=12", "train.save_interval=6", "parallel.tp=1")
    out = _worker(tp1)
    assert "finished 12 steps" in out.stdout
    losses = _losses(tmp_path / "reshard")
    assert sorted(losses) == list(range(1, 13))
    for step in range(7, 13):  # continued at TP=1 from the TP=2 weights and optimizer state
        assert abs(losses[step] - reference_run[step]) <= 1e-3 * reference_run[step], step


@pytest.mark.slow  # test_sft.py checks the same load_dir path on chat data in CI
def test_fine_tune_from_hf_or_run_dir_starts_from_those_weights(tracked_runs, tmp_path, megatron_single):
    import falcon_h1
    from recipes.api import load_trained_model

    dense, _ = tracked_runs
    trained, _, _ = load_trained_model(dense)
    falcon_h1.to_hf(trained, tmp_path / "hf")
    first = {}
    for name, source in (("from_hf", tmp_path / "hf"), ("from_run", dense)):
        _worker(_write_recipe(tmp_path, name, "train.max_steps=3", "train.save_interval=0",
                              f"train.load_dir={source}"))
        first[name] = _losses(tmp_path / name)[1]
    random_init = _losses(dense)[1]
    assert first["from_hf"] < random_init - 0.5  # trained weights, not a fresh init
    assert abs(first["from_hf"] - first["from_run"]) <= 1e-6 * first["from_run"]


def test_resume_false_refuses_to_overwrite(tracked_runs, tmp_path):
    dense, _ = tracked_runs
    recipe = compose_recipe(COMMON + [f"train.run_dir={dense}", "train.resume=false", "train.max_steps=9"])
    path = tmp_path / "r.yaml"
    path.write_text(recipe_to_yaml(recipe))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", "recipes.worker", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "train.resume = false" in proc.stderr
    assert sorted(_losses(dense)) == list(range(1, 9))  # nothing written


@pytest.mark.parametrize("optimizer, nproc", [
    ("plain", 1),
    pytest.param("distributed", 1, marks=pytest.mark.slow),  # dp2 runs the same optimizer, sharded
    ("distributed", 2)], ids=["plain", "distributed", "distributed_dp2"])
def test_bf16_run_with_fp32_ssm_parameters_saves_and_resumes_identically(tmp_path, optimizer, nproc):
    # A bf16 model keeps A_log, D and dt_bias in fp32. Megatron's bf16 optimizer numbered its
    # checkpoint state by its bf16 parameters alone and could not save such a model (the state of
    # one parameter was paired with another's shape); the distributed optimizer tracks fp32
    # parameters separately. Reference: the same run straight through, in this process too.
    common = ["train.precision=bf16", "train.max_steps=4", f"parallel.distributed_optimizer={optimizer == 'distributed'}"]
    # at DP=2 the distributed optimizer shards each mixed-dtype group over the two ranks
    straight = _write_recipe(tmp_path, "straight", *common, "train.save_interval=0")
    _worker(straight, nproc)
    stopped = _write_recipe(tmp_path, "stopped", *common, "train.save_interval=2", "train.exit_after_steps=2")
    _worker(stopped, nproc)
    resumed = _write_recipe(tmp_path, "stopped", *common, "train.save_interval=2")
    assert "finished 4 steps" in _worker(resumed, nproc).stdout
    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "straight")  # bit-identical continuation
