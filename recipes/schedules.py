"""Learning-rate schedule: Megatron Core's `OptimizerParamScheduler`.

Linear warmup from 0 to `train.lr` over `train.warmup_steps`, then decay to
`train.min_lr` at `train.max_steps` (cosine, linear, or constant = stay at
`train.lr`). Weight decay is constant (`train.weight_decay` times each param
group's `wd_mult`, 0 for biases and 1-D parameters).

Call `scheduler.step(1)` after every successful optimizer step; the lr used by
optimizer step k (counting from 0) is the schedule's value at k.
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

DECAY_STYLES = ("cosine", "linear", "constant")


def validate_train_schedule(train_cfg) -> None:
    """The lr / weight-decay / clipping values every consumer relies on (optimizer,
    scheduler, recipe validation); errors name the key, value and what is allowed."""
    for field, value in (("train.lr", train_cfg.lr), ("train.grad_clip", train_cfg.grad_clip)):
        if value < 0:
            raise ValueError(f"{field} = {value}; allowed: a value >= 0.")
    if train_cfg.lr_decay_style not in DECAY_STYLES:
        raise ValueError(
            f"train.lr_decay_style = {train_cfg.lr_decay_style!r}; allowed: {', '.join(DECAY_STYLES)}."
        )
    if train_cfg.max_steps < 1:
        raise ValueError(f"train.max_steps = {train_cfg.max_steps}; allowed: an integer >= 1.")
    if not 0 <= train_cfg.warmup_steps < train_cfg.max_steps:
        raise ValueError(
            f"train.warmup_steps = {train_cfg.warmup_steps}; allowed: "
            f"0 <= warmup_steps < train.max_steps = {train_cfg.max_steps}."
        )
    if not 0 <= train_cfg.min_lr <= train_cfg.lr:
        raise ValueError(
            f"train.min_lr = {train_cfg.min_lr}; allowed: 0 <= min_lr <= train.lr = {train_cfg.lr}."
        )
    if train_cfg.weight_decay < 0:
        raise ValueError(f"train.weight_decay = {train_cfg.weight_decay}; allowed: a value >= 0.")


def build_scheduler(optimizer, train_cfg) -> OptimizerParamScheduler:
    """Megatron's scheduler over `optimizer.param_groups`, configured from `train`.

    On resume, the recipe's values win over the checkpoint's (a run may be
    extended by raising `train.max_steps`); only the step count is restored.
    """
    validate_train_schedule(train_cfg)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=train_cfg.warmup_steps,
        lr_decay_steps=train_cfg.max_steps,
        lr_decay_style=train_cfg.lr_decay_style,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=train_cfg.max_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
