"""The training loop on Megatron Core: DDP, optimizer, lr schedule, the pipeline
schedule from `get_forward_backward_func`, dist checkpoints, metrics.

`train(recipe)` runs on every rank (single process, or under torchrun), in named phases:
`build_run_state` (validation, processes, model, DDP, optimizer, data, resume, tracking),
then per step `train_step` (one optimizer step) and `log_eval_save`, and `finish` (the
summary). With `train.cuda_graph` the schedule's forward + backward + gradient all-reduce is
Megatron's full-iteration CUDA graph after `train.cuda_graph_warmup_steps` eager steps
(`falcon_h1.megatron_compat.cuda_graph`); the optimizer step, loss readout and evaluation
stay eager.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from falcon_h1.config import FalconH1Config
from falcon_h1.errors import ConfigValueError
from recipes.config import RecipeConfig
from recipes.run_summary import TrainSummary, tracking_lines


@dataclass
class RunState:
    """Everything one training run holds from its first step to its last."""

    recipe: RecipeConfig
    model_cfg: FalconH1Config
    model: Any  # the model itself, inside ddp_model
    ddp_model: Any
    optimizer: Any
    scheduler: Any
    data_iter: Any
    valid_ds: Any
    run_lock: Any  # this run's hold on its run_dir (recipes.run_lock)
    progress: Any
    device: torch.device
    world: int
    dp: int
    dp_rank: int
    num_microbatches: int
    run_dir: Path
    ckpt_root: Path
    start_step: int
    consumed: int
    resumed_from: Optional[int]
    flops_per_token: float
    peak_flops: float
    graph_stream: Any  # the CUDA graph's capture stream, None for an eager run
    tracker: Any = None  # started once the run is known to have steps to do
    packed_rows: bool = False  # chat rows holding several conversations: the model reads their position_ids
    data_report: list[str] = field(default_factory=list)
    heldout_examples: Optional[list] = None  # data.heldout's questions, tokenized (recipes.heldout_eval)
    pad_id: int = 0
    heldout: list[tuple[int, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    tokens_per_s: float = 0.0
    cuda_graph_step: Optional[int] = None
    zero_gradient_step: Optional[int] = None  # the first step whose gradient norm was exactly 0 (warned)


@dataclass
class StepResult:
    loss: float
    grad_norm: Any
    elapsed: float


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ---------------------------------------------------------------------------------- the loop
def train(recipe: RecipeConfig) -> TrainSummary:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from recipes.build import UNCHECKPOINTED_OFFLOAD
    from recipes.generate import sample_after_training
    from recipes.profiling import StepProfiler
    from recipes.resume import finished_run
    from recipes.stop_signals import StoppedBySignal, stop_on_signals

    t = recipe.train
    state = build_run_state(recipe)
    if state.start_step >= t.max_steps:  # a rerun of a finished run: say so, change nothing
        from recipes.tracking import wandb_destination

        state.run_lock.release()
        wandb = wandb_destination(recipe.logger, state.run_dir)
        return TrainSummary(**finished_run(state.run_dir, state.start_step, t.max_steps, _rank()),
                            tracking=tracking_lines(recipe.logger, str(state.run_dir), wandb and wandb.mode))
    state.tracker = _start_tracking(state)
    state.ddp_model.train()
    stopped = None
    unsaved = UNCHECKPOINTED_OFFLOAD if t.optimizer_offload_fraction else None  # why a stop saves nothing
    profiler = StepProfiler(t, state.run_dir, _rank(), state.start_step + 1)
    with state.run_lock, state.progress, state.tracker, stop_on_signals() as stop, \
            _training_schedule(get_forward_backward_func(), t) as fwd_bwd, profiler:
        score_heldout_questions(state, state.start_step)
        for step in range(state.start_step, t.max_steps):
            profiler.before_step(step + 1)
            result = train_step(state, fwd_bwd, step)
            profiler.after_step(step + 1)
            signum = stop.agreed(state.device)
            if log_eval_save(state, step + 1, result, save_now=signum is not None and not unsaved):
                break
            if signum is not None:
                stopped = StoppedBySignal(signum, step + 1, str(state.ckpt_root), str(state.run_dir), unsaved)
                break
        score_heldout_questions(state, state.start_step + len(state.losses))
        profiler.close()  # a loop that stopped before profile_step_end writes what it profiled
        summary = finish(state)
        summary.profile = profiler.notice
    if stopped is not None:
        if _rank() == 0:
            print(f"falcon-train: {stopped.message()}", flush=True)
        raise stopped
    summary.sample = sample_after_training(state.model, recipe)
    return summary


# ------------------------------------------------------------------------ build the run state
def build_run_state(recipe: RecipeConfig) -> RunState:
    """Validate, join the processes, lock the run directory, build model, DDP, optimizer and
    data, and resume."""
    from megatron.core import parallel_state

    from falcon_h1.flops import training_flops_per_token
    from falcon_h1.megatron_compat.parallel import default_device
    from recipes.build import validate_gpu_settings, validate_recipe
    from recipes.checkpoint_files import has_checkpoints
    from recipes.data import build_tokenizer, make_data_iterator
    from recipes.data.validation import check_token_ids_fit
    from recipes.progress import Progress
    from recipes.resume import check_resume_config
    from recipes.run_lock import lock_run_dir

    logging.getLogger("megatron").setLevel(logging.WARNING)
    t, data_cfg = recipe.train, recipe.data
    checked = validate_recipe(recipe)  # config errors before any process group or file
    validate_gpu_settings(recipe, torch.cuda.is_available())
    world, dp = _init_processes(recipe)
    dp_rank = parallel_state.get_data_parallel_rank()
    run_dir = Path(t.run_dir)
    ckpt_root = run_dir / "checkpoints"
    run_lock = lock_run_dir(run_dir)  # released at the end of train()'s `with`
    if t.resume and has_checkpoints(ckpt_root):
        check_resume_config(recipe, run_dir)
    tokenizer = build_tokenizer(data_cfg.tokenizer)
    if tokenizer.vocab_size > checked.model_cfg.vocab_size:
        raise ConfigValueError(
            "model.vocab_size", checked.model_cfg.vocab_size, "model.vocab_size >= the tokenizer's vocabulary",
            message=f"data.tokenizer {data_cfg.tokenizer!r} has {tokenizer.vocab_size} tokens but model.vocab_size = "
                    f"{checked.model_cfg.vocab_size}; allowed: model.vocab_size >= the tokenizer's vocabulary.")
    check_token_ids_fit(data_cfg, checked.model_cfg.vocab_size)
    model, ddp_model, optimizer, scheduler, graph_stream = _build_model_and_optimizer(recipe, checked)

    global_batch = t.global_batch_size
    train_ds, valid_ds = _datasets(recipe, tokenizer)
    if t.eval_interval and valid_ds is None:
        raise ConfigValueError(
            "train.eval_interval", t.eval_interval, "a non-zero second share of data.split, or eval_interval 0",
            message=f"train.eval_interval = {t.eval_interval} needs a validation split, but data.split = "
                    f"{data_cfg.split!r} gives it none; allowed: a non-zero second share or eval_interval 0.")
    start_step, consumed, resumed_from = _resume(recipe, ckpt_root, model, ddp_model, optimizer, scheduler)

    device = default_device()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return RunState(
        recipe=recipe, model_cfg=checked.model_cfg, model=model, ddp_model=ddp_model, optimizer=optimizer,
        scheduler=scheduler,
        data_iter=_this_ranks_shards(make_data_iterator(train_ds, t.micro_batch_size, dp_rank, dp, consumed,
                                                        t.seed, data_cfg.num_workers), model),
        valid_ds=valid_ds, run_lock=run_lock,
        progress=Progress(t.max_steps, start_step, enabled=recipe.logger.progress_bar and _rank() == 0),
        device=device, world=world, dp=dp, dp_rank=dp_rank,
        num_microbatches=global_batch // (t.micro_batch_size * dp), run_dir=run_dir, ckpt_root=ckpt_root,
        start_step=start_step, consumed=consumed, resumed_from=resumed_from,
        flops_per_token=training_flops_per_token(checked.model_cfg, data_cfg.seq_length),
        peak_flops=_peak_flops(device), graph_stream=graph_stream,
        packed_rows=data_cfg.kind == "chat" and data_cfg.packing,
        data_report=train_ds.report.lines() if data_cfg.kind == "chat" else [],
        heldout_examples=_heldout_examples(data_cfg, tokenizer),
        pad_id=tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod)


def _datasets(recipe: RecipeConfig, tokenizer):
    """(train, valid) of data.kind: documents packed without boundaries for text, whole
    conversations per row with an assistant-only loss mask for chat; the same sample keys."""
    from recipes.data import build_chat_datasets, build_train_valid_datasets

    t, data_cfg = recipe.train, recipe.data
    build = build_chat_datasets if data_cfg.kind == "chat" else build_train_valid_datasets
    return build(data_cfg, data_cfg.seq_length, t.seed, t.max_steps * t.global_batch_size,
                 max(t.eval_iters, 1) * t.global_batch_size, tokenizer)


def _heldout_examples(data_cfg, tokenizer) -> Optional[list]:
    from recipes.heldout_eval import heldout_examples, read_heldout

    if data_cfg.heldout is None:
        return None
    return heldout_examples(tokenizer, read_heldout(data_cfg.heldout))


def _init_processes(recipe: RecipeConfig) -> tuple[int, int]:
    """torch.distributed + Megatron's parallel state; returns (world size, data-parallel size)."""
    from falcon_h1.megatron_compat.cuda_graph import use_graph_safe_rng_tracker
    from falcon_h1.megatron_compat.parallel import initialize_parallel
    from recipes.build import data_parallel_size, validate_parallel_layout

    p, t = recipe.parallel, recipe.train
    initialize_parallel(tp=p.tp, pp=p.pp, cp=p.cp, seed=t.seed)
    if t.cuda_graph:
        use_graph_safe_rng_tracker(t.seed)
    world = dist.get_world_size()
    validate_parallel_layout(recipe, world)
    return world, data_parallel_size(recipe, world)


def _build_model_and_optimizer(recipe: RecipeConfig, checked):
    """The model, its DDP wrapper, Megatron's optimizer and lr scheduler (and the CUDA graph's
    capture stream the DDP wrapper is built on, None for an eager run)."""
    from megatron.core.distributed import finalize_model_grads

    from falcon_h1.megatron_compat.cuda_graph import capture_stream, on_stream
    from recipes.build import build_model_for
    from recipes.optim import build_optimizer, wrap_model
    from recipes.schedules import build_scheduler

    p, t = recipe.parallel, recipe.train
    model = build_model_for(recipe, checked.model_cfg, sequence_parallel=p.sequence_parallel,
                            recompute=t.recompute, recompute_layers=t.recompute_layers,
                            seed=t.seed)
    if torch.cuda.is_available():
        _check_training_state_fits(model, p, t.optimizer_offload_fraction)
    transformer_config = model.config
    # Set before the DDP wrapper reads it: per-token loss means no 1/dp pre-scaling of the gradients.
    transformer_config.calculate_per_token_loss = True
    graph_stream = capture_stream() if t.cuda_graph else None
    with on_stream(graph_stream):  # DDP's grad-accumulator nodes record the stream they are made on
        ddp_model = wrap_model(model, p, t, transformer_config)
    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.no_sync_func = ddp_model.no_sync
    optimizer = build_optimizer([ddp_model], t, p, checked.schedule)
    scheduler = build_scheduler(optimizer, checked.schedule)
    return model, ddp_model, optimizer, scheduler, graph_stream


def _check_training_state_fits(model, parallel_cfg, offload_fraction: float = 0.0) -> None:
    from megatron.core import parallel_state

    from recipes.memory_budget import check_training_state_fits

    shards = (parallel_state.get_data_parallel_world_size(with_context_parallel=True)
              if parallel_cfg.distributed_optimizer else 1)
    free, total = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # torch's cache is free to reuse
    check_training_state_fits((p for p in model.parameters() if p.requires_grad), shards, free, total,
                              parallel_cfg.tp, parallel_cfg.pp, parallel_cfg.distributed_optimizer,
                              offload_fraction, _host_available_bytes() if offload_fraction else None,
                              int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux): what the host can give without swapping; None elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _resume(recipe: RecipeConfig, ckpt_root: Path, model, ddp_model, optimizer, scheduler):
    """Continue from run_dir's latest checkpoint, or start from train.load_dir's weights;
    returns (start step, consumed samples, the step resumed from or None)."""
    from recipes.checkpoint_files import has_checkpoints
    from recipes.checkpointing import load_latest_checkpoint

    t = recipe.train
    has_checkpoint = has_checkpoints(ckpt_root)
    if has_checkpoint and not t.resume:
        raise ConfigValueError(
            "train.resume", t.resume, "true (continue that run) or a new train.run_dir",
            message=f"train.resume = false but {ckpt_root} already holds checkpoints; allowed: "
                    "train.resume = true (continue that run) or a new train.run_dir (nothing is overwritten).")
    loaded = (load_latest_checkpoint(ckpt_root, [ddp_model], optimizer, scheduler, train_to_step=t.max_steps)
              if has_checkpoint else None)
    if loaded is not None:
        start_step, extra = loaded
        return start_step, extra["consumed_samples"], start_step
    if t.load_dir:
        _load_initial_weights(model, t.load_dir)
    return 0, 0, None


def _load_initial_weights(model, load_dir: str) -> None:
    """Start a new run from existing weights (fine-tuning): a Hugging Face FalconH1 directory
    (config.json + *.safetensors) or a falcon-train run / checkpoints directory (model only)."""
    from falcon_h1.hf import load_hf_weights
    from recipes.checkpointing import load_latest_checkpoint

    path = Path(load_dir)
    if (path / "config.json").is_file():
        _check_hf_config_agrees(model.cfg, path, load_dir)
        load_hf_weights(model, path)
        return
    ckpt_root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if load_latest_checkpoint(ckpt_root, [model], None, None) is None:
        raise ConfigValueError(
            "train.load_dir", load_dir, "a Hugging Face checkpoint or a falcon-train run directory",
            message=f"train.load_dir = {load_dir!r} holds neither a Hugging Face checkpoint "
                    "(config.json + *.safetensors) nor falcon-train checkpoints.")


def _check_hf_config_agrees(model_cfg: FalconH1Config, path: Path, load_dir: str) -> None:
    """Refuse a Hugging Face load_dir whose config.json computes differently from the recipe's
    model (multipliers, norms, RoPE): its weights would load and train as another model."""
    from falcon_h1.hf import compute_field_differences
    from recipes.api import override_value

    differences = compute_field_differences(model_cfg, path)
    if differences:
        name, ours, theirs = differences[0]
        listed = "; ".join(f"model.{n} = {a!r}, config.json {b!r}" for n, a, b in differences)
        overrides = " ".join(f"model.{n}={override_value(b)}" for n, _, b in differences)
        raise ConfigValueError(
            f"model.{name}", ours, f"{theirs!r}, config.json's value",
            message=f"train.load_dir = {load_dir!r}: its config.json disagrees with the recipe's model on what the "
                    f"weights compute ({listed}); the weights were trained with config.json's values. Allowed: the "
                    f"same values in the recipe (e.g. {overrides}), or the model= preset of that checkpoint.")


def _start_tracking(state: RunState):
    """run_dir/config.yaml + metadata.json and a metrics.jsonl a killed run left whole (rank 0),
    and the run's Tracker."""
    from recipes.resume import repair_metrics_log
    from recipes.run_metadata import write_run_metadata
    from recipes.tracking import Tracker

    recipe = state.recipe
    resolved = dataclasses.asdict(recipe)
    if _rank() == 0:
        write_run_metadata(state.run_dir, resolved)
        repair_metrics_log(state.run_dir)
    tags = [state.model_cfg.name, f"attention_ratio={recipe.model.attention_ratio}",
            f"bitnet={'on' if recipe.bitnet.enabled else 'off'}", f"executor={recipe.executor.kind}",
            f"tp={recipe.parallel.tp}", f"cp={recipe.parallel.cp}", f"dp={state.dp}"]
    return Tracker(str(state.run_dir), recipe.logger, resolved, tags, _rank())


# ------------------------------------------------------------------------- one training step
def train_step(state: RunState, fwd_bwd, step: int) -> StepResult:
    """One optimizer step over the global batch (`step` counts from 0)."""
    from falcon_h1.megatron_compat.cpu import cuda_as_cpu_without_gpu
    from falcon_h1.megatron_compat.cuda_graph import has_captured, on_stream
    from recipes.step_health import check_finite_step, megatron_gradient_check_names, warn_first_zero_gradient

    t, seq = state.recipe.train, state.recipe.data.seq_length
    started = time.perf_counter()
    state.ddp_model.zero_grad_buffer()
    state.optimizer.zero_grad()
    with cuda_as_cpu_without_gpu(), on_stream(state.graph_stream), \
            megatron_gradient_check_names(step + 1, state.ckpt_root):
        reduced = fwd_bwd(
            forward_step_func=partial(_forward_step, device=state.device, packed_rows=state.packed_rows),
            data_iterator=state.data_iter, model=[state.ddp_model], num_microbatches=state.num_microbatches,
            seq_length=seq, micro_batch_size=t.micro_batch_size, forward_only=False)
    if t.cuda_graph and state.cuda_graph_step is None and has_captured(fwd_bwd):
        state.cuda_graph_step = step + 1
    ok, grad_norm, _ = state.optimizer.step()
    state.skipped += 0 if ok else 1
    state.scheduler.step(increment=1)
    state.consumed += t.global_batch_size
    loss = _global_mean_loss(reduced)  # a replay rewrites the captured result tensors in place
    # Megatron's optimizer may leave the norm on the device (recipes.optim): read after every launch
    grad_norm = float(grad_norm) if grad_norm is not None else None
    check_finite_step(step + 1, loss, grad_norm, state.ckpt_root)
    state.zero_gradient_step = warn_first_zero_gradient(state.zero_gradient_step, step + 1, grad_norm,
                                                        t.grad_clip, _rank())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started  # the capture step's time includes the capture
    return StepResult(loss=loss, grad_norm=grad_norm, elapsed=elapsed)


def _forward_step(data_iterator, model, device, packed_rows: bool):
    """packed_rows: the rows hold several documents, which the model finds where position_ids
    restart. Other rows' positions are 0..s-1 (text; a chat row's one conversation, then filler
    it never attends to), which the model counts itself without a host check per step."""
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    positions = batch["position_ids"] if packed_rows else None
    per_token = model(batch["tokens"], position_ids=positions, labels=batch["labels"])
    return per_token, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of masked token losses and their count: Megatron divides by the global
    token count (calculate_per_token_loss), so any DP/microbatch split gives the same update."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}


def _this_ranks_shards(batches, model):
    """The batches as the model sees them: under context parallelism this rank's chunks of every
    sequence (tokens, labels, loss mask and positions alike); the data-parallel rank picks the
    samples, so the ranks of one context-parallel group read the same ones."""
    from falcon_h1.context_parallel import shard_batch

    layout = model.context_parallel
    return batches if layout is None else (shard_batch(batch, layout) for batch in batches)


def _global_mean_loss(reduced: list[dict]) -> float:
    """Token-weighted mean over this step's microbatches and the data x context-parallel group
    (each context-parallel rank holds part of every sequence's tokens)."""
    from megatron.core import parallel_state

    if not reduced:  # not the last pipeline stage
        totals = torch.zeros(2, dtype=torch.float64)
    else:
        totals = torch.stack([r["lm loss"].double().cpu() for r in reduced]).sum(0)
    if dist.is_initialized():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        totals = totals.to(device)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        totals = totals.cpu()
    return float(totals[0] / totals[1].clamp_min(1))


# ------------------------------------------------------------------------- log / eval / save
def log_eval_save(state: RunState, step: int, result: StepResult, save_now: bool = False) -> bool:
    """After step `step` (counting from 1): metrics, evaluation and checkpoint as the recipe asks
    (`save_now`: a checkpoint whatever the interval, before a stop on a signal); returns whether
    this process stops here (train.exit_after_steps)."""
    from recipes.checkpointing import save_checkpoint

    t, seq = state.recipe.train, state.recipe.data.seq_length
    state.tokens_per_s = t.global_batch_size * seq / result.elapsed
    achieved = state.tokens_per_s * state.flops_per_token
    metrics = {
        "loss": result.loss, "lr": state.optimizer.param_groups[0]["lr"],
        "grad_norm": float(result.grad_norm) if result.grad_norm is not None else float("nan"),
        "tokens_per_s": state.tokens_per_s, "tflops": achieved / 1e12 / state.world, "step_time_s": result.elapsed,
        "skipped_steps": state.skipped, "consumed_samples": state.consumed, "peak_mem_gib": _peak_memory_gib(),
    }
    if state.peak_flops:
        metrics["mfu"] = achieved / (state.peak_flops * state.world)
    state.losses.append(result.loss)
    if step % t.log_interval == 0 or step == state.start_step + 1:
        state.tracker.log(step, metrics)
    state.progress.update(step, loss=result.loss, tokens_per_s=state.tokens_per_s)
    if t.eval_interval and step % t.eval_interval == 0:
        state.tracker.log(step, {"val_loss": _evaluate(state)})
    stop_early = bool(t.exit_after_steps) and len(state.losses) >= t.exit_after_steps
    if save_now or t.save_interval and (step % t.save_interval == 0 or step == t.max_steps or stop_early):
        save_checkpoint(state.ckpt_root, step, [state.ddp_model], state.optimizer, state.scheduler,
                        {"consumed_samples": state.consumed}, keep=t.keep_checkpoints)
    return stop_early


@torch.no_grad()
def _evaluate(state: RunState) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from falcon_h1.megatron_compat.cpu import cuda_as_cpu_without_gpu
    from recipes.data import make_data_iterator

    t = state.recipe.train
    batches = make_data_iterator(state.valid_ds, t.micro_batch_size, state.dp_rank, state.dp, 0, t.seed)
    it = _this_ranks_shards(batches, state.model)
    state.ddp_model.eval()
    totals = []
    with cuda_as_cpu_without_gpu():
        for _ in range(t.eval_iters):
            totals += get_forward_backward_func()(
                forward_step_func=partial(_forward_step, device=state.device, packed_rows=state.packed_rows),
                data_iterator=it,
                model=[state.ddp_model], num_microbatches=state.num_microbatches,
                seq_length=state.recipe.data.seq_length, micro_batch_size=t.micro_batch_size, forward_only=True)
    state.ddp_model.train()
    return _global_mean_loss(totals)


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


def _peak_flops(device: torch.device) -> float:
    """Dense bf16 peak of the accelerator, for MFU; 0 where unknown (CPU)."""
    from falcon_h1.flops import dense_bf16_peak_flops

    return dense_bf16_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else 0.0


def score_heldout_questions(state: RunState, step: int) -> None:
    """data.heldout's greedy exact match and answer-token loss of the model after `step` steps
    (a collective over the model's tensor-parallel group: every rank computes it), kept for the
    summary and logged, except when a resumed run starts: the trackers' first record of a launch
    drops what an earlier launch logged from that step on, and step `start_step` holds the
    earlier launch's training metrics."""
    from recipes.heldout_eval import score_heldout

    if state.heldout_examples is None:
        return
    p = state.recipe.parallel
    score = score_heldout(state.model, state.heldout_examples, state.pad_id,
                          length_multiple=p.tp if p.sequence_parallel else 1)
    state.heldout.append((step, score))
    if step > state.start_step or step == 0:
        state.tracker.log(step, {"heldout_exact_match": score.exact_match, "heldout_loss": score.loss})


# ------------------------------------------------------------------------------- the summary
def finish(state: RunState) -> TrainSummary:
    """The run's summary, also logged to the trackers."""
    from recipes.resume import whole_run_first_loss

    losses = state.losses
    summary = TrainSummary(
        run_dir=str(state.run_dir), steps=state.start_step + len(losses),
        first_loss=whole_run_first_loss(state.run_dir, losses), final_loss=losses[-1] if losses else math.nan,
        losses=losses, tokens_per_s=state.tokens_per_s, checkpoint_dir=str(state.ckpt_root),
        resumed_from=state.resumed_from, cuda_graph_step=state.cuda_graph_step,
        loss_name="assistant-token loss" if state.recipe.data.kind == "chat" else "loss",
        data_report=state.data_report, heldout=state.heldout,
        tracking=tracking_lines(state.recipe.logger, str(state.run_dir), state.tracker.wandb_mode))
    state.tracker.log_summary({"first_loss": summary.first_loss, "final_loss": summary.final_loss,
                               "tokens_per_s": summary.tokens_per_s,
                               "steps": summary.steps,
                               **({"cuda_graph_step": state.cuda_graph_step} if state.cuda_graph_step else {})})
    return summary


@contextlib.contextmanager
def _training_schedule(forward_backward_func, train_cfg):
    """The training step's schedule: Megatron's as is, or wrapped in its full-iteration CUDA graph."""
    if not train_cfg.cuda_graph:
        yield forward_backward_func
        return
    from falcon_h1.megatron_compat.cuda_graph import full_iteration_graph

    with full_iteration_graph(forward_backward_func, train_cfg.cuda_graph_warmup_steps) as wrapper:
        yield wrapper
