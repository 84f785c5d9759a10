"""Runs command-line calls one after another in this process and prints each one's exit code
and standard error as JSON lines: `python cli_driver.py CASES.json`.

CASES.json is a list of {"id", "module", "argv", "env"}; each call is `module.main()` with
sys.argv = [module, *argv] (the console scripts' entry points), run with `env` added to the
environment. An exception that escapes main() is recorded as Python would print it (a
traceback), so the caller sees what a user would. Saves one interpreter start (and one torch
import) per call.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import traceback


def run_case(module: str, argv: list[str], env: dict) -> tuple[int, str]:
    saved_argv, saved_env = list(sys.argv), dict(os.environ)
    sys.argv = [module, *argv]
    os.environ.update(env)
    err = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            returned = importlib.import_module(module).main()
            code = returned if isinstance(returned, int) else 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            err.write(stop.code + "\n")
    except BaseException:  # noqa: BLE001 (what the interpreter would print)
        code = 1
        err.write(traceback.format_exc())
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        _forget_hydra()
    return code, err.getvalue()


def _forget_hydra() -> None:
    """Hydra keeps its global state after an app returns; a second app in the process needs it cleared."""
    if "hydra" in sys.modules:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()


def main() -> None:
    with open(sys.argv[1]) as file:
        cases = json.load(file)
    for case in cases:
        code, stderr = run_case(case["module"], case["argv"], case.get("env", {}))
        print(json.dumps({"id": case["id"], "code": code, "stderr": stderr}), flush=True)


if __name__ == "__main__":
    main()
