"""`falcon-train`: the Hydra app that composes configs/ into a recipe and runs it.

    falcon-train                                   # tiny model, bundled corpus, CPU
    falcon-train model=falcon_h1_0_5b train=pretrain parallel.tp=2 bitnet=on
    falcon-train --cfg job model=falcon_h1_34b parallel.tp=8   # print, allocate nothing
    falcon-train --cfg job model=falcon_h1_0_5b model.hidden_size=1536 mup=derived   # new width, µP multipliers
    falcon-train dryrun=true executor=slurm executor.slurm.nodes=4
    falcon-train -m train.lr=1e-3,3e-3             # sweep
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from recipes.api import CONFIG_DIR, recipe_to_yaml, register_schema, run, to_recipe

register_schema()


def _print_summary(summary) -> None:
    print(
        f"\nfinished {summary.steps} steps: loss {summary.first_loss:.4f} -> {summary.final_loss:.4f} "
        f"({100 * (1 - summary.final_loss / summary.first_loss):.1f}% lower), {summary.tokens_per_s:,.0f} tokens/s\n"
        f"run dir:     {summary.run_dir}\n"
        f"checkpoints: {summary.checkpoint_dir}\n"
        f"metrics:     {summary.run_dir}/metrics.jsonl, TensorBoard: tensorboard --logdir {summary.run_dir}/tensorboard\n"
        f"W&B (offline unless WANDB_API_KEY): wandb sync {summary.run_dir}/wandb/offline-run-*\n"
        f"report:      falcon-report {summary.run_dir}"
        + (f"\nCUDA graph:  captured at step {summary.cuda_graph_step}, replayed after"
           if summary.cuda_graph_step else "")
        + (f"\nsample:      {summary.sample}" if summary.sample else "")
    )


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def _app(cfg: DictConfig):
    from falcon_h1.config import ConfigError
    from launchers import ClusterError
    from recipes.build import RecipeError

    recipe = to_recipe(cfg)
    ex = recipe.executor
    if ex.kind == "local" or (ex.kind == "slurm" and ex.slurm.tunnel == "local"):
        # Hydra made this directory (and resolved ${now:}) once; remote executors keep the
        # relative run_dir, which the launcher places on the job's volume / job_dir.
        recipe.train.run_dir = HydraConfig.get().runtime.output_dir
    try:
        result = run(recipe)
        if recipe.dryrun:  # validated by run(); nothing was started
            print(recipe_to_yaml(recipe))
    except (ConfigError, RecipeError, ValueError, FileNotFoundError, KeyError, ClusterError) as err:
        print(f"falcon-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if hasattr(result, "final_loss"):
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            _print_summary(result)
    elif result is not None:
        print(result)
    return result


def main() -> None:
    from recipes.build import RecipeError, check_overrides

    try:
        check_overrides(a for a in sys.argv[1:] if not a.startswith("-"))
    except RecipeError as err:
        print(f"falcon-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in sys.argv) and "--resolve" not in sys.argv:
        sys.argv.append("--resolve")  # print the µP multipliers (interpolations) as the values they resolve to
    _app()


if __name__ == "__main__":
    main()
