"""`python -m recipes.worker RECIPE.yaml`: what every rank of a launched job runs
(torchrun / Slurm / Kubernetes set RANK, WORLD_SIZE, MASTER_ADDR, ...)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m recipes.worker RECIPE.yaml", file=sys.stderr)
        return 2
    from recipes.fallback_notices import announce_fallbacks

    announce_fallbacks()
    from recipes.recipe_file import recipe_from_yaml
    from recipes.run_errors import RunError
    from recipes.training import train

    try:
        summary = train(recipe_from_yaml(argv[0]))
    except RunError as error:  # its message says what happened and what to do; no traceback
        print(f"falcon-train: error: {error}", file=sys.stderr, flush=True)
        return 1
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
