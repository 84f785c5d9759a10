"""Model presets: the released Falcon-H1 sizes and tiny sizes for CPU. The one definition of each.

Falcon-H1-0.5B, -1.5B-Deep, -7B and -34B are the published configurations: the
`config.json` of each tiiuae/Falcon-H1-<size>-Instruct as quoted by TII's own
Megatron-Bridge providers (`FalconH1ModelProvider{500M,1P5BDeep,7B,34B}`, Megatron-Bridge
pull request 1462) and its unit-test fixture of the 0.5B; every field, multipliers included.

No config.json of Falcon-H1-1.5B (non-Deep) or Falcon-H1-3B was found in any reachable
source: their shapes come from third-party test fixtures (unverified), and their µP
multipliers are *derived*, not published: `falcon_h1.mup.derive_multipliers` applied to
their widths (`DERIVED_MULTIPLIERS` names them). The width relations agree with an
outside test suite's 1.5B value (lm_head_multiplier 0.01953125 = 40 / 2048).
"""

from __future__ import annotations

import copy

from falcon_h1.config import FalconH1Config
from falcon_h1.mup import with_derived_multipliers

_RELEASED = dict(
    rope_theta=1e11, rms_norm_eps=1e-5, initializer_range=0.02, mamba_d_conv=4, mamba_expand=2,
    mamba_conv_bias=True, mamba_proj_bias=False, mamba_norm_before_gate=False, mamba_rms_norm=True,
    projectors_bias=False, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
    attention_in_multiplier=1.0, embedding_multiplier=5.656854249492381, mamba_n_groups=1,
    mamba_chunk_size=128, kernel_backend="auto",
)
_SSM_MULTIPLIERS = [0.3535533905932738, 0.25, 0.1767766952966369, 0.5, 0.3535533905932738]


def _released(name: str, **fields) -> FalconH1Config:
    return FalconH1Config(name=name, **{**_RELEASED, **fields})


# Multipliers derived from the width relations, not published (see the module docstring).
DERIVED_MULTIPLIERS = ("falcon_h1_1_5b", "falcon_h1_3b")

PRESETS: dict[str, FalconH1Config] = {
    "falcon_h1_0_5b": _released(
        "falcon_h1_0_5b", vocab_size=32784, hidden_size=1024, intermediate_size=2048, num_hidden_layers=36,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24,
        mamba_d_head=64, mamba_d_state=128, mamba_rms_norm=False, max_position_embeddings=16384,
        lm_head_multiplier=0.0390625, key_multiplier=0.39062499999999994, attention_out_multiplier=0.9375,
        ssm_in_multiplier=1.25, ssm_out_multiplier=0.23570226039551587,
        ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
        mlp_multipliers=[0.8838834764831844, 0.5859375],
    ),
    "falcon_h1_1_5b": with_derived_multipliers(_released(
        "falcon_h1_1_5b", vocab_size=65537, hidden_size=2048, intermediate_size=4608, num_hidden_layers=24,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, mamba_d_ssm=3072, mamba_n_heads=48,
        mamba_d_head=64, mamba_d_state=256, max_position_embeddings=131072,
    )),
    "falcon_h1_1_5b_deep": _released(
        "falcon_h1_1_5b_deep", vocab_size=65537, hidden_size=1280, intermediate_size=3072, num_hidden_layers=66,
        num_attention_heads=6, num_key_value_heads=2, head_dim=128, mamba_d_ssm=1536, mamba_n_heads=24,
        mamba_d_head=64, mamba_d_state=256, max_position_embeddings=131072,
        lm_head_multiplier=0.03125, key_multiplier=0.17677669529663687, attention_out_multiplier=0.5,
        ssm_in_multiplier=1.0, ssm_out_multiplier=0.23570226039551587, ssm_multipliers=_SSM_MULTIPLIERS,
        mlp_multipliers=[0.7071067811865476, 0.3125],
    ),
    "falcon_h1_3b": with_derived_multipliers(_released(
        "falcon_h1_3b", vocab_size=65537, hidden_size=2560, intermediate_size=6144, num_hidden_layers=32,
        num_attention_heads=10, num_key_value_heads=2, head_dim=128, mamba_d_ssm=4096, mamba_n_heads=32,
        mamba_d_head=128, mamba_d_state=256, max_position_embeddings=131072,
    )),
    "falcon_h1_7b": _released(
        "falcon_h1_7b", vocab_size=130049, hidden_size=3072, intermediate_size=12288, num_hidden_layers=44,
        num_attention_heads=12, num_key_value_heads=2, head_dim=128, mamba_d_ssm=3072, mamba_n_heads=24,
        mamba_d_head=128, mamba_d_state=256, mamba_chunk_size=256, max_position_embeddings=262144,
        lm_head_multiplier=0.013020833333333334, key_multiplier=0.030690398488999456,
        attention_out_multiplier=0.10416666666666667, ssm_in_multiplier=0.4166666666666667,
        ssm_out_multiplier=0.11785113019775793, ssm_multipliers=_SSM_MULTIPLIERS,
        mlp_multipliers=[0.2946278254943948, 0.032552083333333336],
    ),
    "falcon_h1_34b": _released(
        "falcon_h1_34b", vocab_size=261120, hidden_size=5120, intermediate_size=21504, num_hidden_layers=72,
        num_attention_heads=20, num_key_value_heads=4, head_dim=128, mamba_d_ssm=4096, mamba_n_heads=32,
        mamba_d_head=128, mamba_n_groups=2, mamba_d_state=256, max_position_embeddings=262144,
        lm_head_multiplier=0.0078125, key_multiplier=0.011048543456039804, attention_out_multiplier=0.0375,
        ssm_in_multiplier=0.25, ssm_out_multiplier=0.08838834764831845, ssm_multipliers=_SSM_MULTIPLIERS,
        mlp_multipliers=[0.1767766952966369, 0.011160714285714284],
    ),
    # CPU sizes. tiny: the embedded default run (byte-level vocab 320 = 256 bytes + specials, padded).
    "falcon_h1_tiny": FalconH1Config(
        name="falcon_h1_tiny", vocab_size=320, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, mamba_d_ssm=128, mamba_n_heads=8,
        mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=32, max_position_embeddings=4096,
        embedding_multiplier=5.656854249492381, lm_head_multiplier=0.25, key_multiplier=0.5,
        ssm_out_multiplier=0.5, attention_out_multiplier=0.5,
    ),
    "falcon_h1_micro": FalconH1Config(
        name="falcon_h1_micro", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4,
        mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=16, max_position_embeddings=1024,
    ),
}

# Short names used by the Python API and falcon-bench.
SIZES = {
    "0.5b": "falcon_h1_0_5b", "1.5b": "falcon_h1_1_5b", "1.5b-deep": "falcon_h1_1_5b_deep", "3b": "falcon_h1_3b",
    "7b": "falcon_h1_7b", "34b": "falcon_h1_34b", "tiny": "falcon_h1_tiny", "micro": "falcon_h1_micro",
}


def get_preset(name: str) -> FalconH1Config:
    name = SIZES.get(name, name)
    if name not in PRESETS:
        raise KeyError(
            f"model preset {name!r} is unknown; allowed: {', '.join(sorted(PRESETS))}."
        )
    return copy.deepcopy(PRESETS[name])
