"""falcon_h1.generate vs Hugging Face transformers' FalconH1 `generate`, and cached decoding vs
full recomputation through the training forward (CPU, fp32, random tiny model)."""

from pathlib import Path

import pytest
import torch

import falcon_h1
from falcon_h1.generation.cache import final_ssm_state
from falcon_h1.generation.sampling import Sampler
from falcon_h1.generation.steps import ssm_step_reference
from tests.conftest import run_in_triton_interpreter, torchrun
from tests.falcon_h1 import generation_tp_worker as tp_worker
from tests.falcon_h1.hf_reference import make_hf_model

NEW_TOKENS = 64
# chunk size 8: prompt lengths 13 and 6 are not multiples of it
PROMPT_LENGTHS = tp_worker.PROMPT_LENGTHS


left_padded = tp_worker.left_padded


@pytest.fixture(scope="module")
def prompts():
    return tp_worker.prompts(PROMPT_LENGTHS)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, megatron_single):
    hf_model = make_hf_model()
    path = tmp_path_factory.mktemp("hf_gen")
    hf_model.save_pretrained(path)
    return path, hf_model


@pytest.mark.parametrize("fused", [True, False])
def test_greedy_equals_transformers_generate(hf_pair, prompts, fused):
    path, hf_model = hf_pair
    ids, mask = left_padded(prompts)
    ours = falcon_h1.generate(falcon_h1.from_hf(path, fused_projections=fused), ids, attention_mask=mask,
                              max_new_tokens=NEW_TOKENS)
    expected = hf_model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert expected.shape == (2, ids.shape[1] + NEW_TOKENS)
    assert len(set(expected[:, ids.shape[1]:].flatten().tolist())) > 10  # not a degenerate repetition
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("overrides", [dict(mamba_rms_norm=False), dict(tie_word_embeddings=True, mamba_n_groups=1)])
def test_greedy_equals_transformers_for_config_variants(tmp_path, megatron_single, prompts, overrides):
    hf_model = make_hf_model(seed=3, **overrides)
    hf_model.save_pretrained(tmp_path)
    ids, mask = left_padded(prompts)
    ours = falcon_h1.generate(falcon_h1.from_hf(tmp_path), ids, attention_mask=mask, max_new_tokens=24)
    expected = hf_model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, expected)


def assert_cached_decoding_equals_recomputation(model, prompts, new_tokens):
    ids, mask = left_padded(prompts)
    out = falcon_h1.generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens,
                             return_dict_in_generate=True, output_logits=True)
    assert len(out.logits) == new_tokens
    for r, prompt in enumerate(prompts):
        tokens = torch.cat([prompt, out.sequences[r, ids.shape[1]:]])
        with torch.no_grad():
            full = model(tokens[None])[0]  # training forward over the whole sequence, no cache
        for step in range(new_tokens):
            reference = full[len(prompt) + step - 1]
            assert (out.logits[step][r] - reference).abs().max() <= 1e-5, (r, step)


def test_cached_decoding_equals_full_recomputation(hf_pair, prompts):
    assert_cached_decoding_equals_recomputation(falcon_h1.from_hf(hf_pair[0]), prompts, NEW_TOKENS)


def test_cached_decoding_equals_full_recomputation_with_folded_scales(tmp_path, megatron_single, prompts):
    """Without the gated RMSNorm the mixer folds its µP scales into its weights (v rows carry
    attention_out_multiplier, the conv output of x ssm_out_multiplier): the caches and every step
    hold the same folded quantities as the training forward."""
    make_hf_model(seed=5, mamba_rms_norm=False, attention_out_multiplier=0.7, ssm_out_multiplier=1.3).save_pretrained(
        tmp_path)
    model = falcon_h1.from_hf(tmp_path)
    assert all(layer.mixer.scales_in_weights for layer in model.layers)
    assert_cached_decoding_equals_recomputation(model, prompts, 20)


def test_cached_decoding_equals_full_recomputation_with_yarn(tmp_path, megatron_single, prompts):
    """yarn scales cos and sin by an attention factor: cached K and each new q, k carry it."""
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16}
    make_hf_model(seed=4, rope_parameters=rope).save_pretrained(tmp_path)
    assert_cached_decoding_equals_recomputation(falcon_h1.from_hf(tmp_path), prompts, 20)


def test_dynamic_rope_past_max_positions_equals_transformers_generate(tmp_path, megatron_single, prompts):
    """Dynamic NTK grows the base once a position reaches max_position_embeddings (24, crossed
    while decoding); with a cache, earlier keys keep the frequencies they were rotated with, as
    in transformers' generate (so a full recomputation is not the reference here)."""
    hf_model = make_hf_model(seed=4, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
                             max_position_embeddings=24)
    hf_model.save_pretrained(tmp_path)
    ids = prompts[0][None]
    expected = hf_model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(falcon_h1.generate(falcon_h1.from_hf(tmp_path), ids, max_new_tokens=30), expected)


def test_left_padded_batch_equals_each_prompt_alone(hf_pair, prompts):
    """Rows 0 and 2 have one length, so their prefill shares a forward that fills two cache rows
    that are not consecutive."""
    model = falcon_h1.from_hf(hf_pair[0])
    prompts = [prompts[0], prompts[1], prompts[0].flip(0)]
    ids, mask = left_padded(prompts)
    batch = falcon_h1.generate(model, ids, attention_mask=mask, max_new_tokens=20)
    for r, prompt in enumerate(prompts):
        alone = falcon_h1.generate(model, prompt[None], max_new_tokens=20)
        assert torch.equal(batch[r, ids.shape[1]:], alone[0, len(prompt):])


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=20, top_p=0.9), dict(temperature=1.3),
                                      dict(top_p=0.5)])
def test_sampling_equals_transformers_with_the_same_seed(hf_pair, prompts, settings):
    """Both draw with torch.multinomial from the same filtered distribution: the same seed gives
    the same tokens (HF draws from the global generator)."""
    path, hf_model = hf_pair
    ids, mask = left_padded(prompts)
    ours = falcon_h1.generate(falcon_h1.from_hf(path), ids, attention_mask=mask, max_new_tokens=40, do_sample=True,
                              seed=5, **settings)
    torch.manual_seed(5)
    expected = hf_model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=True, pad_token_id=0,
                                 temperature=settings.get("temperature", 1.0), top_k=settings.get("top_k", 0),
                                 top_p=settings.get("top_p", 1.0))
    assert torch.equal(ours, expected)


def test_eos_stops_a_row_and_pads_it_as_transformers(hf_pair, prompts):
    path, hf_model = hf_pair
    model = falcon_h1.from_hf(path)
    ids, mask = left_padded(prompts)
    free = falcon_h1.generate(model, ids, attention_mask=mask, max_new_tokens=30)
    eos = int(free[0, ids.shape[1] + 3])  # row 0's 4th new token
    ours = falcon_h1.generate(model, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[eos, 96],
                              pad_token_id=1)
    expected = hf_model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                 eos_token_id=[eos, 96], pad_token_id=1)
    assert torch.equal(ours, expected)
    assert (ours[0, ids.shape[1] + 4:] == 1).all()


def test_streamer_gets_the_prompt_then_each_step(hf_pair, prompts):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    recorder = Recorder()
    out = falcon_h1.generate(falcon_h1.from_hf(hf_pair[0]), prompts[0][None], max_new_tokens=5, streamer=recorder)
    assert recorder.ended and torch.equal(recorder.puts[0], prompts[0][None])
    assert torch.equal(torch.stack(recorder.puts[1:], dim=1), out[:, len(prompts[0]):])


def test_top_k_top_p_filter_equals_float64_computation():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    sampler = Sampler.of(True, 0.8, 10, 0.7, 0)
    got = sampler.filtered_logits(logits.float())
    for r in range(3):
        scaled = logits[r] / 0.8
        order = scaled.argsort(descending=True)[:10]  # top-k by hand
        probs = torch.softmax(scaled[order], 0)
        # nucleus: the most likely tokens until their total reaches 0.7 (the last one included)
        keep_n = int((probs.cumsum(0) < 0.7).sum()) + 1
        kept = set(order[:keep_n].tolist())
        assert {i for i in range(50) if torch.isfinite(got[r, i])} == kept
        for i in kept:
            assert abs(got[r, i].item() - scaled[i].item()) < 1e-5


def test_closed_form_ssm_state_equals_the_float64_recurrence():
    g = torch.Generator().manual_seed(0)
    r, L, h, p, gr, n = 2, 37, 4, 3, 2, 5
    x, B = torch.randn(r, L, h, p, generator=g), torch.randn(r, L, gr, n, generator=g)
    dt, A = torch.rand(r, L, h, generator=g) * 0.5, -torch.rand(h, generator=g) * 2
    state = torch.zeros(r, h, p, n, dtype=torch.float64)
    Bh = B.double().repeat_interleave(h // gr, dim=2)
    for t in range(L):
        decay = torch.exp(dt[:, t].double() * A.double())[..., None, None]
        state = decay * state + (dt[:, t].double()[..., None] * x[:, t].double())[..., None] * Bh[:, t, :, None, :]
    assert torch.allclose(final_ssm_state(x, dt, A, B).double(), state, rtol=1e-5, atol=1e-6)
    # and one reference step from there equals one more step of the recurrence
    state32 = state.float().clone()
    xt, Bt, Ct, dtt = torch.randn(r, h, p, generator=g), torch.randn(r, gr, n, generator=g), \
        torch.randn(r, gr, n, generator=g), torch.rand(r, h, generator=g)
    D = torch.randn(h, generator=g)
    y = ssm_step_reference(state32, xt, dtt, A, Bt, Ct, D)
    Bh, Ch = Bt.double().repeat_interleave(2, 1), Ct.double().repeat_interleave(2, 1)
    state = torch.exp(dtt.double() * A.double())[..., None, None] * state \
        + (dtt.double()[..., None] * xt.double())[..., None] * Bh[:, :, None, :]
    expected_y = torch.einsum("bhpn,bhn->bhp", state, Ch) + D.double()[:, None] * xt.double()
    assert torch.allclose(state32.double(), state, rtol=1e-5, atol=1e-6)
    assert torch.allclose(y.double(), expected_y, rtol=1e-5, atol=1e-5)


def test_ssm_step_triton_equals_reference_in_the_interpreter():
    run_in_triton_interpreter(Path(__file__).with_name("ssm_step_interpret_worker.py"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.5), "do_sample = False"),
    (dict(do_sample=True, top_p=0.0), "top_p = 0.0"),
    (dict(do_sample=True, top_k=0), "top_k = 0"),
    (dict(do_sample=True, temperature=0), "temperature = 0"),
    (dict(max_new_tokens=0), "max_new_tokens = 0"),
    (dict(eos_token_id=97), "eos_token_id = 97"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "not left padding"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), "only zeros"),
])
def test_bad_arguments_are_named(hf_pair, kwargs, message):
    model = falcon_h1.from_hf(hf_pair[0])
    with pytest.raises(ValueError, match=message):
        falcon_h1.generate(model, torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 4, **kwargs})


def test_out_of_vocabulary_prompt_is_named(hf_pair):
    with pytest.raises(ValueError, match="outside 0..96"):
        falcon_h1.generate(falcon_h1.from_hf(hf_pair[0]), torch.tensor([[1, 97]]))


@pytest.fixture(scope="module")
def tp2_results(hf_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_tp") / "tp2.pt"
    torchrun(Path(tp_worker.__file__), 2, str(hf_pair[0]), str(out))
    return torch.load(out)


def test_tp2_greedy_equals_transformers_and_cache_equals_recomputation(tp2_results, hf_pair, prompts):
    hf_model = hf_pair[1]
    ids, mask = left_padded(prompts)
    expected = hf_model.generate(ids, attention_mask=mask, max_new_tokens=tp_worker.NEW_TOKENS, do_sample=False,
                                 pad_token_id=0)
    assert torch.equal(tp2_results["greedy"], expected)
    assert tp2_results["max_logit_error"] <= 1e-5


def test_tp2_sampling_equals_tp1(tp2_results, hf_pair, prompts):
    ids, mask = left_padded(prompts)
    tp1 = falcon_h1.generate(falcon_h1.from_hf(hf_pair[0]), ids, attention_mask=mask, **tp_worker.SAMPLING)
    assert torch.equal(tp2_results["sampled"], tp1)
    assert tp2_results["ranks_agree"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the decode step's Triton path)")
def test_gpu_decode_equals_reference_decode(hf_pair, prompts):
    path = hf_pair[0]
    ids, mask = left_padded(prompts)
    kw = dict(attention_mask=mask.cuda(), max_new_tokens=32, return_dict_in_generate=True, output_logits=True)
    fast = falcon_h1.generate(falcon_h1.from_hf(path), ids.cuda(), **kw)
    reference = falcon_h1.generate(falcon_h1.from_hf(path, kernel_backend="reference"), ids.cuda(), **kw)
    assert torch.equal(fast.sequences, reference.sequences)
    for a, b in zip(fast.logits, reference.logits):
        assert (a - b).abs().max() <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_cuda_graph_decode_equals_eager_decode(hf_pair, prompts):
    path = hf_pair[0]
    ids, mask = left_padded(prompts)
    kw = dict(attention_mask=mask.cuda(), max_new_tokens=32, return_dict_in_generate=True, output_logits=True)
    model = falcon_h1.from_hf(path)
    graphed = falcon_h1.generate(model, ids.cuda(), cuda_graph=True, **kw)
    eager = falcon_h1.generate(model, ids.cuda(), cuda_graph=False, **kw)
    assert torch.equal(graphed.sequences, eager.sequences)
    for a, b in zip(graphed.logits, eager.logits):
        assert (a - b).abs().max() <= 1e-4


def test_cuda_graph_on_cpu_is_refused_by_name(hf_pair, prompts):
    ids, mask = left_padded(prompts)
    with pytest.raises(ValueError, match="cuda_graph = True.*cpu"):
        falcon_h1.generate(falcon_h1.from_hf(hf_pair[0]), ids, attention_mask=mask, cuda_graph=True)
