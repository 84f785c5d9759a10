"""Bad chat input: each a clear error naming the file/line or field, or a counted skip."""

import json

import pytest

from recipes.config import DataConfig
from recipes.data import build_chat_datasets, build_tokenizer, validate_data_config
from recipes.data.chat import read_chat_file
from recipes.data.preprocess import main as preprocess_main
from tests.recipes.data.chat_helpers import conversations, copy_demo_tokenizer, write_chat_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def chat_config(paths, **kwargs):
    return DataConfig(kind="chat", paths=[str(p) for p in paths], **{"tokenizer": "chat_demo", **kwargs})


def build(cfg, seq_length=128):
    return build_chat_datasets(cfg, seq_length, 1, 1, 0, build_tokenizer(cfg.tokenizer))


@pytest.mark.parametrize("bad_line, expected", [
    ('{"messages": [', r"c\.jsonl:3: not valid JSON"),
    ('["not", "an object"]', r"c\.jsonl:3: expected an object with a \"messages\" list.*list"),
    ('{"text": "raw"}', r"c\.jsonl:3: expected an object .*\['text'\]"),
    ('{"messages": []}', r"c\.jsonl:3: \"messages\" = \[\]: expected a non-empty list"),
    ('{"messages": ["hi"]}', r"c\.jsonl:3: messages\[0\] = 'hi': expected an object"),
    ('{"messages": [{"role": "tool", "content": "x"}]}',
     r"c\.jsonl:3: messages\[0\] has role 'tool'; allowed roles: system, user, assistant"),
    ('{"messages": [{"role": "user", "content": 5}]}',
     r"c\.jsonl:3: messages\[0\] \(user\) has content 5; expected a string"),
])
def test_malformed_lines_name_file_and_line(tmp_path, bad_line, expected):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), "", bad_line, json.dumps(GOOD)])
    with pytest.raises(ValueError, match=expected):
        build(chat_config([path]))


def test_preprocess_reports_the_bad_line(tmp_path, capsys):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), '{"messages": [{"role": "bot"'])
    argv = ["--chat", str(path), "--output-prefix", str(tmp_path / "o"), "--tokenizer", "chat_demo"]
    assert preprocess_main(argv) == 2
    assert "c.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not list(tmp_path.glob("o*"))  # nothing half-written


def test_conversations_without_assistant_are_skipped_and_counted(tmp_path):
    no_answer = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), json.dumps(no_answer)] * 3)
    assert read_chat_file(path).skipped_no_assistant == [f"{path}:{n}" for n in (2, 4, 6)]
    train, _ = build(chat_config([path], split="100,0,0"))
    assert train.report.sources[0].skipped_no_assistant == 3
    assert "skipped 3 without an assistant turn" in train.report.lines()[0]
    assert train.counts.conversations == 3


def test_file_of_only_unanswered_conversations_is_an_error(tmp_path):
    no_answer = {"messages": [{"role": "user", "content": "q"}]}
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(no_answer)] * 2)
    with pytest.raises(ValueError, match="all 2 conversations lack an assistant turn"):
        read_chat_file(path)


def test_empty_file_is_an_error(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"empty\.jsonl.*holds no conversation"):
        build(chat_config([path]))


def test_tokenizer_without_chat_template(tmp_path):
    data = write_chat_jsonl(tmp_path / "c.jsonl", conversations("a", 3, seed=0))
    bare = copy_demo_tokenizer(tmp_path / "bare", {"chat_template": None})
    for spec in (str(bare), str(bare / "tokenizer.json"), "byte"):
        with pytest.raises(ValueError, match=rf"data.tokenizer = '{spec}' has no chat template"):
            validate_data_config(chat_config([data], tokenizer=spec))
    with pytest.raises(ValueError, match="has no chat template.*tokenizer_config.json"):
        build_tokenizer(str(bare)).chat_tokenizer()
    with pytest.raises(ValueError, match="'byte' has no chat template"):
        build_tokenizer("byte").apply_chat_template(GOOD["messages"])


def test_chat_template_file_beside_the_tokenizer_is_found(tmp_path):
    from recipes.data.chat_demo import CHAT_TEMPLATE

    folder = copy_demo_tokenizer(tmp_path / "tok", {"chat_template": None})
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    data = write_chat_jsonl(tmp_path / "c.jsonl", conversations("a", 3, seed=0))
    validate_data_config(chat_config([data], tokenizer=str(folder)))
    assert build_tokenizer(str(folder)).apply_chat_template(GOOD["messages"]).startswith(
        "<|im_start|>user\nhi<|im_end|>")


def test_config_errors_name_field_value_and_choices(tmp_path):
    text_set = tmp_path / "text_document"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"text_document{suffix}").write_bytes(b"")
    cfg = chat_config([tmp_path / "missing.jsonl", text_set, tmp_path / "nothing"],
                      overlong="cut", packing="yes", cache_dir="/tmp/x", seq_length=1)
    with pytest.raises(ValueError) as error:
        validate_data_config(cfg)
    message = str(error.value)
    for expected in ("missing.jsonl': no such file", "is a text dataset (no assistant mask)",
                     "nothing' is neither a chat file nor a preprocessed chat set",
                     "data.overlong = 'cut' is not allowed: one of ('truncate', 'drop')",
                     "data.packing = 'yes'", "data.cache_dir = '/tmp/x' is not used",
                     "data.seq_length = 1"):
        assert expected in message


def test_data_kind_is_checked_and_chat_fields_refused_for_text():
    with pytest.raises(ValueError, match=r"data.kind = 'chats' is not allowed: one of \('text', 'chat'\)"):
        validate_data_config(DataConfig(kind="chats"))
    with pytest.raises(ValueError, match="data.packing = False applies to data.kind = chat only"):
        validate_data_config(DataConfig(packing=False))
    with pytest.raises(ValueError, match="data.overlong = 'drop' applies to data.kind = chat only"):
        validate_data_config(DataConfig(overlong="drop"))


def test_no_train_conversation_left_is_an_error(tmp_path):
    long_one = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x " * 60}]}
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(long_one)] * 2)
    with pytest.raises(ValueError, match=r"c\.jsonl' leaves no train conversation.*data.overlong = 'drop'"):
        build(chat_config([path], overlong="drop", split="100,0,0"), seq_length=16)


def test_valid_split_without_conversations_is_an_error(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD)] * 5)
    with pytest.raises(ValueError, match="data.split = '99,1,0' leaves the valid split without"):
        build(chat_config([path], split="99,1,0"))


def test_composed_chat_config_validates():
    from recipes.api import compose_recipe
    from recipes.build import validate_recipe

    recipe = compose_recipe(["data=chat"])
    assert (recipe.data.kind, recipe.data.paths, recipe.data.tokenizer) == ("chat", ["chat_demo"], "chat_demo")
    validate_recipe(recipe)
    assert build_tokenizer(recipe.data.tokenizer).vocab_size <= recipe.model.vocab_size


def test_pretraining_datasets_refuse_chat_data():
    from recipes.data import build_train_valid_datasets

    cfg = DataConfig(kind="chat", paths=["chat_demo"], tokenizer="chat_demo")
    with pytest.raises(ValueError, match="data.kind = 'chat' is not allowed for pretraining datasets"):
        build_train_valid_datasets(cfg, 128, 1, 8, 0, build_tokenizer("chat_demo"))
