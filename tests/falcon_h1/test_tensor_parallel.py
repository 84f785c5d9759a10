"""TP=2 on two CPU processes (torchrun, gloo) computes what TP=1 computes."""

from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun
from tests.falcon_h1 import tp_worker


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "tp2.pt"
    torchrun(Path(tp_worker.__file__), 2, "2", str(out))
    return torch.load(out)


@pytest.mark.parametrize("variant", list(tp_worker.VARIANTS))
def test_tp2_matches_tp1(tp2_results, megatron_single, variant):
    tp2, tp1 = tp2_results[variant], tp_worker.run(1, variant)
    assert rel(tp2["logits"], tp1["logits"]) <= 1e-6
    assert rel(tp2["loss"], tp1["loss"]) <= 1e-6
    assert tp2["params"].keys() == tp1["params"].keys()
    for name in tp1["params"]:
        assert torch.equal(tp2["params"][name], tp1["params"][name]), name  # TP-invariant init
        assert rel(tp2["grads"][name], tp1["grads"][name]) <= 1e-6, name


def test_odd_vocab_exports_the_unpadded_vocabulary_at_tp2(tp2_results, megatron_single):
    vocab = tp_worker.VARIANTS["odd_vocab"][2]
    tp2, tp1 = tp2_results["odd_vocab"], tp_worker.run(1, "odd_vocab")
    assert tp2["logits"].shape[-1] == vocab
    exported, reference = tp2["hf_export"], tp1["hf_export"]
    assert exported["config"]["vocab_size"] == vocab
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert exported["tensors"][name].shape == (vocab, 64), name
    assert exported["tensors"].keys() == reference["tensors"].keys()
    for name, tensor in reference["tensors"].items():
        assert torch.equal(exported["tensors"][name], tensor), name
