"""Held-out chat questions scored by greedy exact match, with one teacher-forced forward.

Greedy decoding of a prompt reproduces the expected answer exactly iff, with the correct answer
so far as the prefix, every answer token is the argmax of the model's next-token distribution,
and after the answer the end-of-turn token is (generation stops there). So one forward over
prompt + answer + end token, comparing argmaxes at the answer positions, gives the same verdict
as generating, without a decode loop. The mean cross entropy over those positions is the
held-out assistant-token loss.

The answer is what the tokenizer's chat template renders for the final assistant turn after the
prompt with the generation prompt, up to and including the tokenizer's end token (the template
must put one there: a turn that never ends cannot be matched exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HeldoutExample:
    ids: list[int]     # prompt, then the answer tokens ending with the end token
    prompt_length: int


@dataclass(frozen=True)
class HeldoutScore:
    correct: int
    total: int
    loss: float        # mean cross entropy over the answer tokens (nats)

    @property
    def exact_match(self) -> float:
        return self.correct / self.total

    def line(self) -> str:
        return f"exact match {self.correct}/{self.total} ({self.exact_match:.1%}), answer-token loss {self.loss:.4f}"


def heldout_examples(tokenizer, questions) -> list[HeldoutExample]:
    """(prompt messages, expected answer) pairs (recipes.data.heldout_questions) -> examples,
    rendered and tokenized as chat training data is."""
    examples = []
    for number, (prompt, answer) in enumerate(questions):
        prompt_ids = tokenizer.tokenize(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
        full = tokenizer.tokenize(tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": answer}]))
        where = f"held-out question {number} ({answer!r})"
        if full[:len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{where}: the chat template's rendering of the answered conversation does not "
                             "start with its rendering of the prompt, so the answer tokens cannot be found.")
        rest = full[len(prompt_ids):]
        if tokenizer.eod not in rest:
            raise ValueError(f"{where}: the chat template ends the assistant turn without the tokenizer's end "
                             f"token (id {tokenizer.eod}), so greedy decoding would never stop on it.")
        examples.append(HeldoutExample(prompt_ids + rest[:rest.index(tokenizer.eod) + 1], len(prompt_ids)))
    return examples


@torch.no_grad()
def score_heldout(model, examples: list[HeldoutExample], pad_id: int, batch_size: int = 32,
                  length_multiple: int = 1) -> HeldoutScore:
    """Exact match and answer-token loss of `model` (unwrapped FalconH1Model; a collective call
    under tensor parallelism: every rank of the group calls it). Rows are right-padded (the
    padding comes after every scored position, so causal attention never sees it) to a multiple
    of `length_multiple` (the TP size under sequence parallelism)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum, tokens = 0, 0.0, 0
    try:
        for first in range(0, len(examples), batch_size):
            chunk = examples[first:first + batch_size]
            length = -(-max(len(e.ids) for e in chunk) // length_multiple) * length_multiple
            ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            for row, example in enumerate(chunk):
                ids[row, :len(example.ids)] = torch.tensor(example.ids)
            logits = model(ids.to(device)).float().cpu()
            for row, example in enumerate(chunk):
                target = ids[row, example.prompt_length:len(example.ids)]
                scores = logits[row, example.prompt_length - 1:len(example.ids) - 1]
                correct += int(torch.equal(scores.argmax(-1), target))
                loss_sum += F.cross_entropy(scores, target, reduction="sum").item()
                tokens += len(target)
    finally:
        model.train(was_training)
    return HeldoutScore(correct, len(examples), loss_sum / tokens)



def read_heldout(entry: str) -> list[tuple[list[dict], str]]:
    """data.heldout ("chat_demo": the bundled set's held-out file) -> (prompt, answer) pairs."""
    from recipes.data.chat_demo import CHAT_DEMO, HELDOUT_FILE, heldout_questions

    return heldout_questions(HELDOUT_FILE if entry == CHAT_DEMO else entry)
