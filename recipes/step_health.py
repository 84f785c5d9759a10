"""What training does when a step's numbers go wrong.

Non-finite values stop the run at the first step that has them (`TrainingDiverged`), before that
step's checkpoint is written, so the newest checkpoint holds the last finite weights. Eager runs
have Megatron's DDP check every gradient bucket before its all-reduce (it names the bucket; its
own message counts iterations it is never told about, so it is rewritten with the step); after
every step, eager or CUDA-graphed, the loss and the gradient norm are checked too (both are host
numbers by then, so this costs nothing).

A gradient norm of exactly 0 (no parameter gets any gradient: the weights change only by weight
decay) is warned about once, at the first step that has it. It is only known when train.grad_clip
> 0: without clipping Megatron computes no norm.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from pathlib import Path
from typing import Optional

from recipes.run_errors import RunError

# Megatron's RerunStateMachine.validate_result with reruns disabled:
# "Rank R, node N, device D, iteration I: Unexpected result nan (message='found NaN in local grad norm ...')"
_MEGATRON_NON_FINITE = re.compile(r"Rank (\d+),.*Unexpected result (\S+) \(message='(found (?:NaN|Inf) in [^']*)'\)")


class TrainingDiverged(RunError, FloatingPointError):
    """Step `step`'s loss or gradients are not finite; the run stopped before saving it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self):
        return type(self), (str(self), self.step)


def diverged(step: int, what: str, ckpt_root: Path) -> TrainingDiverged:
    """The error for step `step`, saying `what` was not finite and where the run resumes from."""
    from recipes.checkpoint_files import latest_pointer_step

    newest = latest_pointer_step(ckpt_root)
    resume = (f"the newest checkpoint is step {newest} ({ckpt_root}): rerun in the same train.run_dir with a lower "
              "train.lr (or more train.warmup_steps, a smaller train.grad_clip) to resume from it"
              if newest is not None else
              "no checkpoint was written yet: rerun with a lower train.lr (or more train.warmup_steps, a smaller "
              "train.grad_clip)")
    return TrainingDiverged(
        f"step {step}: training diverged: {what}. Step {step} was not saved; {resume}.", step)


def check_finite_step(step: int, loss: float, grad_norm, ckpt_root: Path) -> None:
    """Stop on a non-finite loss or gradient norm after optimizer step `step` (counting from 1)."""
    norm = float(grad_norm) if grad_norm is not None else 0.0
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise diverged(step, f"loss = {loss}, grad_norm = {grad_norm} (non-finite values; an eager run, "
                       "train.cuda_graph = false, names the gradient bucket that first holds one)", ckpt_root)


@contextlib.contextmanager
def megatron_gradient_check_names(step: int, ckpt_root: Path):
    """Megatron DDP's NaN/Inf gradient-bucket check, raised as TrainingDiverged at `step`."""
    try:
        yield
    except RuntimeError as error:
        found = _MEGATRON_NON_FINITE.search(str(error))
        if found is None:
            raise
        rank, value, what = found.groups()
        raise diverged(step, f"the gradient is not finite (Megatron's DDP on rank {rank}: {what}; "
                       f"bucket norm {value})", ckpt_root) from None


def warn_first_zero_gradient(warned_at: Optional[int], step: int, grad_norm, grad_clip: float,
                             rank: int) -> Optional[int]:
    """The step of the run's first exactly-zero gradient norm (`warned_at` once known); warns
    (rank 0) when that is `step`."""
    if warned_at is not None or grad_clip <= 0 or grad_norm is None or float(grad_norm) != 0.0:
        return warned_at
    if rank == 0:
        print(f"falcon-train: warning: step {step}: the gradient norm is exactly 0: no parameter gets a gradient, "
              "so the weights change only by weight decay. Look for a multiplier set to 0 (model.*_multiplier), "
              "a loss mask without tokens (chat data without assistant turns) or a loss that does not depend on "
              "the weights. Warned once; metrics.jsonl's grad_norm shows every step.", file=sys.stderr, flush=True)
    return step
