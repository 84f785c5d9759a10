"""Bad input a new user can type at the command-line tools (`falcon-train`, `falcon-preprocess`,
`falcon-generate`, `falcon-eval`), one row per input: each must end with a non-zero exit code
(2: a setting or an argument to change), no Python traceback, and a message naming the field or
file and the value.

Every row is its own test (`test_a_bad_input_gets_a_clear_error[ROW]`), so `pytest -q` on this
file counts inputs tried and inputs with a clear error. The rows run through the tools' entry
points in two driver processes (tests/recipes/cli_driver.py): one for the torch-free
falcon-train checks, one that imports torch once for the other tools; a few rows also run
as real `python -m ...` commands to show that the driver reports what a user sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import REPO

TRAIN, PREPROCESS = "recipes.train", "recipes.data.preprocess"
GENERATE, EVALUATE = "recipes.generate", "recipes.evaluate"


class BadInput(NamedTuple):
    id: str
    module: str
    argv: tuple[str, ...]   # "{d}" stands for the folder of bad files (bad_files below)
    names: tuple[str, ...]  # what the error must say: the field or file and the value
    code: int = 2


def train(id: str, *overrides: str, names: tuple[str, ...], dry: bool = True) -> BadInput:
    return BadInput(id, TRAIN, (("dryrun=true",) if dry else ()) + overrides, names)


def tool(module: str, id: str, *argv: str, names: tuple[str, ...]) -> BadInput:
    return BadInput(id, module, argv, names)


K8S = ("executor=kubernetes", "executor.kubernetes.image=img")
NO_MODEL = "{d}/no_model"  # generate / eval check their arguments before they read the model

TRAIN_INPUTS = [
    # keys and types Hydra refuses
    train("unknown_key", "train.max_stepz=3", names=("train.max_stepz", "not in 'TrainConfig'")),
    train("unknown_key_appended", "+train.max_stepz=3", names=("train.max_stepz = 3", "did you mean train.max_steps")),
    train("int_given_text", "train.max_steps=abc", names=("train.max_steps=abc", "Integer")),
    train("float_given_text", "train.lr=fast", names=("train.lr=fast", "Float")),
    train("bool_given_text", "train.resume=maybe", names=("train.resume=maybe", "not a valid bool")),
    train("int_given_list", "train.max_steps=[1,2]", names=("train.max_steps=[1,2]",)),
    train("unparsable_override", "'train.lr=1e-3", names=("'train.lr=1e-3", "override_grammar")),
    train("ambiguous_list", "data.split=50,50,50", names=("data.split=50,50,50", "quote the value")),
    train("unknown_model", "model=nope", names=("model/nope", "falcon_h1_0_5b")),
    train("unknown_train_group", "train=nope", names=("train/nope", "pretrain")),
    train("unknown_executor_group", "executor=aws", names=("executor/aws", "slurm")),
    train("unknown_mup_group", "mup=magic", names=("mup/magic", "derived")),
    train("unknown_bitnet_group", "bitnet=maybe", names=("bitnet/maybe", "on")),
    train("bitnet_float_input_on_int8_gemm", "bitnet=on", "bitnet.int8_matmul=true", "bitnet.saved_input=float",
          names=("bitnet.saved_input = 'float'", "bitnet.int8_matmul = true")),
    BadInput("cfg_job_unknown_key", TRAIN, ("--cfg", "job", "train.max_stepz=2"), ("train.max_stepz",)),
    BadInput("sweep_value_of_wrong_type", TRAIN, ("-m", "dryrun=true", "train.lr=1e-3,abc"), ("train.lr=abc", "Float")),
    train("moved_mup_key", "mup.key_multiplier=0.5", names=("mup.key_multiplier", "model.key_multiplier")),
    train("unknown_mup_mode", "mup.mode=magic", names=("mup.mode = 'magic'", "derived")),
    # training settings
    train("zero_steps", "train.max_steps=0", names=("train.max_steps = 0",)),
    train("negative_steps", "train.max_steps=-5", names=("train.max_steps = -5",)),
    train("negative_lr", "train.lr=-1", names=("train.lr = -1.0",)),
    train("min_lr_above_lr", "train.min_lr=1", names=("train.min_lr = 1.0", "train.lr = 0.003")),
    train("negative_weight_decay", "train.weight_decay=-1", names=("train.weight_decay = -1.0",)),
    train("adam_beta1_above_one", "train.adam_beta1=1.5", names=("train.adam_beta1 = 1.5", "[0, 1)")),
    train("adam_beta2_negative", "train.adam_beta2=-0.1", names=("train.adam_beta2 = -0.1", "[0, 1)")),
    train("adam_eps_zero", "train.adam_eps=0", names=("train.adam_eps = 0.0", "> 0")),
    train("negative_grad_clip", "train.grad_clip=-1", names=("train.grad_clip = -1.0",)),
    train("zero_micro_batch", "train.micro_batch_size=0", names=("train.micro_batch_size = 0",)),
    train("batch_not_a_multiple", "train.micro_batch_size=3", names=("train.global_batch_size = 8", "micro_batch_size = 3")),
    train("warmup_beyond_steps", "train.warmup_steps=100", names=("train.warmup_steps = 100", "max_steps = 60")),
    train("unknown_decay_style", "train.lr_decay_style=exp", names=("train.lr_decay_style = 'exp'", "WSD")),
    train("wsd_decay_too_long", "train.lr_decay_style=WSD", "train.lr_wsd_decay_steps=1000",
          names=("train.lr_wsd_decay_steps = 1000",)),
    train("unknown_precision", "train.precision=fp16", names=("train.precision = 'fp16'", "bf16")),
    train("unknown_recompute", "train.recompute=all", names=("train.recompute = 'all'", "selective")),
    train("negative_save_interval", "train.save_interval=-1", names=("train.save_interval = -1",)),
    train("keep_no_checkpoint", "train.keep_checkpoints=0", names=("train.keep_checkpoints = 0",)),
    train("negative_eval_interval", "train.eval_interval=-1", names=("train.eval_interval = -1",)),
    train("zero_log_interval", "train.log_interval=0", names=("train.log_interval = 0",)),
    train("negative_sample_tokens", "train.sample_tokens=-1", names=("train.sample_tokens = -1",)),
    train("cuda_graph_with_recompute", "train.cuda_graph=true", "train.recompute=full",
          names=("train.recompute = 'full'", "train.cuda_graph")),
    train("missing_load_dir", "train.load_dir={d}/no_such_model", names=("train.load_dir", "no_such_model")),
    # model shapes
    train("heads_not_divisible", "model.num_attention_heads=7", names=("num_attention_heads = 7",)),
    train("zero_heads", "model.num_attention_heads=0", names=("model.num_attention_heads = 0",)),
    train("zero_hidden_size", "model.hidden_size=0", names=("model.hidden_size = 0",)),
    train("zero_layers", "model.num_hidden_layers=0", names=("model.num_hidden_layers = 0",)),
    train("zero_vocab", "model.vocab_size=0", names=("model.vocab_size = 0",)),
    train("unknown_layer_kind", "model.layer_pattern=HXZH", names=("model.layer_pattern = 'HXZH'", "H hybrid")),
    train("layer_pattern_too_short", "model.layer_pattern=HH", names=("model.layer_pattern = 'HH'", "num_hidden_layers = 4")),
    train("attention_ratio_negative", "model.attention_ratio=-0.5", names=("model.attention_ratio = -0.5", "[0, 1]")),
    train("negative_rope_theta", "model.rope_theta=-1", names=("model.rope_theta = -1.0", "> 0")),
    train("zero_conv_width", "model.mamba_d_conv=0", names=("model.mamba_d_conv = 0",)),
    train("no_positions", "model.max_position_embeddings=0", names=("data.seq_length = 128", "max_position_embeddings = 0")),
    # parallel layout
    train("tp_not_dividing_heads", "parallel.tp=3", names=("parallel.tp = 3", "num_key_value_heads = 2")),
    train("tp_released_model", "model=falcon_h1_0_5b", "parallel.tp=3", names=("parallel.tp = 3",)),
    train("zero_tp", "parallel.tp=0", names=("parallel.tp = 0",)),
    train("tp_given_text", "parallel.tp=two", names=("parallel.tp=two", "Integer")),
    train("pp_not_dividing_layers", "parallel.pp=5", names=("parallel.pp = 5", "num_hidden_layers = 4")),
    train("cp_not_dividing_seq", "parallel.cp=3", names=("data.seq_length = 128", "parallel.cp = 6")),
    train("cp_too_large", "parallel.cp=64", names=("parallel.cp = 64", "mamba_d_conv")),
    train("zero_dp", "parallel.dp=0", names=("parallel.dp = 0",)),
    train("sequence_parallel_odd_seq", "parallel.sequence_parallel=true", "parallel.tp=2", "data.seq_length=127",
          names=("data.seq_length = 127", "sequence_parallel")),
    train("zero_processes", "executor.nproc_per_node=0", names=("executor.nproc_per_node = 0",)),
    # data
    train("zero_seq_length", "data.seq_length=0", names=("data.seq_length = 0",)),
    train("seq_length_beyond_positions", "data.seq_length=1000000", names=("data.seq_length = 1000000", "4096")),
    train("unknown_data_kind", "data.kind=image", names=("data.kind = 'image'", "chat")),
    train("missing_dataset", "data=indexed", "data.paths=[{d}/no_data]", names=("data.paths", "no_data.bin")),
    train("no_datasets", "data.paths=[]", names=("data.paths is empty",)),
    train("missing_tokenizer", "data.tokenizer={d}/no_tokenizer.json", names=("data.tokenizer", "no_tokenizer.json")),
    train("split_not_numbers", "data.split='98,x'", names=("data.split", "98,x")),
    train("chat_setting_on_text", "data.overlong=cut", names=("data.overlong = 'cut'", "data.kind = chat")),
    train("negative_workers", "data.num_workers=-1", names=("data.num_workers = -1",)),
    train("missing_chat_file", "data=chat", "data.paths=[{d}/no_chats.jsonl]", names=("data.paths", "no_chats.jsonl")),
    train("chat_without_template", "data=chat", "data.tokenizer=byte", names=("data.tokenizer = 'byte'", "chat template")),
    train("overlong_policy", "data=chat", "data.overlong=cut", names=("data.overlong = 'cut'", "drop")),
    train("heldout_not_jsonl", "data=chat", "data.heldout={d}/questions.txt", names=("data.heldout", "questions.txt")),
    # logger and executors
    train("unknown_wandb_mode", "logger.wandb_mode=cloud", names=("logger.wandb_mode = 'cloud'", "offline")),
    train("unknown_executor_kind", "executor.kind=aws", names=("executor.kind = 'aws'", "kubernetes")),
    train("slurm_time", "executor=slurm", "executor.slurm.time=forever", names=("executor.slurm.time = 'forever'",)),
    train("slurm_zero_nodes", "executor=slurm", "executor.slurm.nodes=0", names=("executor.slurm.nodes = 0",)),
    train("slurm_tunnel", "executor=slurm", "executor.slurm.tunnel=ftp", names=("executor.slurm.tunnel = 'ftp'", "ssh")),
    train("slurm_ssh_without_host", "executor=slurm", "executor.slurm.tunnel=ssh", names=("executor.slurm.ssh_host",)),
    train("slurm_port", "executor=slurm", "executor.slurm.master_port=0", names=("executor.slurm.master_port = 0",)),
    train("slurm_retries", "executor=slurm", "executor.slurm.max_retries=-1", names=("executor.slurm.max_retries = -1",)),
    train("slurm_gpus", "executor=slurm", "executor.slurm.gpus_per_node=-1", names=("executor.slurm.gpus_per_node = -1",)),
    train("slurm_controller_down", "executor=slurm", "train.run_dir={d}/slurm_run", dry=False,
          names=("Slurm controller", "Unable to contact slurm controller")),
    train("kubernetes_no_image", "executor=kubernetes", names=("executor.kubernetes.image = None",)),
    train("kubernetes_namespace", *K8S, "executor.kubernetes.namespace=Bad_NS",
          names=("executor.kubernetes.namespace = 'Bad_NS'",)),
    train("kubernetes_restart_policy", *K8S, "executor.kubernetes.restart_policy=Sometimes",
          names=("executor.kubernetes.restart_policy = 'Sometimes'", "OnFailure")),
    train("kubernetes_zero_nodes", *K8S, "executor.kubernetes.nodes=0", names=("executor.kubernetes.nodes = 0",)),
    train("kubernetes_port", *K8S, "executor.kubernetes.master_port=70000",
          names=("executor.kubernetes.master_port = 70000",)),
]

TOOL_INPUTS = [
    train("unknown_bitnet_layer", "bitnet=on", "bitnet.layers=[attention_qkv,conv]", names=("bitnet.layers", "conv")),
    # falcon-preprocess
    tool(PREPROCESS, "preprocess_missing_input", "{d}/no_corpus.jsonl", "--output-prefix", "{d}/out/a",
         names=("no_corpus.jsonl", "no such file")),
    tool(PREPROCESS, "preprocess_line_not_json", "{d}/text_not_json.jsonl", "--output-prefix", "{d}/out/b",
         names=("text_not_json.jsonl:2", "not a JSON object")),
    tool(PREPROCESS, "preprocess_missing_key", "{d}/text_other_key.jsonl", "--output-prefix", "{d}/out/c",
         names=("text_other_key.jsonl:1", "'text'", "body")),
    tool(PREPROCESS, "preprocess_missing_tokenizer", "{d}/text_other_key.jsonl", "--output-prefix", "{d}/out/d",
         "--tokenizer", "{d}/no_tokenizer.json", names=("no_tokenizer.json",)),
    tool(PREPROCESS, "preprocess_json_key_with_chat", "--chat", "{d}/chat_not_json.jsonl", "--output-prefix",
         "{d}/out/e", "--json-key", "body", names=("--json-key 'body'", "--chat")),
    tool(PREPROCESS, "chat_line_not_json", "--chat", "{d}/chat_not_json.jsonl", "--output-prefix", "{d}/out/f",
         "--tokenizer", "chat_demo", names=("chat_not_json.jsonl:2", "not valid JSON")),
    tool(PREPROCESS, "chat_unknown_role", "--chat", "{d}/chat_bad_role.jsonl", "--output-prefix", "{d}/out/g",
         "--tokenizer", "chat_demo", names=("chat_bad_role.jsonl", "robot")),
    tool(PREPROCESS, "chat_missing_content", "--chat", "{d}/chat_no_content.jsonl", "--output-prefix", "{d}/out/h",
         "--tokenizer", "chat_demo", names=("chat_no_content.jsonl", "content")),
    tool(PREPROCESS, "chat_no_messages", "--chat", "{d}/text_other_key.jsonl", "--output-prefix", "{d}/out/i",
         "--tokenizer", "chat_demo", names=("text_other_key.jsonl", "messages")),
    tool(PREPROCESS, "chat_tokenizer_without_template", "--chat", "{d}/chats.jsonl", "--output-prefix",
         "{d}/out/j", "--tokenizer", "byte", names=("byte", "chat template")),
    # falcon-generate
    tool(GENERATE, "generate_missing_model", "{d}/no_model", "--prompt", "Hi", names=("no_model",)),
    tool(GENERATE, "generate_zero_new_tokens", NO_MODEL, "--prompt", "Hi", "--max-new-tokens", "0",
         names=("--max-new-tokens 0",)),
    tool(GENERATE, "generate_zero_temperature", NO_MODEL, "--prompt", "Hi", "--do-sample", "--temperature", "0",
         names=("temperature = 0.0", "> 0")),
    tool(GENERATE, "generate_top_p_above_one", NO_MODEL, "--prompt", "Hi", "--do-sample", "--top-p", "1.5",
         names=("top_p = 1.5", "0 < top_p <= 1")),
    tool(GENERATE, "generate_zero_top_k", NO_MODEL, "--prompt", "Hi", "--do-sample", "--top-k", "0",
         names=("top_k = 0",)),
    tool(GENERATE, "generate_sampling_setting_greedy", NO_MODEL, "--prompt", "Hi", "--temperature", "0.7",
         names=("temperature = 0.7", "do_sample")),
    tool(GENERATE, "generate_temperature_not_a_number", NO_MODEL, "--prompt", "Hi", "--temperature", "hot",
         names=("--temperature", "hot")),
    tool(GENERATE, "generate_zero_batch", NO_MODEL, "--prompt", "Hi", "--batch-size", "0", names=("--batch-size 0",)),
    tool(GENERATE, "generate_zero_tp", NO_MODEL, "--prompt", "Hi", "--tp", "0", names=("--tp 0",)),
    tool(GENERATE, "generate_no_prompt", NO_MODEL, names=("no prompts", "--prompt")),
    tool(GENERATE, "generate_missing_prompt_file", NO_MODEL, "--file", "{d}/no_prompts.txt",
         names=("--file", "no_prompts.txt")),
    tool(GENERATE, "generate_prompt_line_not_json", NO_MODEL, "--file", "{d}/text_not_json.jsonl",
         names=("text_not_json.jsonl line 2", "JSON")),
    tool(GENERATE, "generate_prompt_line_without_prompt", NO_MODEL, "--file", "{d}/text_other_key.jsonl",
         names=("text_other_key.jsonl line 1", "'prompt'")),
    tool(GENERATE, "generate_hf_dir_without_weights", "{d}/hf_config_only", "--prompt", "Hi",
         names=("hf_config_only",)),
    # falcon-eval
    tool(EVALUATE, "eval_missing_model", "{d}/no_model", "--data", "{d}/eval.txt", names=("no_model",)),
    tool(EVALUATE, "eval_nothing_to_score", NO_MODEL, names=("--data", "--tasks")),
    tool(EVALUATE, "eval_missing_data", NO_MODEL, "--data", "{d}/no_eval.jsonl", names=("--data", "no_eval.jsonl")),
    tool(EVALUATE, "eval_line_not_json", NO_MODEL, "--data", "{d}/text_not_json.jsonl",
         names=("text_not_json.jsonl line 2", "JSON")),
    tool(EVALUATE, "eval_line_without_field", NO_MODEL, "--data", "{d}/text_other_key.jsonl",
         names=("text_other_key.jsonl line 1", "'text'")),
    tool(EVALUATE, "eval_empty_data", NO_MODEL, "--data", "{d}/empty.jsonl", names=("empty.jsonl", "no text")),
    tool(EVALUATE, "eval_zero_seq_length", NO_MODEL, "--data", "{d}/eval.txt", "--seq-length", "0",
         names=("--seq-length 0",)),
    tool(EVALUATE, "eval_zero_batch", NO_MODEL, "--data", "{d}/eval.txt", "--batch-size", "0",
         names=("--batch-size 0",)),
    tool(EVALUATE, "eval_negative_fewshot", NO_MODEL, "--tasks", "x", "--num-fewshot", "-1",
         names=("--num-fewshot -1",)),
    tool(EVALUATE, "eval_log_samples_without_output", NO_MODEL, "--tasks", "x", "--log-samples",
         names=("--log-samples", "--output")),
    tool(EVALUATE, "eval_run_dir_without_checkpoint", "{d}/run_without_checkpoint", "--data", "{d}/eval.txt",
         names=("run_without_checkpoint",)),
]

ALL_INPUTS = TRAIN_INPUTS + TOOL_INPUTS
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


def bad_files(folder: Path) -> Path:
    """The files the rows name: malformed lines, a model folder without weights, a fake Slurm."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text_not_json.jsonl").write_text('{"text": "fine", "prompt": "fine"}\nnot json\n')
    (folder / "text_other_key.jsonl").write_text('{"body": "the text is under another key"}\n')
    (folder / "chat_not_json.jsonl").write_text(CHAT + "\n{'messages': oops\n")
    (folder / "chats.jsonl").write_text(CHAT + "\n")
    (folder / "chat_bad_role.jsonl").write_text(CHAT.replace('"assistant"', '"robot"') + "\n")
    (folder / "chat_no_content.jsonl").write_text(CHAT.replace('"content": "hi"', '"text": "hi"') + "\n")
    (folder / "empty.jsonl").write_text("")
    (folder / "eval.txt").write_text("Some text to score.\n")
    (folder / "questions.txt").write_text("What is 2 + 3?\n")
    (folder / "hf_config_only").mkdir(exist_ok=True)
    (folder / "hf_config_only" / "config.json").write_text(json.dumps({"model_type": "falcon_h1"}))
    (folder / "run_without_checkpoint").mkdir(exist_ok=True)
    (folder / "run_without_checkpoint" / "config.yaml").write_text("name: falcon_h1_tiny\n")
    fake_bin = folder / "bin"
    fake_bin.mkdir(exist_ok=True)
    for command in ("sbatch", "squeue", "sinfo", "scontrol", "sacct"):  # a login node whose controller is down
        script = fake_bin / command
        script.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller "
                          "(connect failure)' >&2\nexit 1\n")
        script.chmod(0o755)
    return folder


def _environment(folder: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def _argv(row: BadInput, folder: Path) -> list[str]:
    return [arg.replace("{d}", str(folder)) for arg in row.argv]


def _drive(rows: list[BadInput], folder: Path) -> dict[str, dict]:
    cases = folder / f"cases-{rows[0].id}.json"
    cases.write_text(json.dumps([{"id": r.id, "module": r.module, "argv": _argv(r, folder)} for r in rows]))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "recipes" / "cli_driver.py"), str(cases)],
                          cwd=folder, env=_environment(folder), capture_output=True, text=True, timeout=600)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["id"]] = record
    assert results, done.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return bad_files(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(scope="module")
def results(folder) -> dict[str, dict]:
    return {**_drive(TRAIN_INPUTS, folder), **_drive(TOOL_INPUTS, folder)}


def test_the_table_holds_at_least_70_distinct_inputs():
    assert len({row.id for row in ALL_INPUTS}) == len(ALL_INPUTS)
    assert len({(row.module, row.argv) for row in ALL_INPUTS}) == len(ALL_INPUTS) >= 70


@pytest.mark.parametrize("row", ALL_INPUTS, ids=[row.id for row in ALL_INPUTS])
def test_a_bad_input_gets_a_clear_error(row, results, folder):
    result = results.get(row.id)
    assert result is not None, f"{row.id}: the driver stopped before it (see the rows before)"
    stderr = result["stderr"]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert result["code"] == row.code, (result["code"], stderr[-2000:])
    missing = [name.replace("{d}", str(folder)) for name in row.names if name.replace("{d}", str(folder)) not in stderr]
    assert not missing, f"the error does not say {missing}:\n{stderr[-2000:]}"


@pytest.mark.parametrize("row_id", ["unknown_key", "adam_eps_zero", "generate_zero_new_tokens"])
def test_the_real_command_prints_what_the_driver_saw(row_id, results, folder):
    row = next(r for r in ALL_INPUTS if r.id == row_id)
    done = subprocess.run([sys.executable, "-m", row.module, *_argv(row, folder)], cwd=folder,
                          env=_environment(folder), capture_output=True, text=True, timeout=300)
    assert done.returncode == results[row_id]["code"] == row.code
    last_line = results[row_id]["stderr"].strip().splitlines()[-1]
    assert last_line in done.stderr and "Traceback" not in done.stderr
