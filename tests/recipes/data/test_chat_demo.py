"""The bundled chat set: every answer right (recomputed here from the question),
held-out questions absent from training, the tokenizer fits the tiny model."""

import json
import re

import pytest

from recipes.data.chat_demo import HELDOUT_FILE, TRAIN_FILE, generate, heldout_questions, write_chat_demo
from recipes.data.tokenizer import build_tokenizer
from tests.recipes.data.chat_helpers import reference


def expected_answer(system, question):
    if question.startswith("Facts: "):  # facts given inside a later turn
        system, question = question.split(". ", 1)
    if match := re.fullmatch(r"What is (\d) \+ (\d)\?", question):
        return str(int(match[1]) + int(match[2]))
    if match := re.fullmatch(r"Which is larger, (\d) or (\d)\?", question):
        return str(max(int(match[1]), int(match[2])))
    if match := re.fullmatch(r"Repeat: ([a-z]+)", question):
        return match[1]
    if match := re.fullmatch(r"What is ([a-z]+)\?", question):
        pairs = re.fullmatch(r"Facts: (.*?)\.?", system)[1].split(", ")
        return dict(pair.split("=") for pair in pairs)[match[1]]
    raise AssertionError(f"unknown question {question!r}")


def read(path):
    return [json.loads(line)["messages"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("path", [TRAIN_FILE, HELDOUT_FILE])
def test_every_answer_is_correct(path):
    convs = read(path)
    assert len(convs) == (1500 if path == TRAIN_FILE else 100)
    for messages in convs:
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = [m for m in messages if m["role"] != "system"]
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        for question, answer in zip(turns[::2], turns[1::2]):
            assert answer["content"] == expected_answer(system, question["content"])


def test_heldout_questions_never_occur_in_training():
    seen = {m["content"] for messages in read(TRAIN_FILE) for m in messages if m["role"] == "user"}
    questions = heldout_questions()
    assert len(questions) == 100
    add_or_larger = [p[-1]["content"] for p, _ in questions if "+" in p[-1]["content"] or "larger" in p[-1]["content"]]
    repeats = [p[-1]["content"] for p, _ in questions if p[-1]["content"].startswith("Repeat")]
    assert len(add_or_larger) == 50 and len(repeats) == 25
    assert not set(add_or_larger + repeats) & seen
    assert all(answer == expected_answer(p[0]["content"] if p[0]["role"] == "system" else None,
                                         p[-1]["content"]) for p, answer in questions)


def test_shipped_files_are_the_generators_output(tmp_path):
    write_chat_demo(tmp_path / "corpus", tmp_path / "tok")
    assert (tmp_path / "corpus" / "train.jsonl").read_bytes() == TRAIN_FILE.read_bytes()
    assert (tmp_path / "corpus" / "heldout.jsonl").read_bytes() == HELDOUT_FILE.read_bytes()
    assert len(generate()[0]) == 1500


def test_tokenizer_fits_the_tiny_model_and_rows():
    tokenizer = build_tokenizer("chat_demo")
    assert tokenizer.vocab_size == 320  # falcon_h1_tiny's vocab_size
    hf = tokenizer.chat_tokenizer()
    assert hf.eos_token == "<|im_end|>" and tokenizer.eod == hf.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad == hf.convert_tokens_to_ids("<|pad|>")
    assert max(len(reference(m)[0]) for m in read(TRAIN_FILE)) <= 128  # data.seq_length of data=chat
