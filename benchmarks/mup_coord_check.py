"""µP coordinate check on CPU: does the activation scale stay put as the model gets wider?

Tiny Falcon-H1 models of widths 64 to 512 (head dims fixed, heads and SSM width growing with
the hidden size, as the released sizes do) train a few AdamW steps at one learning rate on
the bundled corpus, once with the multipliers `falcon_h1.mup` derives for each width
(`mup=derived`) and once with all multipliers 1 (`mup=unit`). After every step the RMS of
each layer's output (the residual stream) and of the logits is recorded on a fixed batch, and
the PNG draws them against the width: under a parameterisation that transfers across widths
the curves stay flat; under one that does not they drift with the width.

    python benchmarks/mup_coord_check.py --out benchmarks/results/mup_coord_check.png

This is a diagnostic with no pass/fail threshold (the test suite only smoke-tests
`coord_check` at two small widths).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch

from falcon_h1.config import FalconH1Config
from falcon_h1.mup import derive_multipliers, unit_multipliers

CORPUS = Path(__file__).resolve().parents[1] / "recipes" / "data" / "corpus" / "austen.jsonl.gz"
HEAD_DIM, SSM_HEAD_DIM, LAYERS, VOCAB = 16, 16, 4, 256


def model_config(width: int, mode: str) -> FalconH1Config:
    """A 4-layer byte-level Falcon-H1 of hidden size `width` with `mode`'s multipliers."""
    cfg = FalconH1Config(
        name=f"coord_{width}", vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=LAYERS, num_attention_heads=width // 32, num_key_value_heads=max(width // 64, 1),
        head_dim=HEAD_DIM, mamba_d_ssm=width, mamba_n_heads=width // SSM_HEAD_DIM, mamba_d_head=SSM_HEAD_DIM,
        mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16, max_position_embeddings=1024,
        kernel_backend="reference",
    )
    multipliers = {"derived": derive_multipliers, "unit": lambda _: unit_multipliers()}[mode](cfg)
    return cfg.replace(**multipliers)


def corpus_batches(batch: int, seq_len: int, count: int) -> list[torch.Tensor]:
    """`count` batches of byte tokens [batch, seq_len + 1] from the start of the bundled corpus."""
    text = []
    with gzip.open(CORPUS, "rt", encoding="utf-8") as lines:
        for line in lines:
            text.append(json.loads(line)["text"])
            if sum(map(len, text)) > batch * (seq_len + 1) * count * 2:
                break
    data = torch.tensor(list("".join(text).encode("utf-8")[: batch * (seq_len + 1) * count]), dtype=torch.long)
    return list(data.view(count, batch, seq_len + 1))


def _stream(layer_output) -> torch.Tensor:
    """The residual stream a layer leaves: a layer may hand on (h, its MLP output) for the next
    norm to add (falcon_h1.layers.FalconH1Layer.forward), the stream being their sum."""
    return layer_output if isinstance(layer_output, torch.Tensor) else layer_output[0] + layer_output[1]


def _rms(t: torch.Tensor) -> float:
    return t.detach().float().pow(2).mean().sqrt().item()


def coord_check(widths=(64, 128, 256, 512), modes=("derived", "unit"), steps: int = 5, lr: float = 3e-3,
                batch: int = 4, seq_len: int = 64, seed: int = 0) -> dict:
    """{mode: {width: {"layer_<i>": [RMS after step 0..steps], "logits": [...]}}} (step 0: initial)."""
    from falcon_h1.megatron_compat.parallel import initialize_parallel
    from falcon_h1.model import build_model

    initialize_parallel(tp=1)
    data = corpus_batches(batch, seq_len, steps + 1)
    probe = data[0][:, :-1]
    results: dict = {}
    for mode in modes:
        results[mode] = {}
        for width in widths:
            model = build_model(model_config(width, mode), seed=seed)
            records = {f"layer_{i}": [] for i in range(LAYERS)}
            records["logits"] = []
            outputs: dict[int, torch.Tensor] = {}
            hooks = [layer.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, _stream(out)))
                     for i, layer in enumerate(model.layers)]

            def record():
                with torch.no_grad():
                    records["logits"].append(_rms(model(probe)))
                for i in range(LAYERS):
                    records[f"layer_{i}"].append(_rms(outputs[i]))

            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
            record()
            for tokens in data[1:]:
                loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                record()
            for hook in hooks:
                hook.remove()
            results[mode][width] = records
    return results


def draw(results: dict, png: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modes = list(results)
    widths = sorted(next(iter(results.values())))
    keys = list(next(iter(next(iter(results.values())).values())))
    last = len(next(iter(next(iter(results[modes[0]].values())).values()))) - 1
    shown_steps = sorted({0, 1, last})
    figure = Figure(figsize=(5.0 * len(shown_steps), 3.6 * len(modes) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(modes), len(shown_steps), squeeze=False, sharey="row")
    for row, mode in enumerate(modes):
        for col, step in enumerate(shown_steps):
            ax = axes[row][col]
            for index, key in enumerate(keys):
                ax.plot(widths, [results[mode][w][key][step] for w in widths], marker="o",
                        color=colormaps["tab10"](index % 10), linewidth=1.6, label=key)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.set_title(f"mup={mode}, after step {step}" if step else f"mup={mode}, initialisation")
            ax.set_xlabel("hidden size")
            ax.set_ylabel("RMS")
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=len(keys))
    figure.savefig(png, dpi=100)


def growth_table(results: dict) -> str:
    """Per mode and quantity: RMS at the widest model / RMS at the narrowest, after the last step."""
    lines = ["mode     quantity  rms(widest)/rms(narrowest) after the last step"]
    for mode, per_width in results.items():
        widths = sorted(per_width)
        for key in per_width[widths[0]]:
            ratio = per_width[widths[-1]][key][-1] / per_width[widths[0]][key][-1]
            lines.append(f"{mode:8s} {key:9s} {ratio:.3g}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("mup_coord_check.png"))
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    if any(w % 64 for w in args.widths):
        parser.error(f"--widths {args.widths}: each must be a multiple of 64 (whole attention and SSM heads)")
    results = coord_check(tuple(args.widths), steps=args.steps, lr=args.lr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(results, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(growth_table(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
