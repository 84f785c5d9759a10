"""The check that a run's gradients and AdamW state fit on its GPU, against the mixed-precision
Adam budget of the ZeRO and Megatron papers (beyond the bf16 weights: 4 bytes of fp32 gradient,
4 of fp32 master weight and 8 of Adam moments; ZeRO-1 / the distributed optimizer splits the 12
of optimizer state over the data-parallel ranks) and a Hugging Face model's parameter count."""

import pytest
import torch

from falcon_h1.errors import ConfigValueError
from recipes.memory_budget import check_training_state_fits, gradient_and_optimizer_bytes, offloaded_optimizer_bytes


def test_bf16_and_fp32_parameters_take_the_mixed_precision_adam_budget():
    params = [torch.empty(1000, dtype=torch.bfloat16), torch.empty(10, 3, dtype=torch.float32)]
    assert gradient_and_optimizer_bytes(params, 1) == 1000 * 16 + 30 * 12
    assert gradient_and_optimizer_bytes(params, 8) == 1000 * 4 + 1000 * 12 // 8 + 30 * 4 + 30 * 8 // 8


def test_the_micro_model_counts_the_parameters_hugging_face_has(megatron_single):
    from transformers import FalconH1Config, FalconH1ForCausalLM

    from falcon_h1.hf import config_to_hf
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    cfg = get_preset("falcon_h1_micro")
    hf_count = FalconH1ForCausalLM(FalconH1Config(**config_to_hf(cfg))).num_parameters()
    # the embedding and output rows padded from 128 to the model's 512-row unit of vocabulary
    padding = 2 * (512 - cfg.vocab_size) * cfg.hidden_size
    model = build_model(cfg, precision="fp32", seed=0)
    assert gradient_and_optimizer_bytes(model.parameters(), 1) == (hf_count + padding) * (4 + 8)


def test_a_state_larger_than_the_free_memory_is_refused_naming_the_layout():
    params = [torch.empty(2**20, dtype=torch.bfloat16)]  # 16 MiB of gradients and optimizer state
    check_training_state_fits(params, 1, 16 * 2**20, 80 * 2**30, tp=1, pp=1, distributed_optimizer=False)
    with pytest.raises(ConfigValueError) as err:
        check_training_state_fits(params, 1, 16 * 2**20 - 1, 80 * 2**30, tp=1, pp=1, distributed_optimizer=False)
    message = str(err.value)
    assert err.value.key == "parallel.tp"
    for part in ("1,048,576 parameters", "parallel.tp = 1", "parallel.pp = 1", "of the GPU's 80.0 GiB",
                 "parallel.distributed_optimizer=true"):
        assert part in message, (part, message)


def test_the_training_check_reads_the_free_memory_and_the_optimizer_shards(megatron_single, monkeypatch):
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset
    from recipes.config import ParallelConfig
    from recipes.training import _check_training_state_fits

    model = build_model(get_preset("falcon_h1_micro"), precision="fp32", seed=0)
    need = sum(p.numel() for p in model.parameters()) * 12
    cached = 1000  # bytes torch's allocator holds without using: free for the optimizer
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: cached)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (need - cached, 2 * need))
    _check_training_state_fits(model, ParallelConfig())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (need - cached - 1, 2 * need))
    with pytest.raises(ConfigValueError, match="parallel.tp = 1"):
        _check_training_state_fits(model, ParallelConfig(distributed_optimizer=True))


def test_an_offloaded_share_of_the_state_moves_from_the_gpu_to_the_host():
    # 1,000 bf16 weights over 4 optimizer shards: 250 a rank, 12 bytes of state each, a quarter of
    # it offloaded; on the host an offloaded weight holds its fp32 master (4), moments (8) and a
    # pinned fp32 gradient copy (4); the fp32 gradient buffer stays on the GPU whole
    params = [torch.empty(1000, dtype=torch.bfloat16)]
    assert gradient_and_optimizer_bytes(params, 4, 0.25) == 1000 * 4 + 250 * 12 * 3 // 4
    assert offloaded_optimizer_bytes(params, 4, 0.25) == 1000  # 250 x 0.25 offloaded x 16 bytes
    assert gradient_and_optimizer_bytes(params, 1, 1.0) == 1000 * 4


def test_an_offload_the_host_cannot_hold_is_refused_naming_the_fraction():
    params = [torch.empty(2**20, dtype=torch.bfloat16)]
    host = 2 * 2**20 * 16  # two processes' whole state, exactly
    check_training_state_fits(params, 1, 2**30, 80 * 2**30, tp=1, pp=1, distributed_optimizer=True,
                              offload_fraction=1.0, host_free_bytes=host, ranks_per_host=2)
    with pytest.raises(ConfigValueError) as err:
        check_training_state_fits(params, 1, 2**30, 80 * 2**30, tp=1, pp=1, distributed_optimizer=True,
                                  offload_fraction=1.0, host_free_bytes=host - 1, ranks_per_host=2)
    assert err.value.key == "train.optimizer_offload_fraction"
    assert "2 training process(es) on this host" in str(err.value)
    assert "a smaller train.optimizer_offload_fraction" in str(err.value)


def test_the_gpu_refusal_offers_the_offload():
    params = [torch.empty(2**20, dtype=torch.bfloat16)]
    with pytest.raises(ConfigValueError, match="train.optimizer_offload_fraction > 0 with parallel.distributed_"):
        check_training_state_fits(params, 1, 2**20, 80 * 2**30, tp=1, pp=1, distributed_optimizer=False)
    # with everything offloaded only the 4 MiB of gradients stay on the GPU
    check_training_state_fits(params, 1, 4 * 2**20, 80 * 2**30, tp=1, pp=1, distributed_optimizer=True,
                              offload_fraction=1.0)


def test_the_training_check_weighs_the_offloaded_share_against_the_hosts_memory(megatron_single, monkeypatch):
    import recipes.training
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset
    from recipes.config import ParallelConfig
    from recipes.training import _check_training_state_fits

    model = build_model(get_preset("falcon_h1_micro"), precision="fp32", seed=0)
    host_need = sum(p.numel() for p in model.parameters()) * 16  # all of it offloaded, one process
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (2**40, 2**40))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(recipes.training, "_host_available_bytes", lambda: host_need)
    _check_training_state_fits(model, ParallelConfig(distributed_optimizer=True), 1.0)
    monkeypatch.setattr(recipes.training, "_host_available_bytes", lambda: host_need - 1)
    with pytest.raises(ConfigValueError) as err:
        _check_training_state_fits(model, ParallelConfig(distributed_optimizer=True), 1.0)
    assert err.value.key == "train.optimizer_offload_fraction"
    _check_training_state_fits(model, ParallelConfig(distributed_optimizer=True), 0.0)  # nothing on the host
