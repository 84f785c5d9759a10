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


# ---- RoPE scaling, positions, loss mask ----
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 16,
                 "short_factor": [1.0 + 0.2 * i for i in range(8)], "long_factor": [3.0 + i for i in range(8)]},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers_and_round_trips(tmp_path, megatron_single, kind):
    # 40 tokens: past max_position_embeddings (dynamic grows) and the original length (longrope, yarn)
    parameters = {**ROPE_SCALINGS[kind], "rope_theta": 100.0}
    hf_model = make_hf_model(seed=4, rope_parameters=dict(parameters), max_position_embeddings=32)
    hf_model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    model = falcon_h1.from_hf(tmp_path / "src")
    with torch.no_grad():
        assert rel_err(model(ids), hf_model(ids).logits) <= 1e-5
    falcon_h1.to_hf(model, tmp_path / "out")
    source = json.loads((tmp_path / "src" / "config.json").read_text())["rope_parameters"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"] == source


def test_position_ids_feed_rope_like_transformers(hf_dir):
    path, hf_model = hf_dir
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    # per-row positions with gaps, and a row continuing a longer sequence; no 0 after a row's
    # first token, so neither model reads a packed document in them (position_ids feed RoPE only)
    positions = torch.stack([torch.arange(20) * 3 + 7, torch.arange(20) + 12])
    with torch.no_grad():
        expected = hf_model(ids, position_ids=positions, attention_mask=torch.ones(2, 20), use_cache=False).logits
        model = falcon_h1.from_hf(path)
        got = model(ids, position_ids=positions)
        assert rel_err(got, expected) <= 1e-5
        assert rel_err(model(ids), expected) > 1e-3  # the positions matter


def test_packed_rows_match_transformers_on_each_document(hf_dir):
    """A 0 in position_ids after a row's first token starts a document (Hugging Face's packed
    convention): each document's logits equal transformers' FalconH1 on that document alone
    (transformers' own packed path cannot be the reference: its Mamba branch takes no
    sequence index, so its SSM state crosses documents)."""
    from tests.falcon_h1.packed_rows import documents, position_ids

    path, hf_model = hf_dir
    rows = [[5, 19, 12], [21, 15]]   # 21 and 19: not multiples of the chunk size
    ids = torch.randint(0, 97, (2, 36), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = falcon_h1.from_hf(path)(ids, position_ids=position_ids(rows))
        for row, start, end in documents(rows):
            expected = hf_model(ids[row:row + 1, start:end]).logits[0]
            assert rel_err(got[row, start:end], expected) <= 1e-5, (row, start, end)


def test_loss_mask_weights_the_per_token_loss(hf_dir):
    path, hf_model = hf_dir
    g = torch.Generator().manual_seed(6)
    ids, labels = torch.randint(0, 97, (2, 16), generator=g), torch.randint(0, 97, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.4).float()
    with torch.no_grad():
        logits = hf_model(ids).logits.double()
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        got = falcon_h1.from_hf(path)(ids, labels=labels, loss_mask=mask)
    assert got.shape == (2, 16)
    assert rel_err(got, expected.view(2, 16) * mask) <= 1e-5
    assert torch.all(got[mask == 0] == 0)


def test_chunk_256_on_a_sequence_that_is_not_a_multiple(tmp_path, megatron_single):
    # Falcon-H1-7B's mamba_chunk_size 256, on 300 tokens (one full chunk and a partial one)
    hf_model = make_hf_model(seed=8, mamba_chunk_size=256, max_position_embeddings=512)
    hf_model.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(falcon_h1.from_hf(tmp_path)(ids), hf_model(ids).logits) <= 1e-5


# ---- config.json fields that are refused, before any weight is read ----
def _config_dir(tmp_path, hf_dir, **changes):
    path, _ = hf_dir
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file: reading it would fail differently")
    return tmp_path


@pytest.mark.parametrize("changes,message", [
    (dict(projectors_bias=True), "projectors_bias = True"),
    (dict(attention_bias=True), "attention_bias = True"),
    (dict(mlp_bias=True), "mlp_bias = True"),
    (dict(mamba_proj_bias=True), "mamba_proj_bias = True"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
    (dict(attention_dropout=0.1), "attention_dropout = 0.1"),
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "quantization_config"),
    (dict(rope_parameters={"rope_type": "su", "rope_theta": 1e4}), "rope_type one of"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor 1.0"),
])
def test_unsupported_config_fields_are_refused_before_weights(tmp_path, hf_dir, changes, message):
    from falcon_h1.errors import ConfigValueError

    path = _config_dir(tmp_path, hf_dir, **changes)
    with pytest.raises(ConfigValueError) as err:
        falcon_h1.from_hf(path)
    assert message in str(err.value) and "allowed" in str(err.value)


def test_weights_only_load_refuses_unsupported_fields(tmp_path, hf_dir):
    from falcon_h1.errors import ConfigValueError
    from falcon_h1.hf import load_hf_weights

    path, _ = hf_dir
    model = falcon_h1.from_hf(path)
    with pytest.raises(ConfigValueError, match="attention_bias = True"):
        load_hf_weights(model, _config_dir(tmp_path, hf_dir, attention_bias=True))


def test_missing_keys_take_transformers_defaults():
    from transformers import FalconH1Config as HFConfig

    from falcon_h1.hf import config_from_hf

    ours, hf = config_from_hf({"model_type": "falcon_h1"}), HFConfig()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "initializer_range",
                "tie_word_embeddings", "mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
                "mamba_expand", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "mamba_rms_norm",
                "mamba_norm_before_gate", "projectors_bias", "attention_bias", "mlp_bias", "embedding_multiplier",
                "lm_head_multiplier", "key_multiplier", "attention_in_multiplier", "attention_out_multiplier",
                "ssm_in_multiplier", "ssm_out_multiplier", "ssm_multipliers", "mlp_multipliers"):
        assert getattr(ours, key) == getattr(hf, key), key
    assert ours.d_ssm == hf.mamba_d_ssm and ours.ssm_head_dim == hf.mamba_d_head
    assert ours.kv_channels == hf.hidden_size // hf.num_attention_heads
    assert ours.rope_theta == hf.rope_parameters["rope_theta"] and ours.rope_scaling is None
    assert tuple(ours.time_step_limit) == tuple(hf.time_step_limit)


# ---- to_hf keeps every key, strict JSON, generation config ----
def _strict_load(file):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(file.read_text(), parse_constant=refuse)


def test_round_trip_keeps_every_config_key_and_the_generation_config(tmp_path, megatron_single):
    hf_model = make_hf_model(seed=9, eos_token_id=11, bos_token_id=17, pad_token_id=5)
    hf_model.generation_config.do_sample, hf_model.generation_config.temperature = True, 0.3
    hf_model.save_pretrained(tmp_path / "src")
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    source["mamba_use_mlp"] = True  # a key transformers' FalconH1 does not read (TII's own configs carry it)
    (tmp_path / "src" / "config.json").write_text(json.dumps(source))
    falcon_h1.to_hf(falcon_h1.from_hf(tmp_path / "src"), tmp_path / "out")
    written = _strict_load(tmp_path / "out" / "config.json")
    assert written.keys() == source.keys()
    for key in source:
        assert written[key] == source[key], key
    assert written["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    generation = _strict_load(tmp_path / "out" / "generation_config.json")
    assert generation == json.loads((tmp_path / "src" / "generation_config.json").read_text())
    from transformers import AutoModelForCausalLM, GenerationConfig

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (reloaded.config.eos_token_id, reloaded.config.bos_token_id, reloaded.config.pad_token_id) == (11, 17, 5)
    assert GenerationConfig.from_pretrained(tmp_path / "out").temperature == 0.3


def test_a_preset_exports_transformers_defaults_and_a_generation_config(tmp_path, megatron_single):
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    model = build_model(get_preset("falcon_h1_micro").replace(vocab_size=101), seed=1)
    falcon_h1.to_hf(model, tmp_path)
    config = _strict_load(tmp_path / "config.json")
    assert config["vocab_size"] == 101 and config["hidden_act"] == "silu" and config["eos_token_id"] == 2
    assert _strict_load(tmp_path / "generation_config.json")["eos_token_id"] == 2
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight.shape == (101, 64)  # the config's vocabulary, not the padded one
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, model(ids)) <= 1e-5
