"""Learning-rate schedule: Megatron Core's `OptimizerParamScheduler`.

Linear warmup from 0 to `train.lr` over `train.warmup_steps`, then decay to
`train.min_lr` at `train.max_steps` (cosine, linear, or constant = stay at
`train.lr`), or warmup-stable-decay (`WSD`: `train.lr` until the last
`train.lr_wsd_decay_steps` steps, which decay to `train.min_lr` in the shape
`train.lr_wsd_decay_style`; Megatron's "exponential" shape is
min_lr + (2 * 0.5**r - 1) * (lr - min_lr) at decay progress r). Weight decay is
constant (`train.weight_decay` times each param group's `wd_mult`, 0 for biases
and 1-D parameters).

Call `scheduler.step(1)` after every successful optimizer step; the lr used by
optimizer step k (counting from 0) is the schedule's value at k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from falcon_h1.errors import ConfigValueError
from recipes.config import TrainConfig

if TYPE_CHECKING:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

DECAY_STYLES = ("cosine", "linear", "constant", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")  # Megatron's lr_wsd_decay_style


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
    wsd_decay_steps: Optional[int] = None  # the decay phase of WSD (None for the other styles)
    wsd_decay_style: Optional[str] = None


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
    wsd = train_cfg.lr_decay_style == "WSD"
    _check_wsd(train_cfg, wsd)
    return LrSchedule(lr=train_cfg.lr, min_lr=train_cfg.min_lr, warmup_steps=train_cfg.warmup_steps,
                      decay_steps=train_cfg.max_steps, decay_style=train_cfg.lr_decay_style,
                      weight_decay=train_cfg.weight_decay, grad_clip=train_cfg.grad_clip,
                      wsd_decay_steps=train_cfg.lr_wsd_decay_steps if wsd else None,
                      wsd_decay_style=train_cfg.lr_wsd_decay_style if wsd else None)


def _check_wsd(train_cfg: TrainConfig, wsd: bool) -> None:
    """The WSD keys: set for WSD, left at their defaults otherwise (they would be ignored)."""
    steps, style = train_cfg.lr_wsd_decay_steps, train_cfg.lr_wsd_decay_style
    if not wsd:
        for key, value, default in (("lr_wsd_decay_steps", steps, 0),
                                    ("lr_wsd_decay_style", style, WSD_DECAY_STYLES[0])):
            if value != default:
                raise ConfigValueError(
                    f"train.{key}", value, f"{default!r} unless train.lr_decay_style = WSD",
                    message=f"train.{key} = {value!r} applies to train.lr_decay_style = WSD only; with "
                            f"{train_cfg.lr_decay_style!r} leave it at {default!r}.")
        return
    room = train_cfg.max_steps - train_cfg.warmup_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= room:
        raise ConfigValueError("train.lr_wsd_decay_steps", steps,
                               f"an integer in 1 .. max_steps - warmup_steps = {room} (the decay phase of WSD)")
    if style not in WSD_DECAY_STYLES:
        raise ConfigValueError("train.lr_wsd_decay_style", style, ", ".join(WSD_DECAY_STYLES))


def build_scheduler(optimizer, schedule: LrSchedule | TrainConfig) -> OptimizerParamScheduler:
    """Megatron's scheduler over `optimizer.param_groups`; a TrainConfig is checked first.

    On resume, the recipe's values win over the checkpoint's (a run may be
    extended by raising `train.max_steps`); only the step count is restored.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

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
        wsd_decay_steps=schedule.wsd_decay_steps,
        lr_wsd_decay_style=schedule.wsd_decay_style,
    )
