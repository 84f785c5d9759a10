"""The Python API: build a recipe (the same object the CLI composes from YAML), edit
it, run it.

    import recipes
    recipe = recipes.falcon_h1_pretrain("0.5b", train={"max_steps": 1000}, parallel={"tp": 2})
    recipe.train.lr = 1e-3
    recipe.run()                       # or recipe.run(executor="slurm")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from falcon_h1.errors import ConfigValueError
from falcon_h1.presets import SIZES
from recipes.config import RecipeConfig
from recipes.recipe_file import to_recipe
from recipes.trained_model import load_trained_model  # noqa: F401 (part of the Python API)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    from recipes.hydra_presets import register_presets

    ConfigStore.instance().store(name="recipe_schema", node=RecipeConfig)
    register_presets()


def compose_recipe(overrides: Iterable[str] = ()) -> RecipeConfig:
    """Compose configs/config.yaml with Hydra override strings, exactly as `falcon-train` does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from recipes.build import check_overrides

    overrides = list(overrides)
    check_overrides(overrides)
    register_schema()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        composed = compose(config_name="config", overrides=overrides)
    return to_recipe(composed)


def _flatten(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in _flatten(f"{prefix}.{k}", v)]
    return [f"{prefix}={override_value(value)}"]


def override_value(value: Any) -> str:
    """`value` as a Hydra override writes it (`[1.0,0.5]`, `null`, `true`)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


CPU_SIZES = ("tiny", "micro", "falcon_h1_tiny", "falcon_h1_micro")


def _size_overrides(size: str, bitnet: bool, executor: str) -> list[str]:
    if size not in SIZES and size not in SIZES.values():
        raise ConfigValueError("size", size, ", ".join(SIZES))
    return [f"model={SIZES.get(size, size)}", f"bitnet={'on' if bitnet else 'off'}", f"executor={executor}"]


def _group_overrides(groups: dict) -> list[str]:
    overrides = []
    for group, values in groups.items():
        if not isinstance(values, dict):
            raise ConfigValueError(group, values, f"a dict of fields, e.g. {group}={{'field': value}}")
        overrides += _flatten(group, values)
    return overrides


def falcon_h1_pretrain(size: str = "tiny", *, bitnet: bool = False, executor: str = "local",
                       **groups: dict) -> RecipeConfig:
    """A pretraining recipe for a released size ("0.5b" ... "34b") or a CPU size ("tiny", "micro").

    Keyword groups override fields: train={"max_steps": 10}, parallel={"tp": 2}, model={...}.
    """
    overrides = _size_overrides(size, bitnet, executor)
    if size not in CPU_SIZES:
        overrides.append("train=pretrain")
    return compose_recipe(overrides + _group_overrides(groups))


def falcon_h1_sft(size: str = "tiny", *, load_dir: str | None = None, bitnet: bool = False,
                  executor: str = "local", **groups: dict) -> RecipeConfig:
    """A supervised fine-tuning recipe (`data=chat`: loss on assistant tokens, packed rows).

    Released sizes get `train=sft`, TII's published Falcon-H1 post-training settings (AdamW
    (0.9, 0.95), no weight decay, lr 128e-6 at ~1M-token batches, WSD decaying exponentially to
    lr / 8); the CPU sizes get `train=sft_demo` on the bundled chat set. `load_dir`: the weights to
    start from, a Hugging Face FalconH1 directory or a falcon-train run directory
    (train.load_dir). Keyword groups override fields as in falcon_h1_pretrain, e.g.
    data={"paths": ["chats.jsonl"], "tokenizer": "path/to/Falcon-H1-0.5B-Instruct"}.
    """
    overrides = _size_overrides(size, bitnet, executor)
    overrides.append("train=sft_demo" if size in CPU_SIZES else "train=sft")
    if load_dir is not None:
        overrides.append(f"train.load_dir={load_dir}")
    return compose_recipe(overrides + _group_overrides(groups))


def run(recipe: RecipeConfig, executor: str | None = None):
    """Train in this process (local, one process) or launch through an executor; both
    validate the recipe before anything starts."""
    import sys

    from recipes.build import mup_report

    if executor is not None:
        recipe.executor.kind = executor
    for line in mup_report(recipe):
        print(f"falcon-train: {line}", file=sys.stderr)
    if recipe.executor.kind == "local" and recipe.executor.nproc_per_node == 1 and not recipe.dryrun:
        from recipes.fallback_notices import announce_fallbacks

        announce_fallbacks()
        from recipes.training import train

        return train(recipe)  # validates first
    from recipes.build import validate_recipe
    from recipes.launch import launch

    validate_recipe(recipe)  # the executor's own settings: by the launcher
    return launch(recipe, dryrun=recipe.dryrun)
