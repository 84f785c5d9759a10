"""train.cuda_graph on a GPU, end to end through train(): the tiny model trained eagerly and with
Megatron's full-iteration CUDA graph (2 eager steps, capture at step 3, replays after) follows
the same loss curve, the replayed steps are not slower, the metrics report each step's own time
(the capture step included), and a graphed run checkpoints and resumes. Skipped without CUDA.

Loss bound: a replay launches the kernels the eager step launches, on the same weights and the
same batch. Step 1 (eager in both runs, same initial weights and batch) agrees to rounding. Later
steps may differ by the order of atomically accumulated fp32 gradient sums (flash-attention's dq,
the SSD scan's backward): about 1e-7 of a gradient, which Adam's m/sqrt(v) amplifies only in
near-zero gradients, whose weights barely move the loss; 1e-3 relative over 8 steps leaves a wide
margin for that (the test prints the largest gap, to tighten the bound on). A broken capture moves
the loss by far more: a replay reading a stale batch or stale weights, or gradients accumulated
across steps, bends the curve by percents within a few steps (checked below: the eager loss falls
by more than 10x the bound over the replayed steps)."""

import json
import math
import statistics

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS, WARMUP = 8, 2
CAPTURE_STEP = WARMUP + 1
GLOBAL_BATCH, SEQ = 16, 256
LOSS_RTOL = 1e-3
GRAD_NORM_RTOL = 1e-2
COMMON = ["logger=none", f"data.seq_length={SEQ}", "train.precision=bf16", f"train.max_steps={STEPS}",
          "train.micro_batch_size=8", f"train.global_batch_size={GLOBAL_BATCH}",  # 2 micro-batches a step
          "train.warmup_steps=2", "train.log_interval=1", f"train.cuda_graph_warmup_steps={WARMUP}"]


def _train(run_dir, *overrides):
    from recipes.api import compose_recipe
    from recipes.training import train

    return train(compose_recipe(COMMON + [f"train.run_dir={run_dir}", *overrides]))


def _metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows if "loss" in row}


def _relative_gaps(reference: list[float], other: list[float]) -> list[float]:
    return [abs(b - a) / abs(a) for a, b in zip(reference, other)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_graph")
    eager = _train(tmp / "eager", "train.cuda_graph=false", "train.save_interval=0")
    graphed = _train(tmp / "graphed", "train.cuda_graph=true", "train.save_interval=0")
    return tmp, eager, graphed


def test_graphed_run_follows_the_eager_loss_curve(runs):
    tmp, eager, graphed = runs
    gaps = _relative_gaps(eager.losses, graphed.losses)
    eager_norms = [row["grad_norm"] for _, row in sorted(_metrics(tmp / "eager").items())]
    graph_norms = [row["grad_norm"] for _, row in sorted(_metrics(tmp / "graphed").items())]
    norm_gaps = _relative_gaps(eager_norms, graph_norms)
    print("\nstep  eager loss  graphed loss  gap       eager |g|  graphed |g|  gap")
    for step in range(1, STEPS + 1):
        i = step - 1
        print(f"{step:4d}  {eager.losses[i]:.6f}  {graphed.losses[i]:.6f}    {gaps[i]:.2e}  {eager_norms[i]:.5f}"
              f"    {graph_norms[i]:.5f}     {norm_gaps[i]:.2e}{'   <- capture' if step == CAPTURE_STEP else ''}")
    assert eager.cuda_graph_step is None
    assert graphed.cuda_graph_step == CAPTURE_STEP  # the wrapper did capture, at the step expected
    assert len(eager.losses) == len(graphed.losses) == STEPS
    assert all(math.isfinite(v) for v in eager.losses + graphed.losses)
    assert gaps[0] <= 1e-6, "step 1 (eager in both, same weights and batch) should agree to rounding"
    assert max(gaps) <= LOSS_RTOL, f"max relative gap {max(gaps):.2e}"
    # Adam hardly sees the gradients' scale, so the loss would hide gradients counted twice or
    # not reduced; their norm (before clipping) shows that as a factor, far outside 1e-2.
    assert max(norm_gaps) <= GRAD_NORM_RTOL, f"max relative grad-norm gap {max(norm_gaps):.2e}"
    # The bound can tell a stale replay apart: over the replayed steps the loss moves by far more.
    assert eager.losses[CAPTURE_STEP - 1] - eager.losses[-1] > 10 * LOSS_RTOL * eager.losses[-1]


def test_replayed_steps_are_not_slower_and_each_step_reports_its_own_time(runs):
    tmp, eager, graphed = runs
    eager_rows, graph_rows = _metrics(tmp / "eager"), _metrics(tmp / "graphed")
    assert sorted(eager_rows) == sorted(graph_rows) == list(range(1, STEPS + 1))
    print("\nstep  eager s/step  tokens/s    graphed s/step  tokens/s")
    for step in range(1, STEPS + 1):
        e, g = eager_rows[step], graph_rows[step]
        note = ("   (eager warm-up)" if step < CAPTURE_STEP
                else "   <- capture + first replay" if step == CAPTURE_STEP else "")
        print(f"{step:4d}  {e['step_time_s']:.4f}  {e['tokens_per_s']:10.0f}    {g['step_time_s']:.4f}"
              f"  {g['tokens_per_s']:10.0f}{note}")
    for row in list(eager_rows.values()) + list(graph_rows.values()):  # tokens/s is this step's own
        assert row["tokens_per_s"] * row["step_time_s"] == pytest.approx(GLOBAL_BATCH * SEQ, rel=1e-9)
    replayed = range(CAPTURE_STEP + 1, STEPS + 1)
    eager_s = statistics.median(eager_rows[s]["step_time_s"] for s in replayed)
    graph_s = statistics.median(graph_rows[s]["step_time_s"] for s in replayed)
    print(f"median over steps {replayed.start}-{STEPS}: eager {eager_s * 1e3:.2f} ms, graphed {graph_s * 1e3:.2f} ms "
          f"({eager_s / graph_s:.2f}x); capture step {graph_rows[CAPTURE_STEP]['step_time_s'] * 1e3:.1f} ms; "
          f"summary tokens/s (last step) eager {eager.tokens_per_s:.0f}, graphed {graphed.tokens_per_s:.0f}")
    assert graph_s <= eager_s
    # The capture step is logged as it ran (capture + replay), not smoothed into the replays.
    assert graph_rows[CAPTURE_STEP]["step_time_s"] > max(graph_rows[s]["step_time_s"] for s in replayed)


def test_graphed_run_checkpoints_and_resumes(runs, tmp_path):
    from megatron.core import dist_checkpointing

    from recipes.checkpointing import _rng_state_sharded_object, checkpoint_dir

    _, _, graphed = runs
    run_dir = tmp_path / "resumed"
    first = _train(run_dir, "train.cuda_graph=true", "train.save_interval=4", "train.exit_after_steps=4")
    assert (first.steps, first.cuda_graph_step) == (4, CAPTURE_STEP)
    # The checkpoint holds the RNG tracker's states as byte tensors, like an eager run's, not the
    # graph's CUDA generator objects (which could not be unpickled on a host without a GPU).
    saved = dist_checkpointing.load({"rng_state": _rng_state_sharded_object(None)},
                                    str(checkpoint_dir(run_dir / "checkpoints", 4)))
    tracker_states = saved["rng_state"][0]["rng_tracker_states"]
    assert tracker_states and all(type(s) is torch.Tensor for s in tracker_states.values()), tracker_states

    second = _train(run_dir, "train.cuda_graph=true", "train.save_interval=4")
    assert (second.resumed_from, second.steps) == (4, STEPS)
    assert second.cuda_graph_step == 4 + CAPTURE_STEP  # warm-up counts again in a new process
    resumed = first.losses + second.losses
    gaps = _relative_gaps(graphed.losses, resumed)
    print("\nuninterrupted graphed run:", [f"{v:.5f}" for v in graphed.losses])
    print("stopped at 4 and resumed: ", [f"{v:.5f}" for v in resumed], f"max gap {max(gaps):.2e}")
    assert len(resumed) == STEPS and max(gaps) <= LOSS_RTOL
