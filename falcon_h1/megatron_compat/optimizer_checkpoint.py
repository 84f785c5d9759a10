"""Saving and loading Megatron Core 0.19.2's optimizers, around three of its bugs.

Each function works on Megatron's private optimizer attributes, so each names what it changes:

- `fp32_params_numbered_as_the_optimizer_does`: a bf16 model with fp32 parameters (Falcon-H1's
  A_log, D, dt_bias) could not be checkpointed: "Optimizer shape (8,) does not match model shape
  (128,)" on save, "size of tensor a (64) must match ... (4)" on load.
- `allocate_distributed_optimizer_state`: a fresh distributed optimizer over torch's AdamW (what
  Megatron uses without Transformer Engine / Apex) has no state to load into.
- `load_optimizer_state`: loading the distributed optimizer's AdamW state failed
  (KeyError('step')) or silently reset or shared the AdamW step counter; and a resumed run that
  changed train.lr, train.min_lr or train.weight_decay failed ("Could not find parameter group
  with key ... in loaded checkpoint").
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch

from falcon_h1.megatron_compat.cpu import unwrapped_optimizer
from falcon_h1.megatron_compat.optimizer import fused_adamw_enabled, set_fused_adamw


def _inner_optimizers(optimizer) -> list:
    megatron_optimizer = unwrapped_optimizer(optimizer)
    return list(getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]))


@contextmanager
def fp32_params_numbered_as_the_optimizer_does(optimizer):
    """Let Megatron's bf16 optimizers checkpoint a model that also has fp32 parameters.

    Megatron 0.19.2 numbers such mixed groups inconsistently when it builds or loads a
    checkpoint, so one parameter's state was paired with another's shape:
    * `Float16OptimizerWithFloat16Params` keeps the fp32 parameters in its param groups (as
      themselves) but numbers the checkpoint by `float16_groups`, which lacks them. While this is
      open, each group lists every parameter in param-group order, an fp32 one as its own main
      copy; loading then copies the saved fp32 values into those parameters themselves.
    * `DistributedOptimizer` puts a group's fp32 shards before its bf16 ones in the inner
      optimizer, but `model_param_group_index_map` keeps the model's interleaved order. While
      this is open, the map points at each parameter's own shard.
    Training itself pairs the groups correctly and is not touched.
    """
    replacements = []  # (inner optimizer, {attribute: value while open}), all built before any is set
    for inner in _inner_optimizers(optimizer):
        if hasattr(inner, "fp32_from_float16_groups") and hasattr(inner, "float16_groups"):
            model_groups, main_groups = [], []
            for group, model_params, main_params in zip(inner.optimizer.param_groups, inner.float16_groups,
                                                        inner.fp32_from_float16_groups):
                model_of_main = {id(main): model for main, model in zip(main_params, model_params)}
                main_groups.append(list(group["params"]))
                model_groups.append([model_of_main.get(id(param), param) for param in group["params"]])
            replacements.append((inner, {"float16_groups": model_groups, "fp32_from_float16_groups": main_groups}))
        elif hasattr(inner, "model_param_group_index_map") and hasattr(inner, "shard_fp32_groups"):
            position = {id(param): (g, i) for g, group in enumerate(inner.optimizer.param_groups)
                        for i, param in enumerate(group["params"])}
            index_map = {}
            for pairs in ((inner.model_fp32_groups, inner.shard_fp32_groups),
                          (inner.model_float16_groups, inner.shard_fp32_from_float16_groups)):
                for model_params, shards in zip(*pairs):
                    for model_param, shard in zip(model_params, shards):
                        if id(shard) not in position:
                            raise NotImplementedError(
                                "checkpointing a bf16 model with fp32 parameters supports Megatron's distributed "
                                "optimizer with fp32 main shards only (no use_precision_aware_optimizer).")
                        index_map[model_param] = position[id(shard)]
            replacements.append((inner, {"model_param_group_index_map": index_map}))
    saved = [(inner, {name: getattr(inner, name) for name in values}) for inner, values in replacements]
    try:
        for inner, values in replacements:
            for name, value in values.items():
                setattr(inner, name, value)
        yield
    finally:
        for inner, values in saved:
            for name, value in values.items():
                setattr(inner, name, value)


def allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state tensors before loading into them.

    Megatron's DistributedOptimizer builds its loading state dict from the inner
    optimizer's state, which torch's AdamW (used when TE/Apex are absent) creates
    only on its first step; Megatron's `_init_optimizer_states_with_dummy_values`
    takes that step with zero gradients. lr and weight decay are zeroed around it
    so not even a decay step touches the weights.
    """
    for inner in _inner_optimizers(optimizer):
        allocate = getattr(inner, "_init_optimizer_states_with_dummy_values", None)
        if allocate is None or len(inner.optimizer.state) > 0:
            continue
        groups = inner.optimizer.param_groups
        saved = [(group["lr"], group["weight_decay"]) for group in groups]
        for group in groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
        allocate()
        for group, (lr, weight_decay) in zip(groups, saved):
            group["lr"], group["weight_decay"] = lr, weight_decay


def load_optimizer_state(optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, around Megatron 0.19.2 bugs in the distributed optimizer.

    Megatron restores the step of torch's AdamW (used when TE/Apex are absent;
    they keep no per-parameter step) from the saved param groups, then copies the
    per-parameter tensors, where AdamW also keeps a tensor "step":
    * "fully_reshardable" has no "step" among them: KeyError('step');
    * "dp_reshardable" has one, but it is the freshly allocated state's, not the
      saved one: the step count silently went back to 1.
    The per-parameter copy now skips "step" (and any key the checkpoint lacks, as
    Megatron already skips non-tensor entries), so the param groups' step stands.

    A second bug on the same path (any distributed optimizer format): Megatron
    restores torch AdamW's "step" as ONE tensor shared by every parameter's state,
    and AdamW increments each parameter's step in place, so after a resume the
    shared counter advanced once per parameter per step and the bias corrections
    were wrong. Each parameter gets its own copy back.

    The run's choice of torch's fused AdamW (train.fused_optimizer) survives the load, whatever
    the checkpoint was saved with.
    """
    megatron_optimizer = unwrapped_optimizer(optimizer)
    fused = fused_adamw_enabled(megatron_optimizer)
    patched = []
    for inner in _inner_optimizers(optimizer):
        set_states = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if set_states is not None:
            inner._set_main_param_and_optimizer_states = (
                lambda model_param, tensors, set_states=set_states: set_states(
                    model_param, defaultdict(lambda: None, _without_step(tensors))
                )
            )
            patched.append(inner)
    _give_saved_param_groups_this_runs_schedule(megatron_optimizer, state)
    try:
        # no_grad: 0.19.2's dp_reshardable loader (unlike the others) lacks it and
        # copies into fp32 main params that are views of leaf parameters.
        with torch.no_grad(), fp32_params_numbered_as_the_optimizer_does(optimizer):
            optimizer.load_state_dict(state)
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states
    for inner in _inner_optimizers(optimizer):
        for param_state in inner.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()
    # torch's load_state_dict took the saved param groups' fused/foreach flags: the run's own stand
    set_fused_adamw(megatron_optimizer, fused)


def _give_saved_param_groups_this_runs_schedule(megatron_optimizer, state) -> None:
    """Let a resumed run change train.lr, train.min_lr and train.weight_decay.

    Megatron 0.19.2 keeps each param group's schedule (max_lr, min_lr, start_wd, end_wd) in the
    group and in the checkpoint, pairs saved groups with the current ones by a key that includes
    those values, and fails when one changed ("Could not find parameter group with key ... in
    loaded checkpoint"); had it paired them, the saved values would have driven the schedule.
    Each saved group takes the schedule values of the current group it corresponds to (same
    weight-decay / lr multipliers and flags), so the pairing holds and the recipe's schedule
    applies from the resumed step on, as `recipes.schedules.build_scheduler` intends.
    """
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    schedule_keys = ("max_lr", "min_lr", "start_wd", "end_wd")
    structure_keys = [key for key in param_group_identifier_keys if key not in schedule_keys]
    current: dict[tuple, set] = defaultdict(set)  # structure -> the schedule values (only keys a group sets)
    for inner in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        for group in inner.optimizer.param_groups:
            schedule = tuple((key, group[key]) for key in schedule_keys if key in group)
            current[tuple(group.get(key) for key in structure_keys)].add(schedule)

    def visit(node) -> None:
        if isinstance(node, dict):
            for group in node.get("param_groups", []) if isinstance(node.get("param_groups"), list) else []:
                if isinstance(group, dict):
                    matches = current.get(tuple(group.get(key) for key in structure_keys), set())
                    if len(matches) == 1:
                        for key in schedule_keys:
                            group.pop(key, None)
                        group.update(next(iter(matches)))
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(state)


def _without_step(tensors: dict) -> dict:
    return {key: value for key, value in tensors.items() if key != "step"}
