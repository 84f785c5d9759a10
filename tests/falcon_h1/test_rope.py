"""RoPE frequencies of every type against transformers' FalconH1RotaryEmbedding (cos and sin), and
the rotation itself (kernels.rotary_reference / rotary_qkv's reference path) against Megatron's
apply_rotary_pos_emb and transformers' apply_rotary_pos_emb. The Triton kernel is checked against
float64 in Triton's interpreter (triton_interpret_worker.py, check_rotary) and on the GPU
(test_gpu_paths.py)."""

import pytest
import torch
from transformers import FalconH1Config as HFConfig
from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RotaryEmbedding

from falcon_h1.config import FalconH1Config, validate
from falcon_h1.errors import ConfigValueError
from falcon_h1.rope import RotaryFrequencies, attention_scaling

HEAD_DIM, MAX_POS = 16, 64
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.7,
                    "mscale_all_dim": 0.3, "beta_fast": 16, "truncate": False},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32,
                 "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [2.0 + 0.5 * i for i in range(HEAD_DIM // 2)]},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0},
    "legacy_type_key": {"type": "linear", "factor": 2.0},
}


def _configs(scaling, theta=1e4):
    ours = FalconH1Config(head_dim=HEAD_DIM, max_position_embeddings=MAX_POS, rope_theta=theta, rope_scaling=scaling)
    hf = HFConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM, max_position_embeddings=MAX_POS,
                  mamba_d_ssm=64, mamba_n_heads=8, rope_parameters={**(scaling or {}), "rope_theta": theta})
    return ours, hf


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("length", [20, 40, 100])  # below and above the scaling thresholds
def test_cos_sin_equal_transformers(name, length):
    ours, hf_cfg = _configs(SCALINGS[name])
    positions = torch.stack([torch.arange(length), torch.arange(length) + 3])  # two rows, own positions
    hf_cos, hf_sin = FalconH1RotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), positions)
    angles = RotaryFrequencies(ours)(length, positions)           # [s, b, 1, d]
    assert angles.shape == (length, 2, 1, HEAD_DIM)
    scale = attention_scaling(ours)
    angles = angles[:, :, 0].transpose(0, 1)
    # Megatron's apply_rotary_pos_emb multiplies cos and sin by mscale in fp32, as transformers does
    assert torch.equal(torch.cos(angles) * scale, hf_cos) and torch.equal(torch.sin(angles) * scale, hf_sin)


def test_without_position_ids_positions_count_from_zero():
    ours, _ = _configs(SCALINGS["yarn"])
    rotary = RotaryFrequencies(ours)
    assert torch.equal(rotary(12), rotary(12, torch.arange(12)[None]))
    assert rotary(12).shape == (12, 1, 1, HEAD_DIM)


def test_yarn_scales_attention():
    ours, _ = _configs(SCALINGS["yarn"])
    assert attention_scaling(ours) == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1.0)
    assert attention_scaling(_configs(SCALINGS["linear"])[0]) == 1.0


@pytest.mark.parametrize("scaling,message", [
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, "rope_type one of"),
    ({"rope_type": "yarn"}, "needs the keys ['factor']"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, "unknown: ['beta_fast']"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor 1.0"),
    ({"rope_type": "linear", "factor": "two"}, "factor a number"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "head_dim / 2 = 8"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "model.rope_theta"),
])
def test_unsupported_rope_settings_are_refused(scaling, message):
    cfg = FalconH1Config(head_dim=HEAD_DIM, rope_scaling=scaling)
    with pytest.raises(ConfigValueError) as err:
        validate(cfg)
    assert "model.rope_scaling" in str(err.value) and message in str(err.value)


def _rotation_inputs(dtype, seed=0):
    ours, _ = _configs(SCALINGS["yarn"])
    g = torch.Generator().manual_seed(seed)
    length, batch = 40, 2
    positions = torch.stack([torch.arange(length), torch.arange(length) + 7])
    t = torch.randn(length, batch, 3, HEAD_DIM, generator=g).to(dtype)   # [s, b, heads, d]
    return ours, t, RotaryFrequencies(ours)(length, positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_reference_equals_megatron_and_transformers(dtype):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from transformers.models.falcon_h1.modeling_falcon_h1 import apply_rotary_pos_emb as hf_apply

    from falcon_h1.kernels import rotary_reference

    ours, t, freqs = _rotation_inputs(dtype)
    scale = attention_scaling(ours)
    got = rotary_reference(t, freqs, scale)
    assert torch.equal(got, _apply_rotary_pos_emb_bshd(t, freqs, mscale=scale))
    # transformers: [b, heads, s, d] with cos / sin [b, s, d] already scaled and in the input dtype
    cos, sin = ((f(freqs[:, :, 0]) * scale).to(dtype).transpose(0, 1) for f in (torch.cos, torch.sin))
    hf_q, _ = hf_apply(t.permute(1, 2, 0, 3), t.permute(1, 2, 0, 3), cos, sin)
    assert torch.equal(got, hf_q.permute(2, 0, 1, 3))


def test_rotary_qkv_reference_path_rotates_q_and_k_and_passes_v():
    from falcon_h1.kernels import rotary_qkv, rotary_reference

    ours, t, freqs = _rotation_inputs(torch.float32)
    q_w, kv_w = 2 * HEAD_DIM, HEAD_DIM
    qkv = t.flatten(-2)[..., : q_w + 2 * kv_w]
    qkv = torch.cat([qkv, t.flatten(-2)[..., :kv_w] * 2], dim=-1)    # 2 q heads, 1 kv head
    q, k, v = rotary_qkv(qkv, freqs, q_w, kv_w, HEAD_DIM, 1.5, fast=False)
    assert q.shape == (40, 2, 2, HEAD_DIM) and k.shape == v.shape == (40, 2, 1, HEAD_DIM)
    assert torch.equal(q, rotary_reference(t[..., :2, :], freqs, 1.5))
    assert torch.equal(k, rotary_reference(t[..., 2:3, :], freqs, 1.5))
    assert torch.equal(v, t[..., :1, :] * 2)
