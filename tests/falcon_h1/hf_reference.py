"""A random-weight Hugging Face FalconH1 with every multiplier != 1 (the parity reference)."""

import torch
from transformers import FalconH1Config, FalconH1ForCausalLM


def make_hf_model(seed: int = 0, **overrides) -> FalconH1ForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2,
        mamba_d_state=8, mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False,
        embedding_multiplier=1.3, lm_head_multiplier=0.7, key_multiplier=0.6, attention_in_multiplier=1.2,
        attention_out_multiplier=0.8, ssm_in_multiplier=1.1, ssm_out_multiplier=0.9,
        ssm_multipliers=[0.5, 0.6, 0.7, 0.8, 0.9], mlp_multipliers=[1.4, 0.6], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )
    kwargs.update(overrides)
    model = FalconH1ForCausalLM(FalconH1Config(**kwargs)).eval()
    with torch.no_grad():  # move SSM params and norms off their constant inits
        for name, p in model.named_parameters():
            if any(k in name for k in ("A_log", "dt_bias", "mamba.D", "norm")):
                p.add_(torch.randn_like(p) * 0.1)
    return model
