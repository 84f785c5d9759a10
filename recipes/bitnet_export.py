"""`falcon-bitnet-export IN OUT.safetensors`: pack a BitNet model's ternary weights at 2 bits each
(`bitnet.export` has the format).

IN is a falcon-train run directory (its latest checkpoint, trained with bitnet=on) or a
`torch.save`d state dict (`bitnet.export.read_state_dict_file`).
"""

from __future__ import annotations

import argparse
import os

from bitnet.export import (DEFAULT_BITNET_PATTERN, export_bitnet_state_dict, export_from_state_dict,
                           read_state_dict_file)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="falcon-bitnet-export",
        description="Pack the BitNet weights of a falcon-train run or a torch-saved state dict into 2-bit "
        "ternary safetensors (other tensors stay full precision).",
    )
    parser.add_argument("input", help="a falcon-train run directory, a torch.save'd state dict, or "
                        "{'state_dict', 'bitnet_param_names'}")
    parser.add_argument("output", help="output .safetensors path")
    parser.add_argument(
        "--bitnet-pattern", default=DEFAULT_BITNET_PATTERN,
        help="regex selecting BitNet weights when the input does not list them "
        f"(default: {DEFAULT_BITNET_PATTERN})",
    )
    args = parser.parse_args(argv)
    if os.path.isdir(args.input):  # a falcon-train run directory: its latest checkpoint
        from recipes.trained_model import load_trained_model

        model, recipe, step = load_trained_model(args.input)
        if not recipe.bitnet.enabled:
            raise SystemExit(f"falcon-bitnet-export: {args.input} was trained with bitnet.enabled = false; "
                             "allowed: a run trained with bitnet=on.")
        names = export_bitnet_state_dict(model, args.output)
        print(f"falcon-bitnet-export: step {step}, {len(names)} ternary weights -> {args.output}")
        return
    try:
        state_dict, names, segments = read_state_dict_file(args.input, args.bitnet_pattern)
    except ValueError as error:
        raise SystemExit(f"falcon-bitnet-export: {error}") from None
    export_from_state_dict(state_dict, names, args.output, segments)
    print(f"falcon-bitnet-export: {len(names)} ternary weights -> {args.output}")


if __name__ == "__main__":
    main()
