"""The training loop on Megatron Core: DDP, optimizer, lr schedule, the pipeline
schedule from `get_forward_backward_func`, dist checkpoints, metrics.

`train(recipe)` runs on every rank (single process, or under torchrun). With
`train.cuda_graph` the schedule's forward + backward + gradient all-reduce is Megatron's
full-iteration CUDA graph after `train.cuda_graph_warmup_steps` eager steps (see the end
of this file); the optimizer step, loss readout and evaluation stay eager.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from recipes.config import RecipeConfig


@dataclass
class TrainSummary:
    run_dir: str
    steps: int
    first_loss: float
    final_loss: float
    losses: list[float]
    tokens_per_s: float
    checkpoint_dir: str
    resumed_from: Optional[int]
    # The step whose forward/backward was captured into the CUDA graph (replayed by every later
    # step); None for an eager run or one that ended before the capture.
    cuda_graph_step: Optional[int] = None
    # train.sample_tokens new tokens after train.sample_prompt, generated at the end; None if 0.
    sample: Optional[str] = None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of masked token losses and their count: Megatron divides by the global
    token count (calculate_per_token_loss), so any DP/microbatch split gives the same update."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}


def _forward_step(data_iterator, model, device):
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    per_token = model(batch["tokens"], position_ids=batch.get("position_ids"), labels=batch["labels"])
    return per_token, partial(_loss_func, batch["loss_mask"])


def _device_mode():
    """Megatron's schedules allocate counters on 'cuda'; on a CPU host read that as CPU."""
    from falcon_h1.compat import cuda_as_cpu

    return cuda_as_cpu() if not torch.cuda.is_available() else contextlib.nullcontext()


def train(recipe: RecipeConfig) -> TrainSummary:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from falcon_h1.compat import default_device, initialize_parallel
    from falcon_h1.flops import training_flops_per_token
    from bitnet.spec import falcon_h1_linear_spec
    from falcon_h1.model import build_model
    from recipes.build import (data_parallel_size, resolve_precision, validate_cuda_graph_device,
                               validate_parallel_layout, validate_recipe)
    from recipes.checkpoint_files import has_checkpoints
    from recipes.checkpointing import load_latest_checkpoint, save_checkpoint
    from recipes.data import build_tokenizer, build_train_valid_datasets, make_data_iterator
    from recipes.data.validation import check_token_ids_fit
    from recipes.optim import build_optimizer, wrap_model
    from recipes.progress import Progress
    from recipes.resume import check_resume_config, finished_run, repair_metrics_log, whole_run_first_loss
    from recipes.run_lock import lock_run_dir
    from recipes.run_metadata import write_run_metadata
    from recipes.schedules import build_scheduler
    from recipes.tracking import Tracker

    logging.getLogger("megatron").setLevel(logging.WARNING)
    p, t = recipe.parallel, recipe.train
    model_cfg = validate_recipe(recipe)  # config errors before any process group or file
    validate_cuda_graph_device(recipe, torch.cuda.is_available())
    initialize_parallel(tp=p.tp, pp=p.pp, seed=t.seed)
    if t.cuda_graph:
        _use_graph_safe_rng_tracker(t.seed)
    world = dist.get_world_size()
    validate_parallel_layout(recipe, world)
    dp = data_parallel_size(recipe, world)
    dp_rank = parallel_state.get_data_parallel_rank()
    device = default_device()
    precision = resolve_precision(t.precision)
    run_dir = Path(t.run_dir)
    ckpt_root = run_dir / "checkpoints"
    run_lock = lock_run_dir(run_dir)  # released at the end of the training `with` below
    if t.resume and has_checkpoints(ckpt_root):
        check_resume_config(recipe, run_dir)

    tokenizer = build_tokenizer(recipe.data.tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"data.tokenizer {recipe.data.tokenizer!r} has {tokenizer.vocab_size} tokens but model.vocab_size = "
            f"{model_cfg.vocab_size}; allowed: model.vocab_size >= the tokenizer's vocabulary.")
    check_token_ids_fit(recipe.data, model_cfg.vocab_size)

    if t.force_reference_kernels:
        model_cfg = dataclasses.replace(model_cfg, kernel_backend="reference")
    model = build_model(model_cfg, linears=falcon_h1_linear_spec(recipe.bitnet, model_cfg.kernel_backend),
                        sequence_parallel=p.sequence_parallel, precision=precision, recompute=t.recompute,
                        seed=t.seed)
    config = model.config
    # Set before the DDP wrapper reads it: per-token loss means no 1/dp pre-scaling of the gradients.
    config.calculate_per_token_loss = True
    graph_stream = _capture_stream() if t.cuda_graph else None
    with _on_stream(graph_stream):  # DDP's grad-accumulator nodes record the stream they are made on
        ddp_model = wrap_model(model, p, t, config)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    optimizer = build_optimizer([ddp_model], t, p)
    scheduler = build_scheduler(optimizer, t)

    micro, global_batch, seq = t.micro_batch_size, t.global_batch_size, recipe.data.seq_length
    num_microbatches = global_batch // (micro * dp)
    train_ds, valid_ds = build_train_valid_datasets(
        recipe.data, seq, t.seed, t.max_steps * global_batch, max(t.eval_iters, 1) * global_batch, tokenizer)

    if t.eval_interval and valid_ds is None:
        raise ValueError(f"train.eval_interval = {t.eval_interval} needs a validation split, but data.split = "
                         f"{recipe.data.split!r} gives it none; allowed: a non-zero second share or eval_interval 0.")
    start_step, consumed, resumed_from = 0, 0, None
    has_checkpoint = has_checkpoints(ckpt_root)
    if has_checkpoint and not t.resume:
        raise ValueError(f"train.resume = false but {ckpt_root} already holds checkpoints; allowed: "
                         "train.resume = true (continue that run) or a new train.run_dir (nothing is overwritten).")
    loaded = (load_latest_checkpoint(ckpt_root, [ddp_model], optimizer, scheduler, train_to_step=t.max_steps)
              if has_checkpoint else None)
    if loaded is not None:
        start_step, extra = loaded
        consumed, resumed_from = extra["consumed_samples"], start_step
    elif t.load_dir:
        _load_initial_weights(model, t.load_dir)
    if start_step >= t.max_steps:  # a rerun of a finished run: say so, change nothing
        run_lock.release()
        return TrainSummary(**finished_run(run_dir, start_step, t.max_steps, _rank()))
    resolved = dataclasses.asdict(recipe)
    if _rank() == 0:
        write_run_metadata(run_dir, resolved)
        repair_metrics_log(run_dir)
    tags = [model_cfg.name, f"attention_ratio={recipe.model.attention_ratio}",
            f"bitnet={'on' if recipe.bitnet.enabled else 'off'}", f"executor={recipe.executor.kind}",
            f"tp={p.tp}", f"dp={dp}"]
    tracker = Tracker(str(run_dir), recipe.logger, resolved, tags, _rank(), recipe.logger.wandb_run_name)

    data_iter = make_data_iterator(train_ds, micro, dp_rank, dp, consumed, t.seed, recipe.data.num_workers)
    flops_per_token = training_flops_per_token(model_cfg, seq)
    peak = _peak_flops(device)
    progress = Progress(t.max_steps, start_step, enabled=recipe.logger.progress_bar and _rank() == 0)
    losses: list[float] = []
    tokens_per_s = 0.0
    steps_this_run = 0
    skipped = 0
    cuda_graph_step = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ddp_model.train()
    with run_lock, progress, tracker, _training_schedule(get_forward_backward_func(), t) as fwd_bwd:
        for step in range(start_step, t.max_steps):
            started = time.perf_counter()
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            with _device_mode(), _on_stream(graph_stream):
                reduced = fwd_bwd(
                    forward_step_func=partial(_forward_step, device=device), data_iterator=data_iter,
                    model=[ddp_model], num_microbatches=num_microbatches, seq_length=seq,
                    micro_batch_size=micro, forward_only=False)
            if t.cuda_graph and cuda_graph_step is None and _captured_graph(fwd_bwd) is not None:
                cuda_graph_step = step + 1
            ok, grad_norm, _ = optimizer.step()
            skipped += 0 if ok else 1
            scheduler.step(increment=1)
            consumed += global_batch
            loss = _global_mean_loss(reduced)  # a replay rewrites the captured result tensors in place
            if t.cuda_graph:
                _check_finite_step(step + 1, loss, grad_norm)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started  # the capture step's time includes the capture
            tokens_per_s = global_batch * seq / elapsed
            achieved = tokens_per_s * flops_per_token
            metrics = {
                "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tokens_per_s, "tflops": achieved / 1e12 / world, "step_time_s": elapsed,
                "skipped_steps": skipped, "consumed_samples": consumed, "peak_mem_gib": _peak_memory_gib(),
            }
            if peak:
                metrics["mfu"] = achieved / (peak * world)
            losses.append(loss)
            steps_this_run += 1
            if (step + 1) % t.log_interval == 0 or step == start_step:
                tracker.log(step + 1, metrics)
            progress.update(step + 1, loss=loss, tokens_per_s=tokens_per_s)
            if t.eval_interval and (step + 1) % t.eval_interval == 0:
                tracker.log(step + 1, {"val_loss": _evaluate(ddp_model, valid_ds, recipe, dp_rank, dp, device)})
            last = step + 1 == t.max_steps
            stop_early = t.exit_after_steps and steps_this_run >= t.exit_after_steps
            if t.save_interval and ((step + 1) % t.save_interval == 0 or last or stop_early):
                save_checkpoint(ckpt_root, step + 1, [ddp_model], optimizer, scheduler,
                                {"consumed_samples": consumed}, keep=t.keep_checkpoints)
            if stop_early:
                break
        summary = TrainSummary(
            run_dir=str(run_dir), steps=start_step + steps_this_run,
            first_loss=whole_run_first_loss(run_dir, losses), final_loss=losses[-1] if losses else math.nan,
            losses=losses, tokens_per_s=tokens_per_s, checkpoint_dir=str(ckpt_root), resumed_from=resumed_from,
            cuda_graph_step=cuda_graph_step)
        tracker.log_summary({"first_loss": summary.first_loss, "final_loss": summary.final_loss,
                             "tokens_per_s": tokens_per_s, "steps": summary.steps,
                             **({"cuda_graph_step": cuda_graph_step} if cuda_graph_step else {})})
    from recipes.generate import sample_after_training

    summary.sample = sample_after_training(model, recipe)
    return summary


def _load_initial_weights(model, load_dir: str) -> None:
    """Start a new run from existing weights (fine-tuning): a Hugging Face FalconH1 directory
    (config.json + *.safetensors) or a falcon-train run / checkpoints directory (model only)."""
    from falcon_h1.hf import load_hf_weights
    from recipes.checkpointing import load_latest_checkpoint

    path = Path(load_dir)
    if (path / "config.json").is_file():
        load_hf_weights(model, path)
        return
    ckpt_root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if load_latest_checkpoint(ckpt_root, [model], None, None) is None:
        raise FileNotFoundError(f"train.load_dir = {load_dir!r} holds neither a Hugging Face checkpoint "
                                "(config.json + *.safetensors) nor falcon-train checkpoints.")


def _global_mean_loss(reduced: list[dict]) -> float:
    """Token-weighted mean over this step's microbatches and the data-parallel group."""
    from megatron.core import parallel_state

    if not reduced:  # not the last pipeline stage
        totals = torch.zeros(2, dtype=torch.float64)
    else:
        totals = torch.stack([r["lm loss"].double().cpu() for r in reduced]).sum(0)
    if dist.is_initialized():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        totals = totals.to(device)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        totals = totals.cpu()
    return float(totals[0] / totals[1].clamp_min(1))


@torch.no_grad()
def _evaluate(ddp_model, valid_ds, recipe, dp_rank, dp, device) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from recipes.data import make_data_iterator

    t = recipe.train
    it = make_data_iterator(valid_ds, t.micro_batch_size, dp_rank, dp, 0, t.seed)
    ddp_model.eval()
    totals = []
    with _device_mode():
        for _ in range(t.eval_iters):
            totals += get_forward_backward_func()(
                forward_step_func=partial(_forward_step, device=device), data_iterator=it, model=[ddp_model],
                num_microbatches=t.global_batch_size // (t.micro_batch_size * dp),
                seq_length=recipe.data.seq_length, micro_batch_size=t.micro_batch_size, forward_only=True)
    ddp_model.train()
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


# ---------------------------------------------------------------- full-iteration CUDA graph
# train.cuda_graph: Megatron's FullCudaGraphWrapper copies each step's micro-batches into static
# CUDA buffers, runs `train.cuda_graph_warmup_steps` steps eagerly, captures the next call of the
# schedule (forward, backward, finalize_model_grads with the DP all-reduce) in one CUDA graph and
# replays it from then on. What that relies on here:
# * batches: the iterator yields dicts of [micro_batch, seq] CPU tensors, always the same shapes;
#   the wrapper copies them into its buffers outside the graph, and _forward_step's `.to(device)`
#   of a tensor already on that device returns it unchanged (no copy inside the graph);
# * gradients: Megatron's DDP accumulates into persistent buffers (param.main_grad) zeroed in place
#   by zero_grad_buffer(); Megatron's optimizer.zero_grad() only drops `.grad`, never main_grad;
# * the loss: the replay rewrites the captured result tensors, read after each replay;
# * RNG: the wrapper registers every RNG-tracker state with the graph, which needs generator
#   objects (Megatron's "cudagraphable" tracker) instead of byte-tensor snapshots;
# * streams: the DDP wrapper is built, and every step runs, on the capture stream (_capture_stream).


@contextlib.contextmanager
def _training_schedule(forward_backward_func, train_cfg):
    """The training step's schedule: Megatron's as is, or wrapped in its full-iteration CUDA graph.

    The wrapper keeps its graph, step counter and input buffers on the class; they are reset on
    entry (this run counts its own warm-up steps) and released on exit (a later train() in the
    same process, e.g. a test, captures its own graph with its own shapes)."""
    if not train_cfg.cuda_graph:
        yield forward_backward_func
        return
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper, StaticBufferLoader

    wrapper = FullCudaGraphWrapper(forward_backward_func, cuda_graph_warmup_steps=train_cfg.cuda_graph_warmup_steps)

    def release():
        wrapper.reset_cuda_graph("training")
        StaticBufferLoader.static_buffers["training"].clear()

    release()
    try:
        yield wrapper
    finally:
        release()


def _capture_stream():
    """The side stream Megatron's wrapper captures on. Every training step runs on it, and the DDP
    wrapper is built on it: Megatron's DDP holds each parameter's grad-accumulator autograd node,
    which keeps the stream current when it was made; made on the default stream, the captured
    backward would have to sync with the default (legacy) stream, which a capture forbids
    (cudaErrorStreamCaptureImplicit, seen on an H200 with torch 2.11, which lacks the
    `set_override_stale_capture_stream` switch newer Megatron relies on)."""
    from megatron.core.full_cuda_graph import get_shared_capture_stream

    return get_shared_capture_stream()


@contextlib.contextmanager
def _on_stream(stream):
    """Run the block on `stream` (ordered after the work already queued, and before what follows)."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def _captured_graph(wrapper):
    """The wrapper's captured training graph (kept on its class), or None before the capture."""
    return type(wrapper).cuda_graph["training"]


def _check_finite_step(step: int, loss: float, grad_norm) -> None:
    """Fail on a non-finite loss or gradient norm: stands in for the NaN check of Megatron's DDP,
    which cannot run inside the graph. Raised before the step's checkpoint would be written."""
    norm = float(grad_norm) if grad_norm is not None else 0.0
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise FloatingPointError(
            f"step {step}: loss = {loss}, grad_norm = {grad_norm}: training diverged (non-finite values). "
            "Resume from an earlier checkpoint with a lower train.lr, or rerun with train.cuda_graph = false "
            "to have Megatron name the gradient bucket that first held the NaN/inf.")


def _use_graph_safe_rng_tracker(seed: int) -> None:
    """Re-seed Megatron's RNG tracker (same seeds as initialize_parallel) with generator objects
    that a CUDA graph can register (use_cudagraphable_rng, as Megatron-LM does with graphs)."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=True, force_reset_rng=True)
