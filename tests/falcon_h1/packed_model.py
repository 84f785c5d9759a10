"""A whole model on a packed row against every document of it run alone (the defining check of
packed fine-tuning): per-token logits, per-token masked loss and every parameter's gradient.

The reference is the model's ordinary unpacked path, one document per call with no position_ids,
so it shares no document handling with the packed path under test. The documents' gradients are
summed, as one packed row's loss sums over its documents."""

import torch

from falcon_h1.presets import get_preset
from falcon_h1.weights import gather_hf_state
from tests.falcon_h1.packed_rows import documents, position_ids

# Three conversations of uneven lengths in one row: none a multiple of the preset's chunk size
# (16), the middle one spans the packed row's chunk boundaries at 16, 32 and 48 and its own at
# 16 and 32 when run alone; the last one crosses 64.
ROWS = [[13, 37, 22]]
TOLERANCE = 1e-5  # fp32, relative L2 per output and per parameter gradient
# A larger init than the preset's 0.02 so each branch's contribution (and so any leak through
# it) is well above rounding in the logits.
CONFIG = get_preset("falcon_h1_micro").replace(initializer_range=0.1)


def rel(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).norm() / want.norm()).item()


def batch(rows, vocab: int, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, s = len(rows), sum(rows[0])
    return {"ids": torch.randint(0, vocab, (b, s), generator=g),
            "labels": torch.randint(0, vocab, (b, s), generator=g),
            "loss_mask": (torch.rand(b, s, generator=g) < 0.6).float(),
            "position_ids": position_ids(rows)}


def _grads(model) -> dict:
    return dict(gather_hf_state(model, grads=True))


def run_packed(model, data, after_backward=None) -> dict:
    """Logits, per-token loss and gradients of the packed rows (positions restarting);
    after_backward(model) runs before the gradients are read (TP: the sequence-parallel sums)."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(data["ids"], position_ids=data["position_ids"])
    loss = model(data["ids"], position_ids=data["position_ids"], labels=data["labels"],
                 loss_mask=data["loss_mask"])
    loss.sum().backward()
    if after_backward is not None:
        after_backward(model)
    return {"logits": logits, "loss": loss.detach(), "grads": _grads(model)}


def run_alone(model, data, rows) -> dict:
    """The same outputs from every document run alone (no position_ids), assembled in place."""
    model.zero_grad(set_to_none=True)
    logits, loss = None, torch.zeros(data["ids"].shape, device=data["ids"].device)
    for row, start, end in documents(rows):
        cut = lambda key: data[key][row:row + 1, start:end]
        with torch.no_grad():
            piece = model(cut("ids"))
        if logits is None:
            logits = torch.zeros(*data["ids"].shape, piece.shape[-1], dtype=piece.dtype, device=piece.device)
        logits[row, start:end] = piece[0]
        doc_loss = model(cut("ids"), labels=cut("labels"), loss_mask=cut("loss_mask"))
        doc_loss.sum().backward()
        loss[row, start:end] = doc_loss[0].detach()
    return {"logits": logits, "loss": loss, "grads": _grads(model)}


def errors(packed: dict, alone: dict) -> dict[str, float]:
    """Relative error of logits, loss and each gradient of the packed rows against the documents alone."""
    out = {"logits": rel(packed["logits"], alone["logits"]), "loss": rel(packed["loss"], alone["loss"])}
    assert packed["grads"].keys() == alone["grads"].keys()
    for name, want in alone["grads"].items():
        out[f"grad {name}"] = rel(packed["grads"][name], want)
    return out
