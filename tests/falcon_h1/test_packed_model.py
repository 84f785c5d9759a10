"""Packed rows through the whole model (HF's convention: position_ids restart at 0 for every
document): per-token logits, loss and every gradient equal each document run alone, on the
reference path here, on the Triton kernels in Triton's interpreter and at TP=2 (subprocesses).
Each part of the document handling is also turned off on its own to show the comparison then
fails: the SSM state, the conv window, the attention and the positions."""

import importlib.util
from pathlib import Path

import pytest
import torch

import falcon_h1.kernels
from falcon_h1.rope import RotaryFrequencies
from tests.conftest import run_in_triton_interpreter, torchrun
from tests.falcon_h1.packed_model import CONFIG, ROWS, TOLERANCE, batch, errors, run_alone, run_packed

# How far the per-token logits of a model with one part of the document handling off must be
# from the documents alone: 100x the tolerance (seen: 5e-3 for the SSM state, 9e-1 for attention).
LEAK_MARGIN = 1e-3
# Dynamic NTK RoPE grows its base once a batch's largest position passes max_position_embeddings,
# so with it absolute positions (not only their differences, which plain RoPE sees) change the
# model: the documents (<= 37 tokens) stay below 48, the 72-token row does not.
DYNAMIC_ROPE = CONFIG.replace(rope_scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=48)


def _model(cfg, seed=7, recompute="none"):
    from falcon_h1.model import build_model

    return build_model(cfg, seed=seed, recompute=recompute)


def _packed_errors(model):
    data = batch(ROWS, model.cfg.vocab_size)
    return errors(run_packed(model, data), run_alone(model, data, ROWS))


@pytest.mark.parametrize("cfg", [CONFIG, CONFIG.replace(fused_projections=False, mamba_rms_norm=True),
                                 CONFIG.replace(layer_pattern="MA", attention_backend="unfused"), DYNAMIC_ROPE],
                         ids=["fused", "unfused_gated_norm", "mamba_then_attention_unfused", "dynamic_rope"])
def test_packed_row_equals_each_document_alone(megatron_single, cfg):
    got = _packed_errors(_model(cfg))
    assert max(got.values()) <= TOLERANCE, {k: f"{v:.1e}" for k, v in got.items() if v > TOLERANCE}


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_packed_row_under_recomputation(megatron_single, recompute):
    """The recomputed layers see the same documents in their backward."""
    got = _packed_errors(_model(CONFIG, recompute=recompute).train())
    assert max(got.values()) <= TOLERANCE, {k: f"{v:.1e}" for k, v in got.items() if v > TOLERANCE}


def _drop(function, keyword):
    def without(*args, **kwargs):
        kwargs.pop(keyword, None)
        return function(*args, **kwargs)
    return without


def _rows_positions(forward):
    def rotary(self, seq_len, position_ids=None, device=None):
        return forward(self, seq_len, None, device)   # 0..s-1 along the row, not restarting
    return rotary


LEAKS = {  # one part of the document handling off at a time
    "ssm_state": (falcon_h1.kernels, "ssd_scan", lambda f: _drop(f, "seq_idx"), CONFIG),
    "conv_window": (falcon_h1.kernels, "causal_conv1d_silu", lambda f: _drop(f, "seq_idx"), CONFIG),
    "attention": (falcon_h1.kernels, "causal_attention", lambda f: _drop(f, "documents"), CONFIG),
    "positions": (RotaryFrequencies, "forward", _rows_positions, DYNAMIC_ROPE),
}


@pytest.mark.parametrize("part", list(LEAKS))
def test_each_part_of_the_document_handling_is_needed(megatron_single, monkeypatch, part):
    owner, name, leaky, cfg = LEAKS[part]
    model = _model(cfg)
    monkeypatch.setattr(owner, name, leaky(getattr(owner, name)))
    got = _packed_errors(model)
    assert got["logits"] >= LEAK_MARGIN, f"{part} leaking across documents went unseen: {got}"


def test_ordinary_rows_keep_the_unpacked_path_bit_identical(megatron_single, monkeypatch):
    """Rows 0..s-1 (or continuing at k..k+s-1) have no document inside: no Documents are built and
    the result is bit-identical to the call without position_ids."""
    import falcon_h1.model

    model = _model(CONFIG)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    plain = model(ids)

    def refuse(*args):
        raise AssertionError("Documents built for rows without a document boundary")

    monkeypatch.setattr(falcon_h1.kernels.documents, "documents_from_position_ids", refuse)
    assert torch.equal(model(ids, position_ids=torch.arange(40).expand(2, 40)), plain)
    continued = model(ids, position_ids=torch.arange(5, 45)[None])
    assert continued.shape == plain.shape and not torch.equal(continued, plain)  # RoPE still sees them


def test_malformed_position_ids_are_refused(megatron_single):
    model = _model(CONFIG)
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position_ids: shape \(3, 8\) for a batch of 2 rows"):
        model(ids, position_ids=torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="expected integer positions of shape \\[batch, seq\\]"):
        model(ids, position_ids=torch.zeros(2, 8))


def test_packed_row_equals_each_document_alone_on_triton_kernels_in_interpreter():
    """The GPU path (mamba_ssm's SSD scan, the Triton conv, the fused Mamba branch, SwiGLU and
    cross entropy kernels) on CPU through Triton's interpreter, fp32."""
    pytest.importorskip("einops")
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not installed (./setup.sh installs it)")
    run_in_triton_interpreter(Path(__file__).with_name("packed_model_interpret_worker.py"), timeout=600)


def test_packed_row_equals_each_document_alone_at_tp2(tmp_path, megatron_single):
    """Two gloo processes at TP=2 (sequence parallel too) run the packed rows; the documents alone
    at TP=1 here are the reference."""
    from tests.falcon_h1 import packed_tp_worker

    out = tmp_path / "packed_tp2.pt"
    torchrun(Path(packed_tp_worker.__file__), 2, str(out))
    results = torch.load(out)
    for variant, packed in results.items():
        model = _model(CONFIG.replace(fused_projections=packed_tp_worker.VARIANTS[variant][0]),
                       seed=packed_tp_worker.SEED)
        alone = run_alone(model, batch(ROWS, CONFIG.vocab_size), ROWS)
        got = errors(packed, alone)
        assert max(got.values()) <= TOLERANCE, (variant, {k: f"{v:.1e}" for k, v in got.items() if v > TOLERANCE})
