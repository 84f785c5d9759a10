"""What a rerun in an existing run directory checks, repairs and says.

* `check_resume_config`: a resumed run continues the saved one, so the fields that decide the
  model or the order of the data must keep the values in `run_dir/config.yaml`; a change is
  refused with the field named and the way out (a new run from these weights). The other
  fields (lr schedule, max_steps, intervals, logging, parallel layout, ...) may change.
* `repair_metrics_log`: a run killed while writing `metrics.jsonl` leaves a cut-off last line;
  it is dropped (and said so) instead of blocking the resume.
* `finished_run`: rerunning a run that already reached `train.max_steps` says so and changes
  nothing; the summary it returns is read from the run's files.
* `whole_run_first_loss`: a resumed run's summary starts at the run's first step, not at the
  first step of this launch.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from falcon_h1.errors import ConfigValueError
from recipes.run_metadata import MASK, scrub_secrets
from recipes.tracking import METRICS_FILE, SUMMARY_FILE

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
_MODEL = "changes the model"
_ORDER = "changes the data order"
# First match wins; None: may change on resume. Fields not listed may change.
RESUME_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ("model.attention_backend", None),  # how attention is computed, not what
    ("model.kernel_backend", None),
    ("model.ssd_kernels", None),
    ("model.mamba_keep_conv_output", None),
    ("model.*", _MODEL),  # the µP multipliers too: mup.mode is resolved into model.* when composed
    ("bitnet.enabled", _MODEL),
    ("bitnet.layers", _MODEL),
    ("bitnet.subln", _MODEL),
    ("data.kind", _ORDER),
    ("data.paths", _ORDER),
    ("data.packing", _ORDER),
    ("data.overlong", _ORDER),
    ("data.tokenizer", "changes the token ids"),
    ("data.seq_length", _ORDER),
    ("data.split", _ORDER),
    ("train.seed", _ORDER),
    ("train.global_batch_size", "changes which samples each step trains on"),
    ("train.precision", "changes the dtype of the weights and the optimizer state"),
    ("train.adam_beta1", "is restored with the optimizer state, so a new value would be ignored"),
    ("train.adam_beta2", "is restored with the optimizer state, so a new value would be ignored"),
    ("train.adam_eps", "is restored with the optimizer state, so a new value would be ignored"),
    ("train.load_dir", "only sets a new run's initial weights; a resumed run continues from its checkpoints"),
    ("parallel.distributed_optimizer", "lays the optimizer state out another way, which cannot be loaded across"),
    ("train.optimizer_offload_fraction", "lays the optimizer state out another way, which cannot be loaded across"),
)
_NEVER_COMPARED = ("train.run_dir", "train.resume", "dryrun")


def check_resume_config(recipe, run_dir) -> None:
    """Refuse to resume `run_dir` with a recipe that changes what the saved run trains.

    Call only when the run resumes from its checkpoints. A run without config.yaml (written by
    a version before it was recorded) is not checked."""
    import yaml

    saved_file = Path(run_dir) / CONFIG_FILE
    if not saved_file.is_file():
        return
    saved = _flatten(yaml.safe_load(saved_file.read_text()) or {})
    # Through YAML like the saved file, so both sides compare as the same plain types.
    new = _flatten(yaml.safe_load(yaml.safe_dump(scrub_secrets(dataclasses.asdict(recipe)))))
    refused = []
    for key, old_value in saved.items():
        if key not in new or key in _NEVER_COMPARED or old_value == MASK or new[key] == old_value:
            continue
        reason = _rule(key)
        if reason is not None:
            refused.append(f"{key} = {old_value!r} (this recipe: {new[key]!r}; {reason})")
    if refused:
        raise ConfigValueError(
            "train.run_dir", str(run_dir), f"the values saved in {saved_file}, or a new run directory",
            message=f"train.run_dir = {str(run_dir)!r} holds a run saved with other values of fields a resumed run must "
            f"keep: {'; '.join(refused)}. Allowed: the saved values (see {saved_file}) to resume this run; or a "
            f"new run that starts from its weights: train.run_dir=<a new directory> train.load_dir={run_dir} "
            "(model weights only, where the shapes match)."
        )


def _rule(key: str) -> Optional[str]:
    for pattern, reason in RESUME_RULES:
        if fnmatch.fnmatchcase(key, pattern):
            return reason
    return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


# ------------------------------------------------------------------ metrics.jsonl


def repair_metrics_log(run_dir) -> None:
    """Drop a cut-off last line of run_dir/metrics.jsonl (a run killed mid-write), saying so.
    A damaged line elsewhere is not a cut-off: it is reported with its line number."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    filled = [index for index, line in enumerate(lines) if line.strip()]
    damaged = [index for index in filled if not _is_record(lines[index])]
    if not damaged:
        return
    if damaged != [filled[-1]]:
        raise ValueError(
            f"{path} line {damaged[0] + 1} is not a metrics record (one JSON object per line, as falcon-train "
            "writes them); allowed: fix or delete that line, then rerun.")
    cut = lines[filled[-1]]
    kept = b"".join(line + b"\n" for line in lines[:filled[-1]] if line.strip())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(kept)
    os.replace(tmp, path)
    logger.warning("%s: dropped its cut-off last line (%d bytes, %r), left by a run stopped while writing it.",
                   path, len(cut), cut[:60].decode(errors="replace"))


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _logged(run_dir, key: str) -> dict[int, float]:
    """{step: value} of `key` in run_dir/metrics.jsonl (empty when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and _is_record(line.encode()):
            record = json.loads(line)
            if key in record and "step" in record:
                values[int(record["step"])] = float(record[key])
    return values


# ------------------------------------------------------------------ summaries


def whole_run_first_loss(run_dir, losses_this_launch: list[float]) -> float:
    """The loss of the run's first logged step (an earlier launch's, after a resume)."""
    logged = _logged(run_dir, "loss")
    if logged:
        return logged[min(logged)]
    return losses_this_launch[0] if losses_this_launch else math.nan


def finished_run(run_dir, step: int, max_steps: int, rank: int) -> dict:
    """Say that the run in `run_dir` is finished; return its TrainSummary fields, read from its
    files. Nothing is written."""
    run_dir = Path(run_dir)
    if rank == 0:
        print(f"{run_dir} is already finished: its latest checkpoint is step {step} and train.max_steps = "
              f"{max_steps}. Nothing was trained or written. To train it further, raise train.max_steps; for a "
              "new run, use another train.run_dir.", flush=True)
    losses = _logged(run_dir, "loss")
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = {}
    final = summary.get("final_loss", losses[max(losses)] if losses else math.nan)
    return dict(run_dir=str(run_dir), steps=step, first_loss=losses[min(losses)] if losses else math.nan,
                final_loss=final, losses=[], tokens_per_s=summary.get("tokens_per_s", math.nan),
                checkpoint_dir=str(run_dir / "checkpoints"), resumed_from=step)
