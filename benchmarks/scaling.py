"""Data- and tensor-parallel scaling of `falcon-train` on the GPUs of one host.

    python benchmarks/scaling.py run --work /tmp/scaling --out $OUT        # launch, then summarize
    python benchmarks/scaling.py run --work /tmp/scaling --dryrun          # compose + validate only
    python benchmarks/scaling.py summarize --work /tmp/scaling             # re-read finished runs

`benchmarks/scaling_suite.sh` is the one command for the 2-GPU machine; benchmarks/NOTES.md
("Multi-GPU scaling") records the method and the numbers.

How a run is launched. Each case is composed with `recipes.api.compose_recipe` (the Hydra
composition `falcon-train` does, same configs/ and overrides), validated like the CLI
validates, resolved and written to a recipe file the way a launch writes it
(`recipes.recipe_file`), then started with
`torchrun --standalone --nproc_per_node N -m recipes.worker RECIPE.yaml`: the command
`falcon-train executor.nproc_per_node=N` hands to NeMo-Run's LocalExecutor. The 1-GPU
baselines go through the same torchrun + worker path with N = 1, so both sides of every
ratio pay the same launcher. Every run writes metrics.jsonl (recipes/tracking.py; rank 0).

Definitions (N = the scaled run's GPU count, 2 on the suite's machine):
- Step time: the median `step_time_s` of the logged steps after the first `warmup` ones
  (those include compilation, Triton autotuning and, with CUDA graphs, the capture).
  tokens/s = tokens per step (train.global_batch_size x data.seq_length) / median step time.
- DP scaling efficiency = tokens/s at DP=N (global batch = N x the per-GPU batch)
  / (N x tokens/s at 1 GPU with the per-GPU batch). 1.0 = linear.
- TP scaling efficiency, strong (the strict one; same model, same global batch)
  = tokens/s at TP=N / (N x tokens/s at TP=1).
- TP scaling efficiency, weak (Megatron-LM's "weak scaling", Shoeybi et al. 2019, sec. 5.1:
  the model grows with the GPU count and the achieved FLOP/s per GPU is compared with one
  GPU's) = model TFLOP/s per GPU at TP=N on N x the layers / model TFLOP/s at TP=1.
  Model FLOPs are falcon_h1/flops.py's count (3 x forward, no recompute), as in `tflops`.
- Peak memory: `peak_mem_gib` as rank 0 logs it (torch.cuda.max_memory_allocated on GPU,
  process peak RSS on CPU); the ranks of these runs hold equal shards.
- MFU: the logged `mfu` (model FLOPs / (dense bf16 peak x GPUs)) at the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "scaling_cases.json"
RESULT = "scaling.json"
TABLE = "scaling.txt"
CASE_MARKER = "scaling_case.json"  # marks a run dir this driver made (and may clear)
LAUNCH_ENV_DROPPED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


class ScalingError(ValueError):
    """A benchmark setting or a run's output that cannot give a number; names the key."""


# ---------------------------------------------------------------- planning the runs


@dataclass
class Case:
    name: str          # dp1, dp2, tp1, tp2, tp2_weak
    group: str         # dp | tp
    gpus: int
    description: str
    overrides: list[str]
    status: str = "planned"
    returncode: Optional[int] = None
    wall_s: Optional[float] = None


def common_overrides(args, seq: int, gpus: int) -> list[str]:
    """What every case shares: bundled corpus (byte tokenizer, no download), short schedule,
    no checkpoints, no eval, no W&B / TensorBoard / progress bar, one log line per step."""
    overrides = [
        "data=bundled", f"data.seq_length={seq}", "train=pretrain", f"train.max_steps={args.steps}",
        "train.warmup_steps=1", "train.save_interval=0", "train.eval_interval=0", "train.log_interval=1",
        f"train.precision={args.precision}", f"train.seed={args.seed}", "logger=none",
        "executor=local", f"executor.nproc_per_node={gpus}",
    ]
    if args.data_cache:
        overrides.append(f"data.cache_dir={args.data_cache}")
    if args.cuda_graph:
        overrides.append("train.cuda_graph=true")
    return overrides + list(args.override)


def _extras(args, group_overrides: list[str]) -> str:
    """What the table's config column adds to the case's name: anything beyond the defaults."""
    extras = (["CUDA graph"] if args.cuda_graph else []) + list(args.override) + list(group_overrides)
    return f" ({', '.join(extras)})" if extras else ""


def plan_cases(args) -> list[Case]:
    n, cases = args.gpus, []
    wanted = set(args.cases.split(",")) if args.cases else None
    dp_model = [f"model={args.dp_model}", "parallel=single", f"train.micro_batch_size={args.dp_micro_batch}"]
    for gpus in (1, n):
        cases.append(Case(
            f"dp{gpus}", "dp", gpus,
            f"{args.dp_model}, DP={gpus}, {args.dp_micro_batch}x{args.dp_seq} a GPU{_extras(args, args.dp_override)}",
            [*common_overrides(args, args.dp_seq, gpus), *dp_model,
             f"train.global_batch_size={args.dp_micro_batch * gpus}", *args.dp_override]))
    # Same parallel settings at TP=1 and TP=N: sequence parallelism only acts when tp > 1.
    for gpus, layers, name in ((1, args.tp_layers, "tp1"), (n, args.tp_layers, f"tp{n}"),
                               (n, n * args.tp_layers, f"tp{n}_weak")):
        cases.append(Case(
            name, "tp", gpus,
            f"{args.tp_model} x{layers} layers, TP={gpus}, {args.tp_global_batch}x{args.tp_seq} a step"
            f"{_extras(args, args.tp_override)}",
            [*common_overrides(args, args.tp_seq, gpus), f"model={args.tp_model}",
             f"model.num_hidden_layers={layers}", "parallel=tp2", f"parallel.tp={gpus}",
             f"train.micro_batch_size={args.tp_micro_batch}", f"train.global_batch_size={args.tp_global_batch}",
             *args.tp_override]))
    if wanted is not None:
        unknown = wanted - {c.name for c in cases}
        if unknown:
            raise ScalingError(f"--cases = {args.cases!r} names {sorted(unknown)}; allowed: "
                               f"{', '.join(c.name for c in cases)}.")
        cases = [c for c in cases if c.name in wanted]
    return cases


def write_recipe(case: Case, run_dir: Path, warmup: int) -> Path:
    """The recipe file the workers read, made as `falcon-train` + the local executor make it."""
    from recipes.api import compose_recipe
    from recipes.build import validate_recipe
    from recipes.recipe_file import recipe_to_yaml, resolved

    try:
        recipe = compose_recipe([*case.overrides, f"train.run_dir={run_dir}"])
        validate_recipe(recipe)
    except Exception as err:  # Hydra's and the recipe's own errors name the key already
        raise ScalingError(f"case {case.name}: the overrides {case.overrides} were refused: {err}") from err
    graph_warmup = recipe.train.cuda_graph_warmup_steps
    if recipe.train.cuda_graph and warmup <= graph_warmup:
        raise ScalingError(f"--warmup = {warmup} would time the CUDA graph's capture step (step "
                           f"{graph_warmup + 1}); allowed: more than train.cuda_graph_warmup_steps = {graph_warmup}.")
    path = run_dir.parent / f"{case.name}.yaml"
    path.write_text(recipe_to_yaml(resolved(recipe)))
    return path


def prepare_run_dir(run_dir: Path, case: Case) -> None:
    """A fresh run dir: clear one this driver made before, refuse to touch anything else."""
    if run_dir.exists():
        if not (run_dir / CASE_MARKER).is_file():
            raise ScalingError(f"--work {run_dir.parent} already holds {run_dir.name}/ that this driver did not "
                               "make; allowed: an empty or new --work directory.")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / CASE_MARKER).write_text(json.dumps(asdict(case), indent=2) + "\n")


def launch_command(case: Case, recipe: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.gpus}",
            "-m", "recipes.worker", str(recipe)]


def launch(case: Case, recipe: Path, log: Path, timeout_s: float) -> tuple[int, float]:
    """torchrun N workers on this host; returns (exit status, wall seconds). 124 = timed out."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_DROPPED}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = launch_command(case, recipe)
    started = time.perf_counter()
    with log.open("w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        # Own process group, so a timeout ends torchrun and its workers, nothing else.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = 124
    return code, time.perf_counter() - started


def run_cases(args) -> dict:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cases = plan_cases(args)
    if args.warmup < 0 or args.steps - args.warmup < 3:
        raise ScalingError(f"--steps {args.steps} with --warmup {args.warmup} leaves "
                           f"{args.steps - args.warmup} measured steps; allowed: at least 3.")
    for case in cases:  # every composition error before the first launch
        recipe = write_recipe(case, work / case.name, args.warmup)
        if args.dryrun:
            print(f"[scaling] {case.name}: {case.description}\n  {' '.join(launch_command(case, recipe))}")
    if args.dryrun:
        return {"cases": [asdict(c) for c in cases]}
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
    result = None
    for index, case in enumerate(cases):
        left = deadline - time.monotonic() if deadline else args.run_timeout_s
        if left < args.min_run_s:
            case.status = "skipped (suite time budget)"
        else:
            run_dir = work / case.name
            prepare_run_dir(run_dir, case)
            recipe = write_recipe(case, run_dir, args.warmup)
            print(f"[scaling] {case.name}: {case.description} ...", flush=True)
            case.returncode, case.wall_s = launch(case, recipe, work / f"{case.name}.log",
                                                  min(args.run_timeout_s, left))
            case.status = {0: "ok", 124: "timed out"}.get(case.returncode, "failed")
            print(f"[scaling] {case.name}: {case.status} in {case.wall_s:.0f} s", flush=True)
        _write_manifest(work, cases, args.warmup)
        result = summarize(work, args.out, quiet=index + 1 < len(cases))
    return result


def _write_manifest(work: Path, cases: list[Case], warmup: int) -> None:
    manifest = {"warmup": warmup, "cases": [asdict(c) for c in cases]}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------- reading the runs


@dataclass
class RunStats:
    gpus: int
    tokens_per_step: int
    steps_logged: int
    steps_measured: int
    step_time_s: float                  # median after warm-up
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: Optional[float]     # model FLOPs (falcon_h1/flops.py)
    mfu: Optional[float]
    peak_mem_gib: Optional[float]       # rank 0
    first_step_time_s: float
    first_loss: Optional[float]
    step_times_s: list[float] = field(default_factory=list)


def read_metrics(run_dir: Path) -> list[dict]:
    """The training steps in metrics.jsonl (lines with tokens_per_s), in step order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ScalingError(f"{path} does not exist: the run logged no step (see its .log).")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if "step_time_s" in r), key=lambda r: r["step"])


def read_tokens_per_step(run_dir: Path) -> int:
    """train.global_batch_size x data.seq_length from the config.yaml the run wrote."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int(config["train"]["global_batch_size"]) * int(config["data"]["seq_length"])


def _at_median(rows: list[dict], key: str, median_s: float) -> Optional[float]:
    """A per-step rate metric (inversely proportional to step time) at the median step time:
    value x step_time is the step's fixed amount of work, the same on every step."""
    if any(key not in r for r in rows):
        return None
    return statistics.fmean(r[key] * r["step_time_s"] for r in rows) / median_s


def summarize_run(rows: list[dict], tokens_per_step: int, gpus: int, warmup: int) -> RunStats:
    if len(rows) <= warmup:
        raise ScalingError(f"warmup = {warmup} skips all {len(rows)} logged steps; allowed: fewer than "
                           "train.max_steps (with train.log_interval = 1).")
    measured = rows[warmup:]
    for r in measured:  # the config read back must be the one the run trained with
        logged = r["tokens_per_s"] * r["step_time_s"]
        if abs(logged / tokens_per_step - 1) > 1e-6:
            raise ScalingError(f"step {r['step']} logged {logged:.1f} tokens a step but its config.yaml gives "
                               f"{tokens_per_step}; allowed: the metrics.jsonl of that same run.")
    median_s = statistics.median(r["step_time_s"] for r in measured)
    tokens_per_s = tokens_per_step / median_s
    peaks = [r["peak_mem_gib"] for r in rows if "peak_mem_gib" in r]
    return RunStats(
        gpus=gpus, tokens_per_step=tokens_per_step, steps_logged=len(rows), steps_measured=len(measured),
        step_time_s=median_s, tokens_per_s=tokens_per_s, tokens_per_s_per_gpu=tokens_per_s / gpus,
        tflops_per_gpu=_at_median(measured, "tflops", median_s), mfu=_at_median(measured, "mfu", median_s),
        peak_mem_gib=max(peaks) if peaks else None, first_step_time_s=rows[0]["step_time_s"],
        first_loss=rows[0].get("loss"), step_times_s=[r["step_time_s"] for r in measured])


def efficiencies(stats: dict[str, RunStats], gpus: int) -> dict[str, dict]:
    """The scaling efficiencies the runs at hand allow (see the module docstring)."""
    found = {}
    pairs = (("dp", "dp1", f"dp{gpus}", "tokens"), ("tp_strong", "tp1", f"tp{gpus}", "tokens"),
             ("tp_weak", "tp1", f"tp{gpus}_weak", "flops"))
    for kind, base_name, scaled_name, measure in pairs:
        base, scaled = stats.get(base_name), stats.get(scaled_name)
        if base is None or scaled is None:
            continue
        ratio = scaled.gpus / base.gpus
        if measure == "tokens":
            value = scaled.tokens_per_s / (ratio * base.tokens_per_s)
        elif base.tflops_per_gpu and scaled.tflops_per_gpu is not None:
            value = scaled.tflops_per_gpu / base.tflops_per_gpu
        else:
            continue
        found[kind] = {"value": value, "baseline": base_name, "scaled": scaled_name,
                       "comparable": _comparable(kind, base, scaled, ratio)}
    return found


def _comparable(kind: str, base: RunStats, scaled: RunStats, ratio: float) -> bool:
    """DP keeps the per-GPU batch (tokens a step grow N-fold); strong TP keeps the global batch."""
    if kind == "dp":
        return scaled.tokens_per_step == ratio * base.tokens_per_step
    if kind == "tp_strong":
        return scaled.tokens_per_step == base.tokens_per_step
    return True


EFFICIENCY_LABEL = {"dp": "DP", "tp_strong": "TP strong", "tp_weak": "TP weak"}


def format_table(cases: list[dict], stats: dict[str, RunStats], found: dict[str, dict]) -> str:
    by_scaled = {e["scaled"]: (kind, e) for kind, e in found.items()}
    baselines = {e["baseline"] for e in found.values()}
    lines = ["| config | GPUs | tokens/s | tokens/s/GPU | step ms | efficiency | peak GiB (rank 0) | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        s = stats.get(case["name"])
        label = f"{case['name']}: {case['description']}"
        if s is None:
            lines.append(f"| {label} | {case['gpus']} | {case['status']} | | | | | |")
            continue
        if case["name"] in by_scaled:
            kind, e = by_scaled[case["name"]]
            eff = f"{EFFICIENCY_LABEL[kind]} {100 * e['value']:.1f}%" + ("" if e["comparable"] else " (batch differs!)")
        else:
            eff = "baseline" if case["name"] in baselines else ""
        peak = f"{s.peak_mem_gib:.1f}" if s.peak_mem_gib is not None else ""
        mfu = f"{100 * s.mfu:.1f}%" if s.mfu is not None else ""
        lines.append(f"| {label} | {s.gpus} | {s.tokens_per_s:,.0f} | {s.tokens_per_s_per_gpu:,.0f} | "
                     f"{1000 * s.step_time_s:.1f} | {eff} | {peak} | {mfu} |")
    return "\n".join(lines)


def summarize(work: str | Path, out: Optional[str | Path] = None, warmup: Optional[int] = None,
              quiet: bool = False) -> dict:
    """Read every finished case under `work`, write scaling.json and scaling.txt (to `out` too)."""
    work = Path(work)
    manifest = json.loads((work / MANIFEST).read_text())
    warmup = manifest["warmup"] if warmup is None else warmup
    stats, errors = {}, {}
    for case in manifest["cases"]:
        if case["status"] != "ok":
            continue
        run_dir = work / case["name"]
        try:
            stats[case["name"]] = summarize_run(read_metrics(run_dir), read_tokens_per_step(run_dir),
                                                case["gpus"], warmup)
        except ScalingError as err:
            case["status"], errors[case["name"]] = "unreadable", str(err)
    scaled = [c["gpus"] for c in manifest["cases"] if c["gpus"] > 1]
    found = efficiencies(stats, max(scaled) if scaled else 2)
    table = format_table(manifest["cases"], stats, found)
    result = {"warmup_steps_skipped": warmup, "cases": manifest["cases"],
              "runs": {name: asdict(s) for name, s in stats.items()}, "efficiency": found, "errors": errors,
              "table": table}
    for folder in {work, Path(out)} if out else {work}:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / RESULT).write_text(json.dumps(result, indent=2) + "\n")
        (Path(folder) / TABLE).write_text(table + "\n")
    if not quiet:
        print(table)
        for name, message in errors.items():
            print(f"[scaling] {name}: {message}")
        for case in manifest["cases"]:
            if case["status"] not in ("ok", "planned") and not case["status"].startswith("skipped"):
                _print_log_tail(work / f"{case['name']}.log", case["name"])
    return result


def _print_log_tail(log: Path, name: str, lines: int = 25) -> None:
    if log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"[scaling] last lines of {log}:\n" + "\n".join(f"  {name}| {line}" for line in tail))


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="launch every case, then summarize")
    run.add_argument("--work", required=True, help="run dirs, recipes and logs go here")
    run.add_argument("--out", help="also copy scaling.json and scaling.txt here")
    run.add_argument("--cases", help="comma list among dp1,dpN,tp1,tpN,tpN_weak (default all)")
    run.add_argument("--gpus", type=int, default=2, help="GPUs of the scaled runs (N)")
    run.add_argument("--steps", type=int, default=12)
    run.add_argument("--warmup", type=int, default=4, help="logged steps skipped before the median")
    run.add_argument("--precision", default="bf16")
    run.add_argument("--seed", type=int, default=1234)
    run.add_argument("--data-cache", help="data.cache_dir (default ~/.cache/falcon_h1_train)")
    run.add_argument("--cuda-graph", action="store_true", help="pass train.cuda_graph=true")
    run.add_argument("--override", action="append", default=[], help="extra Hydra override, every case")
    run.add_argument("--dp-model", default="falcon_h1_0_5b")
    run.add_argument("--dp-seq", type=int, default=4096)
    run.add_argument("--dp-micro-batch", type=int, default=4)
    run.add_argument("--dp-override", action="append", default=[])
    run.add_argument("--tp-model", default="falcon_h1_34b")
    run.add_argument("--tp-layers", type=int, default=4, help="layers at TP=1 (and TP=N); weak: N x this")
    run.add_argument("--tp-seq", type=int, default=4096)
    run.add_argument("--tp-micro-batch", type=int, default=1)
    run.add_argument("--tp-global-batch", type=int, default=4)
    run.add_argument("--tp-override", action="append", default=[])
    run.add_argument("--run-timeout-s", type=float, default=300)
    run.add_argument("--deadline-s", type=float, default=0, help="whole suite's budget; 0 = none")
    run.add_argument("--min-run-s", type=float, default=60, help="skip a case with less budget left")
    run.add_argument("--dryrun", action="store_true", help="compose, validate, print the commands; launch nothing")
    summ = sub.add_parser("summarize", help="re-read the runs under --work")
    summ.add_argument("--work", required=True)
    summ.add_argument("--out")
    summ.add_argument("--warmup", type=int)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # `python benchmarks/scaling.py` from a plain checkout
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            result = run_cases(args)
        else:
            result = summarize(args.work, args.out, args.warmup)
    except ScalingError as err:
        print(f"scaling: error: {err}", file=sys.stderr)
        return 2
    if getattr(args, "dryrun", False):
        return 0
    return 0 if all(c["status"] == "ok" for c in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
