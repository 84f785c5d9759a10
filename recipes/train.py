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

from falcon_h1.errors import ConfigValueError
from launchers import ClusterError
from recipes.api import CONFIG_DIR, register_schema, run
from recipes.hydra_copies import register_output_dir_resolver, run_dir_is_here, scrub_hydra_copies
from recipes.recipe_file import recipe_to_yaml, to_recipe, without_environment_values

register_schema()
register_output_dir_resolver()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def _app(composed: DictConfig):
    scrub_hydra_copies(HydraConfig.get())
    recipe = to_recipe(composed)
    if run_dir_is_here(recipe.executor.kind, recipe.executor.slurm.tunnel):
        # Hydra made this directory (and resolved ${now:}) once; remote executors keep the
        # relative run_dir, which the launcher places on the job's volume / job_dir.
        recipe.train.run_dir = HydraConfig.get().runtime.output_dir
    try:
        result = run(recipe)
        if recipe.dryrun:  # validated by run(); nothing was started
            print(recipe_to_yaml(without_environment_values(recipe)))
    except (ConfigValueError, ClusterError) as err:  # a setting to change, or a cluster that refused
        print(f"falcon-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if hasattr(result, "final_loss"):
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(result.report())
    elif result is not None:
        print(result)
        if not result.dryrun and result.exit_code:
            # A job that waited for its workers (executor.kind=local) and failed: the shell, a
            # CI step or a sweep driver must see the failure, not only read `state: FAILED`.
            sys.exit(result.exit_code)
    return result


def main() -> None:
    from recipes.build import check_overrides

    try:
        check_overrides(a for a in sys.argv[1:] if not a.startswith("-"))
    except ConfigValueError as err:
        print(f"falcon-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in sys.argv) and "--resolve" not in sys.argv:
        sys.argv.append("--resolve")  # print the µP multipliers (interpolations) as the values they resolve to
    _app()


if __name__ == "__main__":
    main()
