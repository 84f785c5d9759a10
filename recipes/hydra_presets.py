"""The model presets and µP modes as Hydra sees them.

Each preset of `falcon_h1.presets` is registered once, as the config-store entry
`model_preset/<name>`; `configs/model/<name>.yaml` names it in its defaults list and holds
only overrides. A preset's 14 µP multipliers are stored as `${falcon_mup:<preset>,<field>}`
interpolations, resolved when the recipe is composed according to `mup.mode`:

- `preset`: the preset's own values (published, or derived for 1.5B and 3B);
- `derived`: `falcon_h1.mup.derive_multipliers` of the composed model's widths, so
  `model=falcon_h1_0_5b model.hidden_size=1536 mup=derived` gives lm_head_multiplier 40/1536;
- `unit`: all 1.

A multiplier set explicitly (`model.lm_head_multiplier=0.02`) replaces its interpolation, so
it wins in every mode; `recipes.build.mup_report` names such overrides when the recipe runs.
"""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from falcon_h1.config import FalconH1Config, apply_attention_ratio
from falcon_h1.errors import ConfigValueError
from falcon_h1.mup import LIST_MULTIPLIERS, MODES, MULTIPLIER_FIELDS, derive_multipliers, unit_multipliers
from falcon_h1.presets import PRESETS

RESOLVER = "falcon_mup"
PRESET_GROUP = "model_preset"
# The fields the width relations read (plus what reshapes them: attention_ratio, layer_pattern).
_WIDTH_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "mamba_d_ssm", "mamba_expand", "mamba_n_heads", "mamba_d_head", "mamba_n_groups",
    "mamba_d_state", "attention_ratio", "layer_pattern",
)


def multipliers_for_mode(mode: str, preset: FalconH1Config | None, model: FalconH1Config) -> dict:
    """The 14 multipliers `mup.mode` gives `model` (preset: the preset's values)."""
    if mode == "preset":
        if preset is None:
            raise ConfigValueError("mup.mode", mode, "derived or unit for a model that is not a preset",
                                   message="mup.mode = 'preset' needs a model preset")
        return {name: getattr(preset, name) for name in MULTIPLIER_FIELDS}
    if mode == "derived":
        return derive_multipliers(apply_attention_ratio(model))
    if mode == "unit":
        return unit_multipliers()
    raise ConfigValueError("mup.mode", mode, f"one of {MODES}")


def _resolve_multiplier(preset_name: str, field: str, *, _root_):
    widths = {name: _root_.model[name] for name in _WIDTH_FIELDS}
    value = multipliers_for_mode(_root_.mup.mode, PRESETS[preset_name], FalconH1Config(**widths))[field]
    return list(value) if field in LIST_MULTIPLIERS else value


def preset_node(name: str) -> dict:
    """The config-store entry of one preset: every field, multipliers as interpolations."""
    node = dataclasses.asdict(PRESETS[name])
    for field in MULTIPLIER_FIELDS:
        node[field] = f"${{{RESOLVER}:{name},{field}}}"
    return node


def register_presets() -> None:
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve_multiplier)
    store = ConfigStore.instance()
    for name in PRESETS:
        store.store(group=PRESET_GROUP, name=name, node=preset_node(name))
