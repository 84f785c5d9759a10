"""Stand-in for `python -m recipes.worker RECIPE_YAML`, to test the launch plumbing fast.

Reads the recipe file it is given, joins the torchrun process group (gloo) and checks it
with an all-reduce, then writes `fake_worker_rank<RANK>.json` into `train.run_dir`
recording what it saw. Environment knobs for the failure and requeue tests:
FAKE_WORKER_EXIT_CODE=N (print a marker line, exit N; with FAKE_WORKER_FAIL_RANK=R only
rank R fails, the other finishes normally), FAKE_WORKER_HOLD_FIRST_ATTEMPT=1
(on the first attempt of a Slurm job, SLURM_RESTART_COUNT unset or 0, wait to be
requeued instead of finishing; SIGUSR1 then "saves", as the trainer does: after
FAKE_WORKER_SAVE_SECONDS (default 1) it writes `saved_rank<RANK>` and exits 138).
"""

import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import yaml


def _save_and_exit(run_dir: str, rank: int, signum: int) -> None:
    time.sleep(float(os.environ.get("FAKE_WORKER_SAVE_SECONDS", "1")))
    open(os.path.join(run_dir, f"saved_rank{rank}"), "w").close()
    print(f"fake worker rank {rank}: saved on signal {signum}", flush=True)
    sys.exit(128 + signum)


def main() -> int:
    recipe_path = sys.argv[1]
    with open(recipe_path) as file:
        recipe = yaml.safe_load(file)
    run_dir = recipe["train"]["run_dir"]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    exit_code = int(os.environ.get("FAKE_WORKER_EXIT_CODE", "0"))
    fail_rank = os.environ.get("FAKE_WORKER_FAIL_RANK")
    if exit_code and fail_rank is not None and int(fail_rank) != rank:
        print(f"fake worker rank {rank}: finishing normally, rank {fail_rank} fails", flush=True)
        return 0
    if exit_code:
        print(f"fake worker rank {rank}: failing on purpose with exit code {exit_code}", flush=True)
        return exit_code

    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if os.environ.get("FAKE_WORKER_HOLD_FIRST_ATTEMPT") == "1" and attempt == 0:
        os.makedirs(run_dir, exist_ok=True)
        signal.signal(signal.SIGUSR1, lambda signum, frame: _save_and_exit(run_dir, rank, signum))
        open(os.path.join(run_dir, f"holding_rank{rank}"), "w").close()
        print(f"fake worker rank {rank}: first attempt, waiting to be requeued", flush=True)
        time.sleep(600)
        return 9

    dist.init_process_group("gloo")
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    dist.destroy_process_group()

    os.makedirs(run_dir, exist_ok=True)
    record = {
        "rank": rank,
        "world_size": world_size,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "master_addr": os.environ["MASTER_ADDR"],
        "master_port": os.environ["MASTER_PORT"],
        "all_reduce_sum": total.item(),
        "recipe_path": os.path.abspath(recipe_path),
        "recipe_name": recipe["name"],
        "attempt": attempt,
        "cwd": os.getcwd(),
    }
    with open(os.path.join(run_dir, f"fake_worker_rank{rank}.json"), "w") as file:
        json.dump(record, file)
    print(f"fake worker rank {rank}/{world_size}: all-reduce sum {total.item()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
