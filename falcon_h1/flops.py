"""Model FLOPs of a Falcon-H1 training step, counted from the shape (for TFLOP/s and MFU).

Counted per token, forward; training = 3x forward (backward = 2x). Matmuls count
2 FLOPs per multiply-add. Causal attention averages seq/2 keys per query; the SSD
scan counts its chunked form: intra-chunk scores C.B and their application to x
(chunk/2 positions on average), plus writing and reading the chunk state.
"""

from __future__ import annotations

from falcon_h1.config import FalconH1Config


def forward_flops_per_token(cfg: FalconH1Config, seq_length: int) -> float:
    H, d = cfg.hidden_size, cfg.kv_channels
    flops = 0.0
    for kind in cfg.layer_kinds:
        if kind in ("hybrid", "attention"):
            hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
            flops += 2 * H * (hq + 2 * hkv) * d + 2 * hq * d * H          # qkv, out projection
            flops += 2 * 2 * hq * d * (seq_length / 2)                     # scores + weighted sum
        if kind in ("hybrid", "mamba"):
            d_ssm, nh, N = cfg.d_ssm, cfg.mamba_n_heads, cfg.mamba_d_state
            p, Q, gN = cfg.ssm_head_dim, min(cfg.mamba_chunk_size, seq_length), cfg.mamba_n_groups * cfg.mamba_d_state
            flops += 2 * H * (2 * d_ssm + 2 * gN + nh) + 2 * d_ssm * H      # in, out projection
            flops += 2 * (d_ssm + 2 * gN) * cfg.mamba_d_conv                # depthwise conv
            flops += nh * (Q * (N + p) + 4 * N * p)                         # SSD chunked scan
        flops += 2 * H * 2 * cfg.intermediate_size + 2 * cfg.intermediate_size * H  # SwiGLU MLP
    flops += 2 * H * cfg.vocab_size                                         # LM head
    return flops


def training_flops_per_token(cfg: FalconH1Config, seq_length: int) -> float:
    return 3.0 * forward_flops_per_token(cfg, seq_length)


# Dense bf16 tensor-core peak (no sparsity) by the name CUDA reports, from NVIDIA's data sheets
# (SXM parts); the H200 has the H100's compute with more memory.
DENSE_BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def dense_bf16_peak_flops(device_name: str) -> float:
    """Peak FLOP/s of the accelerator called `device_name` (torch.cuda.get_device_name), for MFU;
    0.0 where it is not in the table."""
    for key, peak in DENSE_BF16_PEAK_FLOPS.items():
        if key in device_name:
            return peak
    return 0.0
