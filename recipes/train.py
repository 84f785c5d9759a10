"""`falcon-train`: the Hydra app that composes configs/ into a recipe and runs it.

    falcon-train                                   # tiny model, bundled corpus, CPU
    falcon-train model=falcon_h1_0_5b train=pretrain parallel.tp=2 bitnet=on
    falcon-train --cfg job model=falcon_h1_34b parallel.tp=8   # print, allocate nothing
    falcon-train --cfg job model=falcon_h1_0_5b model.hidden_size=1536 mup=derived   # new width, µP multipliers
    falcon-train dryrun=true executor=slurm executor.slurm.nodes=4
    falcon-train -m train.lr=1e-3,3e-3             # sweep
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from falcon_h1.errors import ConfigValueError
from launchers import ClusterError
from recipes.api import CONFIG_DIR, register_schema, run
from recipes.hydra_copies import register_output_dir_resolver, run_dir_is_here, scrub_hydra_copies
from recipes.recipe_file import recipe_to_yaml, to_recipe, without_environment_values
from recipes.run_errors import RunError

register_schema()
register_output_dir_resolver()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def _app(composed: DictConfig):
    scrub_hydra_copies(HydraConfig.get())
    try:
        recipe = to_recipe(composed)
        if run_dir_is_here(recipe.executor.kind, recipe.executor.slurm.tunnel):
            # Hydra made this directory (and resolved ${now:}) once; remote executors keep the
            # relative run_dir, which the launcher places on the job's volume / job_dir. A dry run
            # names the directory a real run would make (Hydra wrote into a scratch one).
            output_dir = HydraConfig.get().runtime.output_dir
            recipe.train.run_dir = os.path.abspath(recipe.train.run_dir) if recipe.dryrun else output_dir
        result = run(recipe)
        if recipe.dryrun:  # validated by run(); nothing was started
            print(recipe_to_yaml(without_environment_values(recipe)))
    except (ConfigValueError, ClusterError) as err:  # a setting to change, or a cluster that refused
        print(f"falcon-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunError as err:  # a run that cannot go on (checkpoint, divergence): the message says what to do
        print(f"falcon-train: error: {err}", file=sys.stderr)
        sys.exit(1)
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
    if not _is_dry_run(sys.argv[1:]):
        _run_app()
        return
    # Hydra makes its run directory (train.run_dir) before the app runs; a dry run starts
    # nothing, so it must leave nothing behind: Hydra's directory is a scratch one here.
    scratch = tempfile.mkdtemp(prefix="falcon-train-dryrun-")
    sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    try:
        _run_app()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_app() -> None:
    """The Hydra app, with Hydra's own errors (a key no config has, an unknown group option, a
    value of the wrong type, an override it cannot parse) reported as settings to change: one
    `falcon-train: error:` paragraph and exit code 2, as the recipe's checks are. Hydra prints
    them itself and exits 1 unless HYDRA_FULL_ERROR asks it to raise them, which it does here;
    a user who sets HYDRA_FULL_ERROR=1 still gets Hydra's full stack trace."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        _app()
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _app()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"falcon-train: error: {_hydra_error_text(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


def _hydra_error_text(err: Exception) -> str:
    """Hydra's message and the OmegaConf error under it, without OmegaConf's type lines and
    Hydra's config search path."""
    parts = [str(err)]
    if err.__cause__ is not None and str(err.__cause__) not in parts[0]:
        parts.append(str(err.__cause__))
    text = "\n".join(parts).split("\nConfig search path:")[0]
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines
                     if line.strip() and not line.lstrip().startswith(("reference_type=", "object_type=")))


def _is_dry_run(args: list[str]) -> bool:
    """`dryrun=true` (or ++dryrun=true) on the command line of a single run (not a -m sweep)."""
    if any(a in ("-m", "--multirun") for a in args):
        return False
    return any(a.split("=", 1)[0].lstrip("+") == "dryrun" and a.split("=", 1)[1].lower() == "true"
               for a in args if "=" in a and not a.startswith("-"))


if __name__ == "__main__":
    main()
