"""recipes.heldout_eval: the teacher-forced exact-match verdict against explicit greedy decoding
(one full forward per new token) of a real tiny model, its loss against the model's own loss
path, and the held-out questions of the bundled chat set rendered as answers + end token."""

import pytest
import torch

from recipes.heldout_eval import HeldoutExample, heldout_examples, score_heldout


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_exact_match_is_greedy_decoding_and_loss_is_the_models(megatron_single):
    from falcon_h1.model import build_model
    from falcon_h1.presets import get_preset

    model = build_model(get_preset("falcon_h1_micro").replace(initializer_range=0.2), seed=3).eval()
    g = torch.Generator().manual_seed(4)
    examples, expected = [], []
    for n, steps in enumerate([1, 3, 4, 6]):
        prompt = torch.randint(0, 128, (5 + n,), generator=g).tolist()
        answer = _greedy(model, prompt, steps)     # what greedy decoding produces: matched
        examples.append(HeldoutExample(prompt + answer, len(prompt)))
        expected.append(True)
        for position in {0, steps - 1}:           # one answer token changed: not matched
            wrong = list(answer)
            wrong[position] = (wrong[position] + 1) % 128
            examples.append(HeldoutExample(prompt + wrong, len(prompt)))
            expected.append(False)
    score = score_heldout(model, examples, pad_id=0, batch_size=3)
    assert (score.correct, score.total) == (sum(expected), len(expected))
    one_by_one = [score_heldout(model, [e], pad_id=0).correct == 1 for e in examples]
    assert one_by_one == expected

    total, count = 0.0, 0
    for e in examples:   # the model's own per-token loss of the answer tokens, unpadded
        ids = torch.tensor([e.ids[:-1]])
        labels = torch.tensor([e.ids[1:]])
        with torch.no_grad():
            per_token = model(ids, labels=labels)[0, e.prompt_length - 1:]
        total += per_token.sum().item()
        count += per_token.numel()
    assert score.loss == pytest.approx(total / count, rel=1e-5)
    assert model.training is False


def test_bundled_heldout_questions_become_answer_tokens_and_the_end_token():
    from recipes.data import build_tokenizer, heldout_questions

    tokenizer = build_tokenizer("chat_demo")
    questions = heldout_questions()
    examples = heldout_examples(tokenizer, questions)
    assert len(examples) == len(questions) == 100
    for example, (prompt, answer) in zip(examples, questions):
        target = example.ids[example.prompt_length:]
        assert target[-1] == tokenizer.eod and tokenizer.eod not in target[:-1]
        assert tokenizer.detokenize(target[:-1]) == answer
        rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        assert example.ids[:example.prompt_length] == tokenizer.tokenize(rendered)


class _NoEndTokenizer:
    """A template that never closes the assistant turn."""

    eod = 99

    def apply_chat_template(self, messages, add_generation_prompt=False):
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")

    def tokenize(self, text):
        return [ord(c) % 90 for c in text]


def test_a_template_without_an_end_token_is_refused():
    with pytest.raises(ValueError, match=r"held-out question 0 \('4'\).*without the tokenizer's end token"):
        heldout_examples(_NoEndTokenizer(), [([{"role": "user", "content": "2+2?"}], "4")])
