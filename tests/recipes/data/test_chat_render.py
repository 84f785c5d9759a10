"""Assistant masks vs independent references.

The reference tokenizes each message of a conversation on its own with the
`tokenizers` library (the ChatML frame written out here by hand), marking the
assistant contents and their end-of-turn tokens; transformers'
`return_assistant_tokens_mask` on the bundled template is a second reference.
"""

import json

import numpy as np
import pytest

from recipes.data.chat import Conversation, tokenize_conversations
from recipes.data.chat_demo import CHAT_TEMPLATE, TRAIN_FILE
from recipes.data.tokenizer import build_tokenizer
from tests.recipes.data.chat_helpers import conversations, copy_demo_tokenizer, encode, reference

UNTAGGED = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
DEFAULT_SYSTEM = "Be brief."
# A Qwen-like template: a default system turn when none is given, and a bos token first.
WITH_DEFAULT_SYSTEM = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}{%- endif -%}" + UNTAGGED
)


def sample_conversations():
    lines = TRAIN_FILE.read_text().splitlines()[:60]
    demo = [json.loads(line)["messages"] for line in lines]
    opening = [{"role": "assistant", "content": "Hello, ask me."}, {"role": "user", "content": "2 + 2?"},
               {"role": "assistant", "content": "4"}]
    return demo + conversations("c", 40, seed=3) + [opening, opening[:1]]


def as_conversations(convs):
    return [Conversation(f"test:{i}", messages) for i, messages in enumerate(convs)]


def check_against_reference(tokenizer, convs, prefix_of=lambda messages: ""):
    results = list(tokenize_conversations(as_conversations(convs), tokenizer))
    assert len(results) == len(convs)
    for messages, (ids, mask) in zip(convs, results):
        expected_ids, expected_mask = reference(messages, prefix_of(messages))
        assert ids.tolist() == expected_ids
        assert mask.tolist() == expected_mask
        # The whole rendering tokenized at once agrees with the piecewise reference.
        chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        assert ids.tolist() == encode(prefix_of(messages) + chatml)


def test_generation_tag_template_mask_equals_reference():
    check_against_reference(build_tokenizer("chat_demo"), sample_conversations())


def test_mask_equals_transformers_assistant_tokens_mask():
    tokenizer = build_tokenizer("chat_demo")
    hf = tokenizer.chat_tokenizer()
    convs = sample_conversations()
    for messages, (ids, mask) in zip(convs, tokenize_conversations(as_conversations(convs), tokenizer)):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ids.tolist() == list(out["input_ids"])
        assert mask.tolist() == list(out["assistant_masks"])


def test_template_without_generation_tags_found_from_rendered_prefixes(tmp_path):
    folder = copy_demo_tokenizer(tmp_path / "tok", {"chat_template": UNTAGGED})
    check_against_reference(build_tokenizer(str(folder)), sample_conversations())


def test_template_adding_a_default_system_turn_and_bos(tmp_path):
    folder = copy_demo_tokenizer(tmp_path / "tok", {"chat_template": WITH_DEFAULT_SYSTEM,
                                                    "bos_token": "<|endoftext|>"})
    convs = [c for c in sample_conversations() if c[0]["role"] != "assistant"]

    def prefix_of(messages):
        default = "" if messages[0]["role"] == "system" else (
            f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        return "<|endoftext|>" + default

    results = list(tokenize_conversations(as_conversations(convs), build_tokenizer(str(folder))))
    for messages, (ids, mask) in zip(convs, results):
        head = encode(prefix_of(messages))
        expected_ids, expected_mask = reference(messages)
        assert ids.tolist() == head + expected_ids
        assert mask.tolist() == [0] * len(head) + expected_mask


def test_opening_assistant_turn_needs_a_renderable_empty_prompt(tmp_path):
    folder = copy_demo_tokenizer(tmp_path / "tok", {"chat_template": WITH_DEFAULT_SYSTEM})
    opening = [c for c in sample_conversations() if c[0]["role"] == "assistant"]
    with pytest.raises(ValueError, match=r"test:0: opens with an assistant message.*empty prompt"):
        list(tokenize_conversations(as_conversations(opening), build_tokenizer(str(folder))))


def test_template_rewriting_earlier_turns_is_refused(tmp_path):
    # Keeps only the last assistant answer (like templates that strip earlier reasoning).
    rewriting = UNTAGGED.replace(
        "{{- message['content'] + '<|im_end|>' + '\\n' -}}{%- else -%}",
        "{{- (message['content'] if loop.last else '') + '<|im_end|>' + '\\n' -}}{%- else -%}", 1)
    assert rewriting != UNTAGGED
    folder = copy_demo_tokenizer(tmp_path / "tok", {"chat_template": rewriting})
    two_turns = conversations("r", 1, seed=1, low=2)[0]
    two_turns = [m for m in two_turns if m["role"] != "system"][:2] * 2
    with pytest.raises(ValueError, match=r"test:0: the chat template renders the turns before"):
        list(tokenize_conversations(as_conversations([two_turns]), build_tokenizer(str(folder))))


def test_template_exception_names_the_line(tmp_path):
    strict = ("{%- if messages[0]['role'] != 'user' -%}"
              "{{- raise_exception('conversations must start with a user turn') -}}{%- endif -%}"
              + CHAT_TEMPLATE)
    folder = copy_demo_tokenizer(tmp_path / "tok", {"chat_template": strict})
    messages = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(ValueError, match=r"test:0: the chat template refused.*must start with a user"):
        list(tokenize_conversations(as_conversations([messages]), build_tokenizer(str(folder))))


def test_apply_chat_template_renders_chatml_with_generation_prompt():
    tokenizer = build_tokenizer("chat_demo")
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2 + 2?"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_mask_types_and_lengths():
    convs = conversations("t", 5, seed=9)
    for ids, mask in tokenize_conversations(as_conversations(convs), build_tokenizer("chat_demo")):
        assert ids.dtype == np.int64 and mask.dtype == np.uint8 and ids.shape == mask.shape
        assert set(np.unique(mask)) <= {0, 1}


def test_token_beyond_the_vocabulary_is_refused(tmp_path):
    # transformers adds a special token the tokenizer.json (and so data.tokenizer's size) lacks.
    folder = copy_demo_tokenizer(tmp_path / "tok", {"extra_special_tokens": ["<|new|>"],
                                                    "additional_special_tokens": ["<|new|>"]})
    tokenizer = build_tokenizer(str(folder))
    messages = [{"role": "user", "content": "a <|new|> b"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match=r"test:0: token id 320 is beyond .* vocabulary of 320"):
        list(tokenize_conversations(as_conversations([messages]), tokenizer))
