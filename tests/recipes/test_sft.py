"""Supervised fine-tuning end to end on CPU (data=chat in the training loop): the run prints its data
report and the held-out exact match before and after, a killed run resumes identically, it starts
from a Hugging Face directory or a run directory alike; train=sft holds TII's published Falcon-H1
post-training settings; packed rows and the held-out score refuse the layouts they cannot run in."""

import json

import pytest
import torch

from recipes.api import compose_recipe
from recipes.build import validate_recipe
from tests.recipes.test_training import _losses, _sigkill_after_checkpoint, _worker, _write_recipe

CHAT = ["train=sft_demo", "train.max_steps=8", "data.seq_length=64", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.warmup_steps=2", "train.lr_wsd_decay_steps=2", "train.lr=3e-3",
        "train.min_lr=3.75e-4", "train.log_interval=1"]


@pytest.fixture(scope="module")
def chat_reference(tmp_path_factory):
    """An uninterrupted 8-step chat run (saved at its end), and what it printed."""
    tmp = tmp_path_factory.mktemp("sft")
    proc = _worker(_write_recipe(tmp, "ref", *CHAT, "train.save_interval=8"))
    return tmp / "ref", proc.stdout


def test_chat_run_reports_its_data_and_the_heldout_score_before_and_after(chat_reference):
    run_dir, out = chat_reference
    assert "chat train: " in out and "packing efficiency" in out and "0 truncated, 0 dropped" in out
    assert "held-out questions after 0 steps: exact match 0/100" in out
    assert "held-out questions after 8 steps: exact match " in out
    assert "finished 8 steps: assistant-token loss " in out
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scores = {row["step"]: row["heldout_loss"] for row in logged if "heldout_loss" in row}
    assert sorted(scores) == [0, 8] and scores[8] < scores[0]
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]


def test_killed_chat_run_resumes_and_continues_identically(tmp_path, chat_reference):
    recipe = _write_recipe(tmp_path, "resumed", *CHAT, "train.save_interval=4")
    proc = _worker(recipe, wait=False)
    _sigkill_after_checkpoint(proc, tmp_path / "resumed", 4)
    assert not (tmp_path / "resumed" / "checkpoints" / "iter_0000008").exists()
    out = _worker(recipe).stdout
    assert "finished 8 steps" in out and "held-out questions after 8 steps" in out
    resumed = _losses(tmp_path / "resumed")
    assert resumed == _losses(chat_reference[0])  # bit-identical continuation, data position included


def test_fine_tuning_starts_from_a_hugging_face_directory_or_a_run_directory(tmp_path, chat_reference,
                                                                             megatron_single):
    import falcon_h1
    from recipes.api import load_trained_model

    run_dir, _ = chat_reference
    trained, _, _ = load_trained_model(run_dir)
    falcon_h1.to_hf(trained, tmp_path / "hf")
    first = {}
    for name, source in (("from_hf", tmp_path / "hf"), ("from_run", run_dir)):
        _worker(_write_recipe(tmp_path, name, *CHAT, "train.max_steps=2", "train.warmup_steps=0",
                              "train.lr_wsd_decay_steps=1", "train.save_interval=0", f"train.load_dir={source}"))
        first[name] = _losses(tmp_path / name)[1]
    assert first["from_hf"] < _losses(run_dir)[1] - 0.5   # trained weights, not a fresh init
    assert abs(first["from_hf"] - first["from_run"]) <= 1e-6 * first["from_run"]


def test_train_sft_holds_tiis_published_post_training_settings():
    """https://tiiuae.github.io/Falcon-H1/post_training_details: 16k rows, ~1M-token batches, lr
    128e-6, AdamW (0.9, 0.95), WSD with an exponential decay to lr / 8; no weight decay."""
    recipe = compose_recipe(["model=falcon_h1_0_5b", "train=sft"])
    t, data = recipe.train, recipe.data
    assert data.kind == "chat" and data.packing and data.seq_length == 16384
    assert t.global_batch_size * data.seq_length == 1_048_576
    assert t.lr == 128e-6 and t.min_lr == t.lr / 8
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay) == (0.9, 0.95, 0.0)
    assert (t.lr_decay_style, t.lr_wsd_decay_style) == ("WSD", "exponential")
    validate_recipe(recipe)


def test_falcon_h1_sft_picks_the_schedule_by_size_and_takes_the_weights_to_start_from():
    import recipes

    released = recipes.falcon_h1_sft("0.5b", load_dir="/ckpt/Falcon-H1-0.5B-Base",
                                     data={"paths": ["chats.jsonl"]}, train={"max_steps": 10})
    assert released.model.name == "falcon_h1_0_5b" and released.train.lr == 128e-6
    assert released.train.load_dir == "/ckpt/Falcon-H1-0.5B-Base" and released.train.max_steps == 10
    assert released.data.kind == "chat" and released.data.paths == ["chats.jsonl"]
    demo = recipes.falcon_h1_sft("tiny")
    assert demo.data.heldout == "chat_demo" and demo.train.max_steps == 600 and demo.train.load_dir is None


@pytest.mark.parametrize("overrides, message", [
    (["parallel.cp=2"], r"parallel.cp = 2 is not allowed: 1 with packed chat rows"),
    (["train.cuda_graph=true"], r"train.cuda_graph = True is not allowed: false with packed chat rows"),
    (["parallel.pp=2"], r"parallel.pp = 2 is not allowed: 1 with data.heldout"),
    (["data.heldout=missing.jsonl"], r"data.heldout entry 'missing.jsonl': no such file"),
    (["data.heldout=questions.txt"], r"data.heldout = 'questions.txt': expected 'chat_demo' or a .jsonl"),
    (["data=bundled", "data.heldout=chat_demo"], r"data.heldout = 'chat_demo' applies to data.kind = chat only"),
])
def test_layouts_packed_rows_or_the_heldout_score_cannot_run_in_are_refused(overrides, message):
    from falcon_h1.errors import ConfigValueError

    recipe = compose_recipe(["train=sft_demo", "model.num_hidden_layers=4", *overrides])
    with pytest.raises(ConfigValueError, match=message):
        validate_recipe(recipe)


class _PositionsSeen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, tokens, position_ids=None, labels=None):
        self.seen.append(position_ids)
        return torch.zeros(tokens.shape)


@pytest.mark.parametrize("packed_rows", [True, False])
def test_only_packed_rows_hand_their_positions_to_the_model(packed_rows):
    """Packed rows: the model finds their documents in position_ids. Text rows (0..s-1) and
    unpacked chat rows (one conversation, then filler it never attends to) need none, and
    passing none spares the model its host check of the positions every step."""
    from recipes.training import _forward_step

    batch = {"tokens": torch.zeros(1, 6, dtype=torch.long), "labels": torch.zeros(1, 6, dtype=torch.long),
             "loss_mask": torch.ones(1, 6), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
    model = _PositionsSeen()
    _forward_step(iter([batch]), model, torch.device("cpu"), packed_rows=packed_rows)
    if packed_rows:
        assert torch.equal(model.seen[0], batch["position_ids"])
    else:
        assert model.seen == [None]
