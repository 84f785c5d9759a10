"""Tracker and run metadata: every backend is read back with its own reader.

- metrics.jsonl with `json`;
- TensorBoard with tensorboard's EventAccumulator;
- W&B offline runs by decoding the run's `.wandb` transaction log directly: a
  LevelDB-log framed stream (32 KiB blocks, 7-byte record headers) of
  `wandb_internal_pb2.Record` protobufs after a 7-byte ":W&B" file header.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recipes.api import compose_recipe
from recipes.config import LoggerConfig, RecipeConfig
from recipes.run_metadata import PROJECT_ROOT, write_run_metadata
from recipes.tracking import Tracker, resolve_wandb_mode, wandb_destination
from tests.conftest import free_port

STEPS = [1, 2, 3]
# Values chosen to be exact in float32 so TensorBoard's float32 storage compares equal.
TRAIN_METRICS = {
    1: {"loss": 4.5, "lr": 0.25, "grad_norm": 1.5, "tokens_per_s": 1024, "consumed_samples": 8},
    2: {"loss": 3.75, "lr": 0.5, "grad_norm": 1.25, "tokens_per_s": 2048, "consumed_samples": 16},
    3: {"loss": 3.125, "lr": 0.375, "grad_norm": 0.75, "tokens_per_s": 2560, "consumed_samples": 24},
}
VAL_METRICS = {3: {"val_loss": 3.5}}


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """No API key (so "auto" means offline) and no W&B state outside tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))


def log_known_steps(tracker: Tracker) -> None:
    for step in STEPS:
        tracker.log(step, TRAIN_METRICS[step])
        if step in VAL_METRICS:
            tracker.log(step, VAL_METRICS[step])


# ---- readers -----------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def read_wandb_log(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    block_size, header_size = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + header_size <= len(data):
        left_in_block = block_size - pos % block_size
        if left_in_block < header_size:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header_size])
        payload = data[pos + header_size : pos + header_size + length]
        pos += header_size + length
        if kind == 0:  # zero-filled tail of a file still open for writing
            break
        if kind == 1:  # FULL
            records.append(payload)
        elif kind == 2:  # FIRST
            pending = payload
        elif kind == 3:  # MIDDLE
            pending += payload
        elif kind == 4:  # LAST
            records.append(pending + payload)
    return [wandb_internal_pb2.Record.FromString(payload) for payload in records]


def wandb_offline_logs(run_dir: Path) -> list[Path]:
    """The .wandb logs of every offline launch under run_dir/wandb, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def item_name(item) -> str:
    return item.key or ".".join(item.nested_key)


def wandb_history(records) -> dict[int, dict]:
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item_name(item): json.loads(item.value_json) for item in record.history.item}
            history[int(row["_step"])] = {k: v for k, v in row.items() if not k.startswith("_")}
    return history


def wandb_run_record(records):
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run


def wandb_config(records) -> dict:
    config = {}
    for item in wandb_run_record(records).config.update:
        config[item_name(item)] = json.loads(item.value_json)
    config.pop("_wandb", None)
    return config


# ---- tests -------------------------------------------------------------------


def test_every_backend_holds_the_logged_values(tmp_path):
    run_dir = tmp_path / "run"
    logger_cfg = LoggerConfig(wandb_mode="auto", tensorboard=True)
    before = time.time()
    with Tracker(run_dir, logger_cfg, {"train": {"lr": 0.5}}, ["tiny"], rank=0) as tracker:
        log_known_steps(tracker)
    assert tracker.wandb_mode == "offline"  # auto without WANDB_API_KEY

    lines = read_jsonl(run_dir / "metrics.jsonl")
    expected_lines = [{"step": 1, **TRAIN_METRICS[1]}, {"step": 2, **TRAIN_METRICS[2]},
                      {"step": 3, **TRAIN_METRICS[3]}, {"step": 3, **VAL_METRICS[3]}]
    assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == expected_lines
    times = [line["time"] for line in lines]
    assert before <= times[0] <= times[-1] <= time.time()

    scalars = read_tensorboard(run_dir / "tensorboard")
    for name in TRAIN_METRICS[1]:
        assert scalars[f"train/{name}"] == [(s, TRAIN_METRICS[s][name]) for s in STEPS]
    assert scalars["eval/val_loss"] == [(3, 3.5)]

    (log,) = wandb_offline_logs(run_dir)
    records = read_wandb_log(log)
    run = wandb_run_record(records)
    assert run.run_id == tracker.wandb_run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert run.display_name == "run"  # the run directory's name by default
    assert list(run.tags) == ["tiny"]
    assert run.project == "falcon-h1"
    history = wandb_history(records)
    assert history == {s: {**TRAIN_METRICS[s], **VAL_METRICS.get(s, {})} for s in STEPS}


def test_tensor_and_numpy_values_are_logged_as_plain_numbers(tmp_path):
    cfg = LoggerConfig(wandb=False, tensorboard=False)
    with Tracker(tmp_path, cfg, {}, [], rank=0) as tracker:
        tracker.log(np.int64(7), {"loss": torch.tensor(2.5), "mfu": np.float32(0.25), "skipped_steps": True})
        with pytest.raises(TypeError, match="'loss'"):
            tracker.log(8, {"loss": "high"})
        with pytest.raises(ValueError, match="reserved"):
            tracker.log(8, {"step": 8})
    (line,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert {k: line[k] for k in ("step", "loss", "mfu", "skipped_steps")} == {
        "step": 7, "loss": 2.5, "mfu": 0.25, "skipped_steps": 1,
    }


def test_resume_continues_the_wandb_run_and_replaces_redone_steps(tmp_path):
    run_dir = tmp_path / "run"
    cfg = LoggerConfig(wandb_mode="offline")
    first_loss = {1: 4.0, 2: 3.5, 3: 3.0, 4: 2.5}
    with Tracker(run_dir, cfg, {}, [], rank=0) as first:
        for step, loss in first_loss.items():
            first.log(step, {"loss": loss})
    # The job died after step 4 with its last checkpoint at step 2: the next launch redoes 3-4.
    second_loss = {3: 3.25, 4: 2.75, 5: 2.25}
    with Tracker(run_dir, cfg, {}, [], rank=0) as second:
        for step, loss in second_loss.items():
            second.log(step, {"loss": loss})

    assert second.wandb_run_id == first.wandb_run_id
    first_log, second_log = wandb_offline_logs(run_dir)
    first_records, second_records = read_wandb_log(first_log), read_wandb_log(second_log)
    assert wandb_run_record(first_records).run_id == wandb_run_record(second_records).run_id == first.wandb_run_id
    assert {s: row["loss"] for s, row in wandb_history(second_records).items()} == second_loss

    final = {1: 4.0, 2: 3.5, 3: 3.25, 4: 2.75, 5: 2.25}
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [(line["step"], line["loss"]) for line in lines] == list(final.items())
    assert read_tensorboard(run_dir / "tensorboard")["train/loss"] == list(final.items())


def test_the_launch_reports_the_wandb_run_the_tracker_makes(tmp_path, monkeypatch):
    """What a launch prints about W&B (recipes.launch) and what the trainer's Tracker does follow
    one set of rules: mode, run name and the run-id file."""
    run_dir = tmp_path / "exp-7"
    cfg = LoggerConfig(wandb_mode="auto", wandb_entity="team", tensorboard=False)
    destination = wandb_destination(cfg, run_dir)
    assert (destination.mode, destination.name, destination.entity) == ("offline", "exp-7", "team")
    with Tracker(run_dir, cfg, {}, [], rank=0) as tracker:
        tracker.log(1, {"loss": 1.0})
    assert (tracker.wandb_mode, tracker.run_name) == (destination.mode, destination.name)
    assert Path(destination.run_id_file).read_text().strip() == tracker.wandb_run_id
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    online = wandb_destination(cfg, run_dir)
    assert online.mode == "online" and online.url() == f"https://wandb.ai/team/falcon-h1/runs/{tracker.wandb_run_id}"
    assert wandb_destination(LoggerConfig(wandb=False), run_dir) is None
    assert wandb_destination(LoggerConfig(wandb_mode="disabled"), run_dir) is None


def test_summary_and_failed_exit_reach_wandb(tmp_path):
    cfg = LoggerConfig(wandb_mode="offline", tensorboard=False)
    with pytest.raises(KeyError):
        with Tracker(tmp_path, cfg, {}, [], rank=0) as tracker:
            tracker.log(1, {"loss": 2.0})
            tracker.log_summary({"best_val_loss": 1.75, "api_token": "abcdefgh"})
            raise KeyError("training crashed")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"best_val_loss": 1.75, "api_token": "***"}
    records = read_wandb_log(wandb_offline_logs(tmp_path)[0])
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({item_name(i): json.loads(i.value_json) for i in record.summary.update})
    assert summary["best_val_loss"] == 1.75
    assert summary["api_token"] == "***"
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1


def test_nonzero_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with Tracker(run_dir, LoggerConfig(wandb_mode="offline"), {}, [], rank=1) as tracker:
        tracker.log(1, {"loss": 1.0})
        tracker.log_summary({"loss": 1.0})
    assert not run_dir.exists()
    assert tracker.wandb_run_id is None


def test_disabled_backends_write_no_files(tmp_path):
    cfg = LoggerConfig(wandb=True, wandb_mode="disabled", tensorboard=False)
    with Tracker(tmp_path, cfg, {}, [], rank=0) as tracker:
        tracker.log(1, {"loss": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "wandb_home") == ["metrics.jsonl"]


def test_wandb_mode_resolution(monkeypatch):
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match=r"logger.wandb_mode = 'cloud'.*offline"):
        resolve_wandb_mode("cloud")


# ---- W&B without a reachable server --------------------------------------------

# W&B's own offline init takes about 1.5 s on a loaded CI machine; an online attempt that
# waits for an unreachable server takes init_timeout (90 s).
WANDB_START_BOUND_S = 10.0


def assert_logged_offline_under_its_own_id(run_dir: Path, tracker: Tracker) -> None:
    assert tracker.wandb_mode == "offline"
    (log,) = wandb_offline_logs(run_dir)
    records = read_wandb_log(log)
    assert wandb_run_record(records).run_id == tracker.wandb_run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert wandb_history(records) == {1: {"loss": 2.0}}


@pytest.mark.parametrize("overrides", [["logger=offline"], ["logger=offline", "logger.wandb_mode=auto"]],
                         ids=["logger_offline", "wandb_mode_auto"])
def test_an_unreachable_wandb_server_costs_no_time(tmp_path, monkeypatch, overrides):
    """WANDB_API_KEY set, and the W&B server's port closed: training starts within seconds,
    logging offline; `logger=offline` never tries the server at all."""
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 3)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    logger_cfg = compose_recipe(overrides).logger
    logger_cfg.tensorboard = False
    run_dir = tmp_path / "run"
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tracker(run_dir, logger_cfg, {}, [], rank=0) as tracker:
            assert time.monotonic() - started < WANDB_START_BOUND_S
            tracker.log(1, {"loss": 2.0})
    assert_logged_offline_under_its_own_id(run_dir, tracker)
    assert not list((run_dir / "wandb").glob("run-*")), "an online run was attempted"
    said_offline = [str(w.message) for w in caught if "logging offline" in str(w.message)]
    assert bool(said_offline) == (logger_cfg.wandb_mode == "auto")


class _FailingWandbServer(BaseHTTPRequestHandler):
    """A W&B server that is there but answers every request with 503."""

    def _fail(self):
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_HEAD = _fail

    def log_message(self, *args):
        pass


def test_a_failed_online_init_falls_back_offline_under_the_same_run_id(tmp_path, monkeypatch):
    """The failed online attempt held the run id in wandb-core; the offline run must not
    collide with it ("run ID ... is in use") and keeps the id a resumed job continues."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FailingWandbServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 3)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "1")
    run_dir = tmp_path / "run"
    try:
        with pytest.warns(UserWarning, match="(?s)W&B online init failed.*logging offline"):
            with Tracker(run_dir, LoggerConfig(wandb_mode="online", tensorboard=False), {}, [], rank=0) as tracker:
                tracker.log(1, {"loss": 2.0})
    finally:
        server.shutdown()
        server.server_close()
    assert_logged_offline_under_its_own_id(run_dir, tracker)


def test_mlflow_without_mlflow_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when it is absent
    with pytest.raises(RuntimeError, match="logger.mlflow = true but mlflow is not installed"):
        Tracker(tmp_path, LoggerConfig(wandb=False, tensorboard=False, mlflow=True), {}, [], rank=0)


def test_mlflow_run_holds_metrics_params_and_resumes(tmp_path):
    pytest.importorskip("mlflow", reason="optional backend: pip install mlflow-skinny")
    from mlflow.tracking import MlflowClient

    cfg = LoggerConfig(wandb=False, tensorboard=False, mlflow=True)
    config = {"train": {"lr": 0.5}, "logger": {"api_key": "abcdefgh"}}
    with Tracker(tmp_path, cfg, config, ["tiny"], rank=0) as tracker:
        log_known_steps(tracker)
        tracker.log_summary({"best_val_loss": 3.5})
    with Tracker(tmp_path, cfg, config, ["tiny"], rank=0) as tracker:
        tracker.log(4, {"loss": 2.875})

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_id == (tmp_path / "mlflow_run_id").read_text().strip()
    assert run.info.status == "FINISHED"
    loss = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert loss == [(s, TRAIN_METRICS[s]["loss"]) for s in STEPS] + [(4, 2.875)]
    val = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert val == [(3, 3.5)]
    assert run.data.params == {"train.lr": "0.5", "logger.api_key": "***"}
    assert run.data.tags["summary.best_val_loss"] == "3.5"


# ---- secrets and run metadata ------------------------------------------------

ENV_SECRET = "tok-5f3a9c1e77"


def config_with_secrets() -> dict:
    config = dataclasses.asdict(RecipeConfig())
    config["logger"]["wandb_api_key"] = "sk-literal-in-config"
    config["executor"]["slurm"]["env_vars"] = {"HF_HOME": "/data/hf", "CUSTOM": "plain-env-value"}
    config["executor"]["kubernetes"]["secret_env"] = {"HF_TOKEN": "hf-secret:token"}
    config["data"]["cache_dir"] = f"/cache/{ENV_SECRET}/x"  # an env secret pasted into a path
    config["mup"]["key_multiplier"] = 0.5  # a hyperparameter, not a secret
    return config


def assert_scrubbed(config: dict) -> None:
    assert config["logger"]["wandb_api_key"] == "***"
    assert config["executor"]["slurm"]["env_vars"] == {"HF_HOME": "***", "CUSTOM": "***"}
    assert config["executor"]["kubernetes"]["secret_env"] == {"HF_TOKEN": "***"}
    assert config["data"]["cache_dir"] == "/cache/***/x"
    assert config["mup"]["key_multiplier"] == 0.5
    assert config["train"]["lr"] == RecipeConfig().train.lr
    assert config["model"]["name"] == RecipeConfig().model.name


def test_secrets_are_scrubbed_from_config_yaml_metadata_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", ENV_SECRET)
    monkeypatch.setattr(sys, "argv", ["falcon-train", "logger.wandb_api_key=sk-on-cli", "--hf-token", "hf-on-cli",
                                      f"data.cache_dir=/c/{ENV_SECRET}"])
    config = config_with_secrets()
    write_run_metadata(tmp_path, config)
    with Tracker(tmp_path, LoggerConfig(wandb_mode="offline", tensorboard=False), config, [], rank=0):
        pass

    all_text = "\n".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    all_text += "\n".join(p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*.wandb"))
    for secret in ("sk-literal-in-config", "plain-env-value", "hf-secret:token", ENV_SECRET, "sk-on-cli", "hf-on-cli"):
        assert secret not in all_text

    assert_scrubbed(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert_scrubbed(wandb_config(read_wandb_log(wandb_offline_logs(tmp_path)[0])))
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["command"] == ["falcon-train", "logger.wandb_api_key=***", "--hf-token", "***",
                                   "data.cache_dir=/c/***"]


def test_run_metadata_describes_the_environment(tmp_path):
    import wandb

    write_run_metadata(tmp_path, {"name": "x"})
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    # The wheel's local tag (+cu130) may be absent from torch.__version__.
    assert metadata["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert metadata["packages"]["wandb"] == wandb.__version__
    assert metadata["hostname"] == socket.gethostname()
    assert metadata["python"] == platform.python_version()
    git = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected_revision = git.stdout.strip() if git.returncode == 0 else None
    assert metadata["git"]["revision"] == expected_revision
    assert (metadata["git"]["dirty"] is None) == (expected_revision is None)

    write_run_metadata(tmp_path, {"name": "x"})  # a resumed launch
    resumed = json.loads((tmp_path / "metadata.json").read_text())
    assert [launch["time"] for launch in resumed["previous_launches"]] == [metadata["time"]]
    assert resumed["time"] >= metadata["time"]
