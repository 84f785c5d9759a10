"""`falcon-report`: compare training runs as one PNG and one self-contained HTML page.

    falcon-report runs/baseline runs/bitnet [--out report] [--metrics loss,tokens_per_s]

Each RUN_DIR's curves come from its `metrics.jsonl` (written by `recipes.tracking`),
or, when that is missing, from the TensorBoard event files under RUN_DIR/tensorboard.
The PNG has one subplot per metric and one line per run; run i is drawn in colour
i of matplotlib's "tab10" palette, in the order the runs are given. The HTML page
embeds the PNG and tabulates each run's final and mean values, with the key fields
of the run's config.yaml (model name, BitNet on/off, tensor parallel size).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_METRICS = ("loss", "val_loss", "tokens_per_s", "lr", "grad_norm")
METRIC_TITLES = {
    "loss": "training loss",
    "val_loss": "validation loss",
    "tokens_per_s": "throughput (tokens/s)",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
}
PNG_NAME = "report.png"
HTML_NAME = "report.html"
_TENSORBOARD_GROUPS = ("train/", "eval/")


class NoMetricsError(FileNotFoundError):
    pass


@dataclass
class Run:
    path: Path
    label: str
    # metric -> [(step, value)], sorted by step
    curves: dict[str, list[tuple[int, float]]]
    config: dict[str, str] = field(default_factory=dict)


# ---- reading -----------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A run's metric curves, {metric: [(step, value), ...]} sorted by step."""
    run_dir = Path(run_dir)
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.is_file():
        curves = _read_jsonl(jsonl)
    else:
        curves = _read_tensorboard(run_dir)
    if not curves:
        raise NoMetricsError(
            f"RUN_DIR {run_dir} has no metrics: expected {jsonl} or TensorBoard event "
            f"files under {run_dir / 'tensorboard'}."
        )
    return curves


def _read_jsonl(path: Path) -> dict[str, list[tuple[int, float]]]:
    rows: dict[int, dict[str, float]] = {}
    lines = path.read_text().splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if line_number == len(lines):
                break  # the last line of a run killed mid-write
            raise ValueError(f"{path}:{line_number} is not JSON: {error}") from None
        step = int(record.pop("step"))
        record.pop("time", None)
        if rows and step < max(rows):
            # A resumed launch restarted at `step`: what came later is superseded.
            rows = {s: row for s, row in rows.items() if s < step}
        rows.setdefault(step, {}).update(record)  # eval lines share the train step
    curves: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(rows):
        for name, value in rows[step].items():
            curves.setdefault(name, []).append((step, float(value)))
    return curves


def _read_tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    log_dir = run_dir / "tensorboard"
    if not log_dir.is_dir():
        log_dir = run_dir
    if not any(log_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    curves = {}
    for tag in accumulator.Tags()["scalars"]:
        name = next((tag[len(g) :] for g in _TENSORBOARD_GROUPS if tag.startswith(g)), tag)
        by_step = {event.step: float(event.value) for event in accumulator.Scalars(tag)}
        curves[name] = sorted(by_step.items())
    return curves


def read_config_fields(run_dir: Path) -> dict[str, str]:
    """Model name, BitNet on/off and tp from run_dir/config.yaml ({} when absent)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    model = config.get("model") or {}
    bitnet = config.get("bitnet") or {}
    parallel = config.get("parallel") or {}
    fields = {
        "model": model.get("name", config.get("name")),
        "bitnet": None if "enabled" not in bitnet else ("on" if bitnet["enabled"] else "off"),
        "tp": parallel.get("tp"),
    }
    return {key: str(value) for key, value in fields.items() if value is not None}


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Shortest path suffixes that tell the runs apart: `run` or `a/run`, `b/run`."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same directory given twice


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    paths = [Path(d) for d in run_dirs]
    return [
        Run(path=path, label=label, curves=read_metrics(path), config=read_config_fields(path))
        for path, label in zip(paths, run_labels(paths))
    ]


def choose_metrics(runs: Sequence[Run], requested: Sequence[str] | None) -> list[str]:
    available = sorted({name for run in runs for name in run.curves})
    if requested is None:
        chosen = [name for name in DEFAULT_METRICS if name in available]
        if not chosen:
            raise NoMetricsError(
                f"none of the default metrics {', '.join(DEFAULT_METRICS)} was logged; "
                f"pass --metrics with some of: {', '.join(available)}."
            )
        return chosen
    missing = [name for name in requested if name not in available]
    if missing:
        raise NoMetricsError(
            f"--metrics {', '.join(missing)} not logged by any run; logged: {', '.join(available)}."
        )
    return list(requested)


# ---- drawing -----------------------------------------------------------------


def run_color(index: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def draw_figure(runs: Sequence[Run], metrics: Sequence[str], png_path: Path) -> None:
    # The Figure API needs no pyplot and no global backend: Agg renders it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = 1 if len(metrics) == 1 else 2
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(6.5 * columns, 4.0 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        for index, run in enumerate(runs):
            points = run.curves.get(metric)
            if not points:
                continue
            steps, values = zip(*points)
            linestyle = ("-", "--", ":", "-.")[(index // 10) % 4]  # past 10 runs colours repeat
            ax.plot(steps, values, color=run_color(index), linestyle=linestyle, linewidth=1.8, label=run.label)
        ax.set_title(METRIC_TITLES.get(metric, metric))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=min(len(runs), 4))
    figure.savefig(png_path, dpi=100)


# ---- the HTML page -------------------------------------------------------------


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:.6g}"


def summarize(points: list[tuple[int, float]] | None) -> tuple[float | None, float | None]:
    """(final value, mean over finite values) of a curve."""
    if not points:
        return None, None
    finite = [value for _, value in points if math.isfinite(value)]
    return points[-1][1], (sum(finite) / len(finite) if finite else None)


def render_html(runs: Sequence[Run], metrics: Sequence[str], png_path: Path) -> str:
    image = base64.b64encode(png_path.read_bytes()).decode("ascii")
    header = ["run", "model", "bitnet", "tp", "last step"]
    for metric in metrics:
        header += [f"{metric} final", f"{metric} mean"]
    rows = []
    for run in runs:
        last_step = max(step for points in run.curves.values() for step, _ in points)
        cells = [run.label, *(run.config.get(k, "–") for k in ("model", "bitnet", "tp")), str(last_step)]
        for metric in metrics:
            cells += [_format(v) for v in summarize(run.curves.get(metric))]
        rows.append(cells)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    paths = "".join(f"<li><code>{html.escape(r.label)}</code>: {html.escape(str(r.path.resolve()))}</li>" for r in runs)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Falcon-H1 training report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>Training report</h1>
<p>Generated {generated} by falcon-report.</p>
<img alt="training curves" src="data:image/png;base64,{image}">
<h2>Runs</h2>
<table>
<tr>{head}</tr>
{body}
</table>
<ul>{paths}</ul>
</body>
</html>
"""


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, metrics: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Draw the runs' curves; return the paths of the PNG and the HTML page."""
    runs = load_runs(run_dirs)
    chosen = choose_metrics(runs, metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png_path, html_path = out_dir / PNG_NAME, out_dir / HTML_NAME
    draw_figure(runs, chosen, png_path)
    html_path.write_text(render_html(runs, chosen, png_path))
    return png_path, html_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="falcon-report", description="Plot and tabulate the metrics of one or more training runs."
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (train.run_dir)")
    parser.add_argument("--out", default="report", help="output directory (default: ./report)")
    parser.add_argument(
        "--metrics",
        help=f"comma-separated metrics to plot (default: those of {','.join(DEFAULT_METRICS)} that were logged)",
    )
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        png_path, html_path = write_report(args.run_dirs, args.out, metrics)
    except NoMetricsError as error:
        parser.error(str(error))
    print(f"plot: {png_path}")
    print(f"page: {html_path}")


if __name__ == "__main__":
    main()
