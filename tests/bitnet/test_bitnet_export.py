"""2-bit packing and the safetensors export of a BitNet model (CPU)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bitnet_testutil import gpt_logits, gpt_loss, tiny_batch, tiny_gpt  # noqa: E402

from bitnet.export import (  # noqa: E402
    TernaryWeight,
    export_bitnet_state_dict,
    export_from_state_dict,
    load_bitnet_export,
    load_frozen_bitnet,
    pack_ternary,
    save_bitnet_state_dict,
    unpack_ternary,
)
from recipes.bitnet_export import main  # noqa: E402
from recipes.config import BitNetConfig  # noqa: E402


def test_pack_layout_is_documented_one():
    # (value + 1) in 2-bit fields, element 0 in the lowest bits.
    assert pack_ternary(torch.tensor([-1, 0, 1, 0], dtype=torch.int8)).tolist() == [0 | 1 << 2 | 2 << 4 | 1 << 6]
    assert pack_ternary(torch.tensor([1], dtype=torch.int8)).tolist() == [2 | 1 << 2 | 1 << 4 | 1 << 6]


@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (4,), (5,), (7,), (3, 5), (2, 3, 7), (64, 33)])
def test_pack_unpack_roundtrip(shape):
    t = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.int8)
    if t.numel() >= 3:
        t.view(-1)[:3] = torch.tensor([-1, 0, 1], dtype=torch.int8)  # all three values present
    packed = pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.shape == ((t.numel() + 3) // 4,)
    out = unpack_ternary(packed, shape)
    assert out.dtype == torch.int8 and torch.equal(out, t)


def test_pack_unpack_errors():
    with pytest.raises(ValueError, match=r"value 2 is not ternary; allowed values: -1, 0, 1"):
        pack_ternary(torch.tensor([0, 2, 1], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"code 3 found"):
        unpack_ternary(torch.tensor([0b11], dtype=torch.uint8), (1,))
    with pytest.raises(ValueError, match=r"expected uint8 \[2\] for shape \(5,\)"):
        unpack_ternary(torch.zeros(1, dtype=torch.uint8), (5,))


@pytest.fixture(scope="module")
def trained_gpt():
    from falcon_h1.megatron_compat.parallel import initialize_parallel

    initialize_parallel(1, 1, 1234)
    torch.manual_seed(5)
    model = tiny_gpt(BitNetConfig(enabled=True))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        gpt_loss(model, tiny_batch()).backward()
        opt.step()
    return model.eval()


def test_export_then_frozen_model_gives_same_logits(trained_gpt, tmp_path):
    path = str(tmp_path / "model.safetensors")
    names = export_bitnet_state_dict(trained_gpt, path)
    assert len(names) == 8 and all(n.endswith(".weight") for n in names)
    export = load_bitnet_export(path)
    layer = dict(trained_gpt.named_modules())["decoder.layers.0.mlp.linear_fc1"]
    entry = export["decoder.layers.0.mlp.linear_fc1.weight"]
    assert isinstance(entry, TernaryWeight)
    ternary, scale = layer.quantized_weight()
    assert torch.equal(entry.ternary, ternary) and torch.equal(entry.scale, scale)
    # Full-precision tensors are stored as they are.
    assert torch.equal(export["embedding.word_embeddings.weight"], trained_gpt.embedding.word_embeddings.weight)
    # 2 bits per ternary weight on disk.
    size = os.path.getsize(path)
    fp32_size = sum(p.numel() * 4 for p in trained_gpt.parameters())
    assert size < fp32_size

    batch = tiny_batch(seed=9)
    with torch.no_grad():
        expected = gpt_logits(trained_gpt, batch)
    torch.manual_seed(123)  # other random init: everything must come from the export
    fresh = tiny_gpt(BitNetConfig(enabled=True)).eval()
    load_frozen_bitnet(fresh, path)
    with torch.no_grad():
        got = gpt_logits(fresh, batch)
    assert torch.equal(got, expected)


def test_cli_on_saved_state_dict(trained_gpt, tmp_path):
    direct = tmp_path / "direct.safetensors"
    export_bitnet_state_dict(trained_gpt, str(direct))
    saved = tmp_path / "ckpt.pt"
    save_bitnet_state_dict(trained_gpt, str(saved))
    via_cli = tmp_path / "cli.safetensors"
    main([str(saved), str(via_cli)])
    a, b = load_bitnet_export(str(direct)), load_bitnet_export(str(via_cli))
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], TernaryWeight):
            assert torch.equal(a[key].ternary, b[key].ternary) and torch.equal(a[key].scale, b[key].scale)
        else:
            assert torch.equal(a[key], b[key])
    # A plain state dict: BitNet weights found by the default name pattern.
    plain = tmp_path / "plain.pt"
    torch.save(trained_gpt.state_dict(), plain)
    main([str(plain), str(tmp_path / "plain.safetensors")])
    c = load_bitnet_export(str(tmp_path / "plain.safetensors"))
    assert {k for k, v in c.items() if isinstance(v, TernaryWeight)} == {
        k for k, v in a.items() if isinstance(v, TernaryWeight)
    }


def test_export_from_state_dict_errors(tmp_path):
    with pytest.raises(ValueError, match=r"BitNet weight 'x\.weight' is not in the state dict"):
        export_from_state_dict({"y": torch.zeros(2)}, ["x.weight"], str(tmp_path / "o.safetensors"))
    bad = torch.ones(2, 2)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter w\.weight holds non-finite values"):
        export_from_state_dict({"w.weight": bad}, ["w.weight"], str(tmp_path / "o.safetensors"))
