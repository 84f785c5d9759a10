"""train.profile_step_start / profile_step_end: torch's profiler over a window of training steps,
through train() on CPU (and with the CUDA graph on a GPU), and the settings it refuses."""

import json

import pytest
import torch

from falcon_h1.errors import ConfigValueError
from recipes.api import compose_recipe
from recipes.build import validate_recipe

COMMON = ["model=falcon_h1_micro", "model.vocab_size=320", "logger=none", "data.seq_length=64",
          "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_steps=2", "train.log_interval=1"]


def _train(run_dir, *overrides):
    from recipes.training import train

    return train(compose_recipe(COMMON + [f"train.run_dir={run_dir}", *overrides]))


def _step_times(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["step_time_s"] for row in rows if "step_time_s" in row}


def _header_times(table: str) -> list[float]:
    line = next(line for line in table.splitlines() if line.startswith("step wall times (ms): "))
    return [float(ms) / 1e3 for ms in line.split(": ", 1)[1].split(", ")]


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("profiled") / "run"
    summary = _train(run_dir, "train.max_steps=4", "train.save_interval=2", "train.profile_step_start=2",
                     "train.profile_step_end=3")
    return run_dir, summary


def test_the_window_writes_a_table_and_a_trace_of_the_model_s_ops(profiled_run):
    run_dir, summary = profiled_run
    table = (run_dir / "profile" / "kernels_rank0.txt").read_text()
    assert table.startswith("steps 2..3: ")
    # The layers' projections are matrix products: the ops table must hold them.
    assert "aten::mm" in table or "aten::addmm" in table
    traces = list((run_dir / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("name") in ("aten::mm", "aten::addmm") for e in events)
    assert "steps 2..3" in summary.profile and str(run_dir / "profile") in summary.profile
    assert f"profile:     {summary.profile}" in summary.report()


def test_the_profiled_steps_wall_times_are_the_steps_the_metrics_log(profiled_run):
    run_dir, _ = profiled_run
    logged = _step_times(run_dir)
    profiled = _header_times((run_dir / "profile" / "kernels_rank0.txt").read_text())
    assert len(profiled) == 2
    for step, wall in zip((2, 3), profiled):
        assert wall == pytest.approx(logged[step], rel=0.15, abs=0.02)


def test_a_run_resumed_past_the_window_says_it_profiled_nothing(profiled_run):
    run_dir, _ = profiled_run
    for trace in (run_dir / "profile").iterdir():
        trace.unlink()
    summary = _train(run_dir, "train.max_steps=6", "train.save_interval=2", "train.profile_step_start=2",
                     "train.profile_step_end=3")
    assert summary.profile.startswith("none: this run resumed after step 4")
    assert not any((run_dir / "profile").iterdir())


@pytest.mark.parametrize("overrides, field", [
    (["train.profile_step_start=3", "train.profile_step_end=2"], "train.profile_step_end = 2"),
    (["train.profile_step_start=3", "train.profile_step_end=9", "train.max_steps=8"], "train.profile_step_end = 9"),
    (["train.profile_step_end=2"], "train.profile_step_end = 2"),
    (["train.profile_step_start=-1"], "train.profile_step_start = -1"),
    # step 3 is the capture of a graph after 2 eager steps
    (["train.cuda_graph=true", "train.cuda_graph_warmup_steps=2", "train.profile_step_start=3",
      "train.profile_step_end=4"], "train.profile_step_start = 3"),
])
def test_a_window_the_run_cannot_profile_is_refused_naming_the_field(overrides, field):
    recipe = compose_recipe(COMMON + ["train.max_steps=8", *overrides])
    with pytest.raises(ConfigValueError, match=field.replace(".", r"\.") + " is"):
        validate_recipe(recipe)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replayed_cuda_graph_steps_show_their_kernels(tmp_path):
    run_dir = tmp_path / "graphed"
    _train(run_dir, "train.precision=bf16", "train.max_steps=6", "train.save_interval=0", "train.cuda_graph=true",
           "train.cuda_graph_warmup_steps=2", "train.profile_step_start=4", "train.profile_step_end=5")
    table = (run_dir / "profile" / "kernels_rank0.txt").read_text()
    header = table.splitlines()[0]
    assert header.startswith("steps 4..5: ") and "device busy" in header
    busy_ms = float(header.split("summed over streams) ")[1].split(" ms")[0])
    wall_ms = float(header.split("wall ")[1].split(" ms")[0])
    assert 0 < busy_ms < 1.5 * wall_ms
