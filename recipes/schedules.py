"""Learning-rate schedule: Megatron Core's `OptimizerParamScheduler`.

Linear warmup from 0 to `train.lr` over `train.warmup_steps`, then decay to
`train.min_lr` at `train.max_steps` (cosine, linear, or constant = stay at
`train.lr`). Weight decay is constant (`train.weight_decay` times each param
group's `wd_mult`, 0 for biases and 1-D parameters).

Call `scheduler.step(1)` after every successful optimizer step; the lr used by
optimizer step k (counting from 0) is the schedule's value at k.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from falcon_h1.errors import ConfigValueError
from recipes.config import TrainConfig

DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class LrSchedule:
    """The lr / weight-decay / clipping values of `train.*` that the optimizer and the lr
    scheduler use, checked once (`checked_schedule`) and passed on as this value."""

    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int  # train.max_steps
    decay_style: str
    weight_decay: float
    grad_clip: float


def checked_schedule(train_cfg: TrainConfig) -> LrSchedule:
    """`train_cfg`'s schedule; errors name the key, value and what is allowed."""
    for key, value in (("train.lr", train_cfg.lr), ("train.grad_clip", train_cfg.grad_clip)):
        if value < 0:
            raise ConfigValueError(key, value, "a value >= 0")
    if train_cfg.lr_decay_style not in DECAY_STYLES:
        raise ConfigValueError("train.lr_decay_style", train_cfg.lr_decay_style, ", ".join(DECAY_STYLES))
    if train_cfg.max_steps < 1:
        raise ConfigValueError("train.max_steps", train_cfg.max_steps, "an integer >= 1")
    if not 0 <= train_cfg.warmup_steps < train_cfg.max_steps:
        raise ConfigValueError("train.warmup_steps", train_cfg.warmup_steps,
                               f"0 <= warmup_steps < train.max_steps = {train_cfg.max_steps}")
    if not 0 <= train_cfg.min_lr <= train_cfg.lr:
        raise ConfigValueError("train.min_lr", train_cfg.min_lr, f"0 <= min_lr <= train.lr = {train_cfg.lr}")
    if train_cfg.weight_decay < 0:
        raise ConfigValueError("train.weight_decay", train_cfg.weight_decay, "a value >= 0")
    return LrSchedule(lr=train_cfg.lr, min_lr=train_cfg.min_lr, warmup_steps=train_cfg.warmup_steps,
                      decay_steps=train_cfg.max_steps, decay_style=train_cfg.lr_decay_style,
                      weight_decay=train_cfg.weight_decay, grad_clip=train_cfg.grad_clip)


def build_scheduler(optimizer, schedule: LrSchedule | TrainConfig) -> OptimizerParamScheduler:
    """Megatron's scheduler over `optimizer.param_groups`; a TrainConfig is checked first.

    On resume, the recipe's values win over the checkpoint's (a run may be
    extended by raising `train.max_steps`); only the step count is restored.
    """
    if isinstance(schedule, TrainConfig):
        schedule = checked_schedule(schedule)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=schedule.lr,
        min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.warmup_steps,
        lr_decay_steps=schedule.decay_steps,
        lr_decay_style=schedule.decay_style,
        start_wd=schedule.weight_decay,
        end_wd=schedule.weight_decay,
        wd_incr_steps=schedule.decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
