"""Our Megatron Falcon-H1 vs Hugging Face transformers' FalconH1 (CPU, fp32)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import falcon_h1
from tests.falcon_h1.hf_reference import make_hf_model


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, megatron_single):
    model = make_hf_model()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("seq_len", [16, 21])  # 21: not a multiple of the chunk size
def test_logits_match_transformers(hf_dir, fused, seq_len):
    path, hf_model = hf_dir
    ids = torch.randint(0, 97, (2, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = falcon_h1.from_hf(path, fused_projections=fused)(ids)
    assert got.shape == (2, seq_len, 97)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("overrides", [
    dict(mamba_rms_norm=False),
    dict(mamba_rms_norm=True, mamba_norm_before_gate=True),
    dict(tie_word_embeddings=True, mamba_n_groups=1),
])
def test_config_variants_match_transformers(tmp_path, megatron_single, overrides):
    hf_model = make_hf_model(seed=3, **overrides)
    hf_model.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(falcon_h1.from_hf(tmp_path)(ids), hf_model(ids).logits) <= 1e-5


def test_round_trip_is_byte_identical_and_loads_in_transformers(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf_model = hf_dir
    falcon_h1.to_hf(falcon_h1.from_hf(path), tmp_path)
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(before) == set(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)
    assert json.loads((tmp_path / "config.json").read_text())["ssm_multipliers"] == [0.5, 0.6, 0.7, 0.8, 0.9]


def test_missing_tensor_is_named(hf_dir, tmp_path):
    from safetensors.torch import save_file

    path, _ = hf_dir
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mamba.A_log"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(KeyError, match="model.layers.1.mamba.A_log"):
        falcon_h1.from_hf(tmp_path)


def test_missing_directory_is_named(tmp_path, megatron_single):
    with pytest.raises(FileNotFoundError, match="config.json"):
        falcon_h1.from_hf(tmp_path / "nope")
