"""falcon-generate, falcon-eval and the lm-eval adapter on a real (tiny) falcon-train run,
each checked against the same model exported to Hugging Face and run by transformers (and by
lm-eval's own Hugging Face model)."""

import json
import math
import os
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, free_port

TASKS = REPO / "tests" / "recipes" / "lm_eval_tasks"
PROMPT = "It was a fine morning, and "
EOS = 75  # <|endoftext|> in write_char_tokenizer
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_char_tokenizer(folder: Path) -> Path:
    """A character-level Hugging Face tokenizer (80 ids) with a chat template."""
    from tokenizers import Tokenizer, decoders, models

    chars = string.ascii_letters + string.digits + " .,;:!?'\"-()\n"
    specials = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "[UNK]"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({s: len(chars) + i for i, s in enumerate(specials)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.add_special_tokens(specials)
    tokenizer.decoder = decoders.Fuse()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE}))
    return folder / "tokenizer.json"


def run_cli(module: str, *args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **OFFLINE)
    cmd = [sys.executable, "-m", module, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step falcon-train run of the micro model on the bundled corpus with the char tokenizer,
    and the same model exported to Hugging Face (tokenizer files beside it)."""
    tmp = tmp_path_factory.mktemp("gen_eval")
    tokenizer = write_char_tokenizer(tmp / "tokenizer")
    run_dir = tmp / "run"
    proc = run_cli("recipes.train", "model=falcon_h1_micro", "logger=none", "logger.progress_bar=false",
                   f"data.tokenizer={tokenizer}", f"data.cache_dir={tmp / 'cache'}", "data.seq_length=64",
                   "train.max_steps=4", "train.warmup_steps=1", "train.save_interval=4", "train.micro_batch_size=4",
                   "train.global_batch_size=4", "train.sample_tokens=24", f"train.sample_prompt='{PROMPT}'",
                   f"train.run_dir={run_dir}")
    export = tmp / "hf"
    code = (f"import falcon_h1\nfrom recipes.api import load_trained_model\n"
            f"falcon_h1.to_hf(load_trained_model({str(run_dir)!r})[0], {str(export)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer.parent / name, export / name)
    config = json.loads((export / "config.json").read_text())  # the tokenizer's special ids, for HF's generate
    config.update(eos_token_id=EOS, pad_token_id=EOS + 1, bos_token_id=None)
    (export / "config.json").write_text(json.dumps(config))
    return {"run": run_dir, "hf": export, "tokenizer": tokenizer, "train_stdout": proc.stdout}


@pytest.fixture(scope="module")
def hf_model(trained):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(trained["hf"], dtype=torch.float32).eval()


def encode(trained, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(trained["tokenizer"])).encode(text, add_special_tokens=False).ids


def decode(trained, ids) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(trained["tokenizer"])).decode(list(ids), skip_special_tokens=True)


def hf_continuation(hf_model, ids: list[int], max_new_tokens: int, **sampling) -> list[int]:
    if sampling:
        torch.manual_seed(sampling.pop("seed"))
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=EOS,
                                pad_token_id=EOS, do_sample=bool(sampling), **sampling)
    new = out[0, len(ids):].tolist()
    return new[: new.index(EOS)] if EOS in new else new


def test_training_ends_with_the_sample_transformers_draws(trained, hf_model):
    """The run's sample (temperature 0.8, seed = train.seed) equals HF's sampling from the exported
    model with the same seed, the prompt starting a document (after the end-of-document token)."""
    line = next(l for l in trained["train_stdout"].splitlines() if l.startswith("sample:"))
    expected = hf_continuation(hf_model, [EOS] + encode(trained, PROMPT), 24, seed=1234, temperature=0.8, top_k=0)
    assert line == "sample:      " + PROMPT + decode(trained, expected)


def test_falcon_generate_on_a_run_dir_equals_transformers(trained, hf_model, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run_cli("recipes.generate", str(trained["run"]), "--prompt", PROMPT, "--prompt", "She said",
                   "--max-new-tokens", "20", "--do-sample", "--temperature", "1.2", "--seed", "3",
                   "--output", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPT, "She said"]
    for row in rows:
        expected = hf_continuation(hf_model, [EOS] + encode(trained, row["prompt"]), 20, seed=3, temperature=1.2,
                                   top_k=0)
        assert row["completion"] == decode(trained, expected)
        assert f">>> {row['prompt']}\n{row['completion']}\n" in proc.stdout  # streamed under its prompt


def test_falcon_generate_chat_on_the_hf_dir_uses_the_template(trained, hf_model, tmp_path):
    from transformers import AutoTokenizer

    prompts = tmp_path / "chat.jsonl"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Emma?"}]
    prompts.write_text(json.dumps({"messages": conversation}) + "\n" + json.dumps({"prompt": "And Jane?"}) + "\n")
    out = tmp_path / "out.jsonl"
    run_cli("recipes.generate", str(trained["hf"]), "--file", str(prompts), "--chat", "--max-new-tokens", "12",
            "--batch-size", "2", "--output", str(out))
    hf_tok = AutoTokenizer.from_pretrained(trained["hf"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row, messages in zip(rows, [conversation, [{"role": "user", "content": "And Jane?"}]]):
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert row["completion"] == decode(trained, hf_continuation(hf_model, list(ids), 12))


def reference_perplexity(trained, hf_model, texts: list[str], seq_length: int) -> float:
    """Documents + end-of-document tokens, windows of seq_length predictions overlapping by one
    token, HF logits, float64 cross entropy."""
    stream = [i for t in texts for i in encode(trained, t) + [EOS]]
    nll, count = 0.0, 0
    for start in range(0, len(stream) - 1, seq_length):
        window = torch.tensor(stream[start:start + seq_length + 1])
        with torch.no_grad():
            logits = hf_model(window[None, :-1]).logits[0].double()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_data") / "held_out.jsonl"
    texts = [json.loads(line)["text"] for line in (TASKS / "tiny_text.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts


@pytest.mark.parametrize("tp", [1, 2])
def test_falcon_eval_perplexity_equals_transformers(trained, hf_model, held_out, tp):
    path, texts = held_out
    proc = run_cli("recipes.evaluate", str(trained["run"]), "--data", str(path), "--seq-length", "40",
                   "--batch-size", "3", "--tp", str(tp), nproc=tp)
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    expected = reference_perplexity(trained, hf_model, texts, 40)
    assert result["tokens"] == sum(len(encode(trained, t)) + 1 for t in texts) - 1
    assert abs(result["perplexity"] - expected) <= 1e-5 * expected
    n_bytes = sum(len(t.encode()) for t in texts)
    assert abs(result["bits_per_byte"] - math.log(expected) * result["tokens"] / math.log(2) / n_bytes) <= 1e-6


def test_lm_eval_adapter_on_the_run_equals_lm_eval_on_the_hf_export(trained, tmp_path, monkeypatch):
    """Our adapter scores the Megatron checkpoint directly; lm-eval's own Hugging Face model
    scores the export: same metrics and the same per-example scores and generations."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = ["tiny_choice", "tiny_rolling", "tiny_generate"]
    out = tmp_path / "ours.json"
    run_cli("recipes.evaluate", str(trained["run"]), "--tasks", ",".join(tasks), "--include-path", str(TASKS),
            "--seq-length", "64", "--output", str(out), "--log-samples")
    ours = json.loads(out.read_text())
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={trained['hf']},dtype=float32,device=cpu,"
                             "max_length=64", tasks=tasks, task_manager=TaskManager(include_path=str(TASKS)),
                             log_samples=True, batch_size=1)
    for task in tasks:
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        reference = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine) == len(reference) > 0
        for a, b in zip(mine, reference):
            assert len(_flat(a["resps"])) == len(_flat(b["resps"])) > 0
            for x, y in zip(_flat(a["resps"]), _flat(b["resps"])):
                assert x == pytest.approx(y, rel=1e-5, abs=1e-5) if isinstance(y, float) else x == y, task


def _flat(value):
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]


def test_bad_inputs_are_named(trained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    proc = run_cli("recipes.evaluate", str(trained["run"]), "--data", str(bad), check=False)
    assert proc.returncode == 2 and "line 2 is not JSON" in proc.stderr
    proc = run_cli("recipes.generate", str(tmp_path), "--prompt", "x", check=False)
    assert proc.returncode == 2 and "neither a falcon-train run directory" in proc.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(trained["tokenizer"], plain / "tokenizer.json")  # no tokenizer_config.json: no chat template
    proc = run_cli("recipes.generate", str(trained["hf"]), "--prompt", "x", "--chat", "--tokenizer", str(plain),
                   check=False)
    assert proc.returncode == 2 and "has no chat template" in proc.stderr
