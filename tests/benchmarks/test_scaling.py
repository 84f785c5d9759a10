"""benchmarks/scaling.py on CPU. End to end: the driver launches falcon-train's worker at 1 and
2 gloo processes (DP=2, tiny model) and the efficiency it reports equals the one computed here
from the runs' metrics.jsonl and config.yaml. Recipes: the TP=1 / TP=2 / weak recipe files the
driver writes differ only where they should. By hand: the summarizer on metrics files whose
efficiencies are known exactly (0.8), and its refusals."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SCALING = REPO / "benchmarks" / "scaling.py"
WARMUP = 2
SEQ, DP_MICRO = 64, 2
TINY = ["--precision", "fp32", "--dp-model", "falcon_h1_tiny", "--dp-seq", str(SEQ), "--dp-micro-batch", str(DP_MICRO),
        "--tp-model", "falcon_h1_tiny", "--tp-layers", "2", "--tp-seq", str(SEQ), "--tp-micro-batch", "2",
        "--tp-global-batch", "4"]


def _scaling_module():
    spec = importlib.util.spec_from_file_location("scaling_driver", SCALING)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


scaling = _scaling_module()


# ------------------------------------------------------------------ end to end on CPU


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The driver in this process (its imports are shared with the other tests), the workers
    under torchrun on CPU, one thread each."""
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out")
    args = ["run", "--work", str(work), "--out", str(out), "--cases", "dp1,dp2", "--steps", "5",
            "--warmup", str(WARMUP), "--data-cache", str(tmp_path_factory.mktemp("cache")), *TINY]
    saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    os.environ.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = scaling.main(args)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    logs = "".join(p.read_text()[-3000:] for p in sorted(work.glob("*.log")))
    assert code == 0, printed.getvalue() + logs
    return work, json.loads((out / "scaling.json").read_text()), printed.getvalue()


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["step"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    return rows


def _median(values: list[float]) -> float:
    ordered, mid = sorted(values), len(values) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_dp_runs_are_the_recipes_asked_for(suite):
    work, _, _ = suite
    dp1, dp2 = _config(work / "dp1"), _config(work / "dp2")
    assert (dp1["train"]["global_batch_size"], dp2["train"]["global_batch_size"]) == (DP_MICRO, 2 * DP_MICRO)
    assert dp1["train"]["micro_batch_size"] == dp2["train"]["micro_batch_size"] == DP_MICRO
    assert dp1["model"]["name"] == "falcon_h1_tiny" and dp1["data"]["seq_length"] == SEQ
    for name, config in (("dp1", dp1), ("dp2", dp2)):
        assert config["train"]["save_interval"] == 0 and not config["logger"]["wandb"]
        assert not (work / name / "checkpoints").exists()


def test_dp_efficiency_equals_the_metrics(suite):
    work, result, stdout = suite
    one = DP_MICRO * SEQ / _median([r["step_time_s"] for r in _rows(work / "dp1")[WARMUP:]])
    two = 2 * DP_MICRO * SEQ / _median([r["step_time_s"] for r in _rows(work / "dp2")[WARMUP:]])
    expected = two / (2 * one)
    assert result["efficiency"]["dp"]["value"] == pytest.approx(expected, rel=1e-12)
    assert result["runs"]["dp2"]["tokens_per_s"] == pytest.approx(two, rel=1e-12)
    assert result["runs"]["dp2"]["tokens_per_s_per_gpu"] == pytest.approx(two / 2, rel=1e-12)
    assert f"DP {100 * expected:.1f}%" in stdout


def test_peak_memory_and_flops_are_read_from_the_metrics(suite):
    work, result, _ = suite
    for name in ("dp1", "dp2"):
        rows = _rows(work / name)
        assert result["runs"][name]["peak_mem_gib"] == max(r["peak_mem_gib"] for r in rows)
        measured = rows[WARMUP:]
        median = _median([r["step_time_s"] for r in measured])
        # tflops x step time is the step's model FLOPs a GPU: the same on every step.
        work_per_step = [r["tflops"] * r["step_time_s"] for r in measured]
        assert max(work_per_step) == pytest.approx(min(work_per_step), rel=1e-9)
        assert result["runs"][name]["tflops_per_gpu"] == pytest.approx(work_per_step[0] / median, rel=1e-9)
        assert result["runs"][name]["mfu"] is None  # CPU: no peak FLOP/s to compare with


def _differences(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set(a) | set(b)
    found = set()
    for key in keys:
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            found |= _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            found.add(f"{prefix}{key}")
    return found


def test_scaled_recipes_differ_from_their_baseline_only_where_they_should(tmp_path, capsys):
    assert scaling.main(["run", "--work", str(tmp_path), "--dryrun", *TINY]) == 0
    assert "--nproc_per_node=2 -m recipes.worker" in capsys.readouterr().out
    recipe = {name: yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
              for name in ("dp1", "dp2", "tp1", "tp2", "tp2_weak")}
    launch = {"executor.nproc_per_node", "train.run_dir"}
    assert _differences(recipe["dp1"], recipe["dp2"]) == launch | {"train.global_batch_size"}
    assert _differences(recipe["tp1"], recipe["tp2"]) == launch | {"parallel.tp"}
    assert _differences(recipe["tp2"], recipe["tp2_weak"]) == {"train.run_dir", "model.num_hidden_layers"}
    assert recipe["tp2_weak"]["model"]["num_hidden_layers"] == 2 * recipe["tp2"]["model"]["num_hidden_layers"] == 4
    assert recipe["tp2"]["parallel"]["sequence_parallel"] and recipe["tp2"]["parallel"]["tp"] == 2
    assert recipe["dp2"]["train"]["global_batch_size"] == 2 * recipe["dp1"]["train"]["global_batch_size"]


# ------------------------------------------------------------------ by hand


def _fake_run(work: Path, name: str, gpus: int, global_batch: int, step_times: list[float],
              flops_per_step_per_gpu: float = 1e12, status: str = "ok") -> dict:
    run_dir = work / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"train": {"global_batch_size": global_batch}, "data": {"seq_length": 4096}}))
    tokens = global_batch * 4096
    rows = [{"step": i + 1, "loss": 10.0, "tokens_per_s": tokens / t, "step_time_s": t,
             "tflops": flops_per_step_per_gpu / t / 1e12, "mfu": flops_per_step_per_gpu / t / 989e12,
             "peak_mem_gib": 10.0 + min(i, 3), "time": 0.0} for i, t in enumerate(step_times)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": name, "group": name[:2], "gpus": gpus, "description": name, "overrides": [],
            "status": status, "returncode": 0, "wall_s": 1.0}


def _manifest(work: Path, cases: list[dict]) -> None:
    (work / "scaling_cases.json").write_text(json.dumps({"warmup": 2, "cases": cases}))


def test_summary_by_hand(tmp_path, capsys):
    # Medians after 2 warm-up steps: 1.0, 1.25, 2.0, 1.25, 2.0 s (skipping 1 or 3 steps would
    # give 1.1, 1.3, 2.1, 1.3, 2.1 s; their means are 1.075, 1.375, 2.175, 1.375, 2.175 s).
    _manifest(tmp_path, [
        _fake_run(tmp_path, "dp1", 1, 2, [9.0, 3.0, 0.9, 1.1, 1.5, 0.8]),
        _fake_run(tmp_path, "dp2", 2, 4, [9.0, 3.0, 1.2, 1.3, 1.9, 1.1]),
        _fake_run(tmp_path, "tp1", 1, 1, [9.0, 3.0, 1.9, 2.1, 2.9, 1.8], flops_per_step_per_gpu=100e12),
        _fake_run(tmp_path, "tp2", 2, 1, [9.0, 3.0, 1.2, 1.3, 1.9, 1.1], flops_per_step_per_gpu=50e12),
        _fake_run(tmp_path, "tp2_weak", 2, 1, [9.0, 3.0, 1.9, 2.1, 2.9, 1.8], flops_per_step_per_gpu=80e12),
    ])
    result = scaling.summarize(tmp_path, tmp_path / "out")
    eff = {kind: e["value"] for kind, e in result["efficiency"].items()}
    # DP: (16384 / 1.25) / (2 x 8192 / 1.0); TP strong: (4096 / 1.25) / (2 x 4096 / 2.0);
    # TP weak: (80 / 2.0) / (100 / 2.0) TFLOP/s a GPU.
    assert eff == pytest.approx({"dp": 0.8, "tp_strong": 0.8, "tp_weak": 0.8}, rel=1e-12)
    assert result["runs"]["dp2"]["tokens_per_s"] == pytest.approx(13107.2, rel=1e-12)
    assert result["runs"]["tp1"]["mfu"] == pytest.approx(50 / 989, rel=1e-12)
    assert result["runs"]["tp1"]["peak_mem_gib"] == 13.0
    table = capsys.readouterr().out
    assert "| dp2: dp2 | 2 | 13,107 | 6,554 | 1250.0 | DP 80.0% | 13.0 | 0.1% |" in table
    assert json.loads((tmp_path / "out" / "scaling.json").read_text())["efficiency"] == result["efficiency"]


def test_failed_run_and_unequal_batches_are_shown(tmp_path, capsys):
    (tmp_path / "dp2.log").write_text("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory\n")
    _manifest(tmp_path, [
        _fake_run(tmp_path, "dp1", 1, 2, [3.0, 2.0, 1.0, 1.0, 1.0]),
        _fake_run(tmp_path, "dp2", 2, 4, [3.0, 2.0, 1.0, 1.0, 1.0], status="failed"),
        _fake_run(tmp_path, "tp1", 1, 1, [3.0, 2.0, 1.0, 1.0, 1.0]),
        _fake_run(tmp_path, "tp2", 2, 2, [3.0, 2.0, 1.0, 1.0, 1.0]),  # global batch differs
    ])
    result = scaling.summarize(tmp_path)
    out = capsys.readouterr().out
    assert "dp" not in result["efficiency"]
    assert "| dp2: dp2 | 2 | failed |" in out and "CUDA out of memory" in out
    assert result["efficiency"]["tp_strong"]["comparable"] is False
    assert "TP strong 100.0% (batch differs!)" in out


def test_refusals_name_the_setting(tmp_path):
    rows = [{"step": s, "tokens_per_s": 4096.0, "step_time_s": 1.0} for s in (1, 2, 3)]
    with pytest.raises(scaling.ScalingError, match="warmup = 3 skips all 3 logged steps"):
        scaling.summarize_run(rows, 4096, 1, warmup=3)
    with pytest.raises(scaling.ScalingError, match="config.yaml gives 8192"):
        scaling.summarize_run(rows, 8192, 1, warmup=1)
    args = scaling._parser().parse_args(["run", "--work", str(tmp_path), "--cases", "dp1,dp4"])
    with pytest.raises(scaling.ScalingError, match=r"--cases = 'dp1,dp4' names \['dp4'\]; allowed: dp1, dp2"):
        scaling.plan_cases(args)
    assert scaling.main(["run", "--work", str(tmp_path), "--steps", "5", "--warmup", "3"]) == 2


def test_cuda_graph_capture_step_is_never_timed(tmp_path, capsys):
    from recipes.config import TrainConfig

    if "cuda_graph" not in TrainConfig.__dataclass_fields__:
        pytest.skip("recipes.config.TrainConfig has no cuda_graph field in this tree")
    args = ["run", "--work", str(tmp_path), "--cases", "dp1", "--dp-model", "falcon_h1_tiny", "--dp-seq", "64",
            "--precision", "fp32", "--steps", "6", "--cuda-graph"]
    assert scaling.main([*args, "--warmup", "2"]) == 2
    assert "--warmup = 2 would time the CUDA graph's capture step (step 3)" in capsys.readouterr().err
    assert not (tmp_path / "dp1").exists()  # refused before anything was launched
