"""falcon-report: runs logged through Tracker, drawn, and the drawing checked by its pixels."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from recipes.config import LoggerConfig, RecipeConfig
from recipes.report import main, read_metrics
from recipes.run_metadata import write_run_metadata
from recipes.tracking import Tracker

STEPS = np.arange(1, 41)
# Two runs that differ in every curve: "dense" descends steeply from 6, "ternary" gently from 9.
CURVES = {
    "dense": {
        "loss": 6.0 - 0.075 * STEPS,
        "tokens_per_s": 1000.0 + 5.0 * (STEPS % 3),
        "lr": 1e-3 * np.minimum(1.0, STEPS / 5),
        "grad_norm": 2.0 / STEPS,
    },
    "ternary": {
        "loss": 9.0 - 0.025 * STEPS,
        "tokens_per_s": 2000.0 - 5.0 * (STEPS % 3),
        "lr": 5e-4 * np.minimum(1.0, STEPS / 5),
        "grad_norm": 1.0 / STEPS,
    },
}
# matplotlib's tab10 palette, run 0 and run 1 (the report's documented colouring).
RUN_COLORS = {"dense": (0x1F / 255, 0x77 / 255, 0xB4 / 255), "ternary": (0xFF / 255, 0x7F / 255, 0x0E / 255)}


def log_run(run_dir: Path, curves: dict[str, np.ndarray], tensorboard: bool = False) -> None:
    cfg = LoggerConfig(wandb=False, tensorboard=tensorboard)
    with Tracker(run_dir, cfg, {}, [], rank=0) as tracker:
        for index, step in enumerate(STEPS):
            tracker.log(int(step), {name: float(values[index]) for name, values in curves.items()})


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    run_dirs = []
    for name, curves in CURVES.items():
        run_dir = tmp_path / "runs" / name
        log_run(run_dir, curves)
        config = dataclasses.asdict(RecipeConfig())
        if name == "ternary":
            config["bitnet"]["enabled"] = True
            config["parallel"]["tp"] = 2
            config["model"]["name"] = "falcon_h1_ternary_test"
        write_run_metadata(run_dir, config)
        run_dirs.append(run_dir)
    return run_dirs


def color_pixels(png: Path, rgb: tuple[float, float, float], tolerance: float = 0.1) -> np.ndarray:
    """(row, column) of every pixel within `tolerance` of `rgb` on each channel."""
    pixels = mpimg.imread(png)[..., :3]
    return np.argwhere(np.all(np.abs(pixels - np.array(rgb)) < tolerance, axis=-1))


def plot_area_rows(png: Path) -> tuple[int, int]:
    """Rows of the top and bottom spines: the dark lines spanning most of the image width."""
    pixels = mpimg.imread(png)[..., :3]
    dark = pixels.max(axis=-1) < 0.3
    spine_rows = np.flatnonzero(dark.sum(axis=1) > 0.5 * dark.shape[1])
    return int(spine_rows.min()), int(spine_rows.max())


class TableReader(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_loss_curves_are_drawn_where_the_values_put_them(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(d) for d in two_runs] + ["--out", str(out), "--metrics", "loss"])
    png = out / "report.png"
    printed = capsys.readouterr().out
    assert str(png) in printed and str(out / "report.html") in printed

    top, bottom = plot_area_rows(png)
    lines = {}
    for name, rgb in RUN_COLORS.items():
        found = color_pixels(png, rgb)
        lines[name] = found[(found[:, 0] > top) & (found[:, 0] < bottom)]  # leave out the legend
        assert len(lines[name]) > 400, f"{name}: only {len(lines[name])} pixels of its colour in the plot"

    # Higher loss is higher up the image (smaller row index): ternary sits above dense.
    assert lines["ternary"][:, 0].mean() < lines["dense"][:, 0].mean()

    def drop_in_rows(rows_cols: np.ndarray) -> float:
        """How far the line falls from its left third to its right third, in pixel rows."""
        cols = rows_cols[:, 1]
        left = rows_cols[cols < np.quantile(cols, 1 / 3), 0].mean()
        right = rows_cols[cols > np.quantile(cols, 2 / 3), 0].mean()
        return right - left

    # dense falls by 0.075/step and ternary by 0.025/step on the same axes: a 3x steeper line.
    dense_drop, ternary_drop = drop_in_rows(lines["dense"]), drop_in_rows(lines["ternary"])
    assert ternary_drop > 0
    assert dense_drop / ternary_drop == pytest.approx(3.0, rel=0.15)


def test_default_report_draws_both_runs_and_tabulates_them(two_runs, tmp_path):
    out = tmp_path / "report"
    main([str(d) for d in two_runs] + ["--out", str(out)])
    png, page = out / "report.png", out / "report.html"
    for name, rgb in RUN_COLORS.items():
        # Four subplots (loss, throughput, lr, grad_norm), each with one line per run.
        assert len(color_pixels(png, rgb)) > 4 * 300, name

    text = page.read_text()
    (embedded,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert base64.b64decode(embedded) == png.read_bytes()

    reader = TableReader()
    reader.feed(text)
    header, *rows = reader.rows
    by_run = {row[0]: dict(zip(header, row)) for row in rows}
    assert set(by_run) == {"dense", "ternary"}
    assert by_run["dense"]["bitnet"] == "off" and by_run["dense"]["tp"] == "1"
    assert by_run["dense"]["model"] == RecipeConfig().model.name
    assert by_run["ternary"]["bitnet"] == "on" and by_run["ternary"]["tp"] == "2"
    assert by_run["ternary"]["model"] == "falcon_h1_ternary_test"
    for name, curves in CURVES.items():
        assert int(by_run[name]["last step"]) == STEPS[-1]
        for metric, values in curves.items():
            assert float(by_run[name][f"{metric} final"]) == pytest.approx(values[-1], rel=1e-5)
            assert float(by_run[name][f"{metric} mean"]) == pytest.approx(values.mean(), rel=1e-5)


def test_runs_with_the_same_name_are_told_apart(tmp_path):
    for parent in ("a", "b"):
        log_run(tmp_path / parent / "run", CURVES["dense"])
    out = tmp_path / "report"
    main([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--out", str(out)])
    reader = TableReader()
    reader.feed((out / "report.html").read_text())
    assert [row[0] for row in reader.rows[1:]] == ["a/run", "b/run"]


def test_tensorboard_events_are_read_when_metrics_jsonl_is_missing(tmp_path):
    log_run(tmp_path, CURVES["dense"], tensorboard=True)
    (tmp_path / "metrics.jsonl").unlink()
    curves = read_metrics(tmp_path)
    assert set(curves) == set(CURVES["dense"])
    for name, values in CURVES["dense"].items():
        steps, read = zip(*curves[name])
        assert list(steps) == STEPS.tolist()
        np.testing.assert_allclose(read, values.astype(np.float32), rtol=0)  # TensorBoard stores float32


def test_restarted_and_eval_lines_in_metrics_jsonl(tmp_path):
    lines = [
        {"step": 1, "loss": 5.0, "time": 1.0},
        {"step": 2, "loss": 4.0, "time": 2.0},
        {"step": 2, "val_loss": 4.5, "time": 2.1},
        {"step": 3, "loss": 3.0, "time": 3.0},  # superseded: the next launch restarts at step 3
        {"step": 3, "loss": 3.5, "time": 9.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "lo')
    assert read_metrics(tmp_path) == {"loss": [(1, 5.0), (2, 4.0), (3, 3.5)], "val_loss": [(2, 4.5)]}


def test_run_dir_without_metrics_is_a_clear_error(tmp_path, two_runs, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(two_runs[0]), str(empty), "--out", str(tmp_path / "report")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"RUN_DIR {empty} has no metrics" in error and "metrics.jsonl" in error

    with pytest.raises(SystemExit):
        main([str(two_runs[0]), "--out", str(tmp_path / "report"), "--metrics", "loss,perplexity"])
    assert "--metrics perplexity not logged by any run" in capsys.readouterr().err
