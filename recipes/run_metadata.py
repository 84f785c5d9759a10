"""What a run directory records about how the run was made.

`write_run_metadata` leaves two files in the run directory:

- `config.yaml`: the resolved recipe config, secrets scrubbed, so the run can be
  read (and re-launched) without the Hydra command line that made it;
- `metadata.json`: the project's git revision (and whether the checkout had
  uncommitted changes), versions of the packages that decide the numbers,
  host, Python, command line and time. Earlier launches of the same run
  directory (resumes) are kept under `previous_launches`.

Environment variable values are never written: a config key that names a secret
(key, token, secret, password) or an environment mapping (`env_vars`, `secret_env`,
Hydra's `env_set`) has its values replaced by "***", so does a command-line override
that sets one (`scrub_override`), and any text that contains the value of a
secret-named environment variable has it masked too.

`scrub_secrets` is shared with the experiment trackers (`recipes.tracking`), which
send the same config to W&B.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from launchers.job import MASKED_ENV_VALUE

MASK = MASKED_ENV_VALUE  # one mask for every hidden value, in files and in the launchers' printouts
SECRET_WORDS = ("key", "token", "secret", "password")
# Keys whose value is a mapping of environment variables, e.g. executor.slurm.env_vars or
# Hydra's hydra.job.env_set: the variable names are useful to see, their values are not ours
# to write down.
_ENV_MAPPING_KEY = re.compile(r"(^|_)env(_vars|ironment|_set)?$", re.IGNORECASE)
# Shorter values would mask ordinary words ("1", "true") all over the config.
_MIN_MASKED_ENV_VALUE_LENGTH = 6

# Distribution names whose versions decide a run's numbers or behaviour.
TRACKED_PACKAGES = (
    "falcon-h1-train",
    "torch",
    "megatron-core",
    "transformers",
    "triton",
    "nemo-run",
    "hydra-core",
    "wandb",
    "mamba-ssm",
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def is_secret_name(name: str) -> bool:
    """A name whose words end in a secret word (api_key, HF_TOKEN, apikey, passwords), so that
    names merely containing one (data.tokenizer) are kept."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    return any(word.endswith((secret, secret + "s")) for word in words for secret in SECRET_WORDS)


def _secret_env_values() -> list[str]:
    """Values of environment variables whose names say they are secrets, longest first."""
    values = {
        value
        for name, value in os.environ.items()
        if is_secret_name(name) and len(value) >= _MIN_MASKED_ENV_VALUE_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def _mask_env_values(text: str, secret_values: list[str]) -> str:
    for value in secret_values:
        text = text.replace(value, MASK)
    return text


def to_plain(value: Any) -> Any:
    """Dataclasses, mappings, tuples, paths and enums -> plain JSON/YAML types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return to_plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def scrub_secrets(config: Any) -> Any:
    """A plain copy of `config` with secret values replaced by "***".

    Numbers, booleans and None under secret-looking keys are kept: they cannot be
    credentials, and hyperparameters such as `model.key_multiplier` must stay readable.
    """
    return _scrub(to_plain(config), _secret_env_values())


def _scrub(value: Any, secret_values: list[str]) -> Any:
    if isinstance(value, dict):
        scrubbed = {}
        for key, item in value.items():
            if _ENV_MAPPING_KEY.search(key) and isinstance(item, dict):
                scrubbed[key] = {name: MASK for name in item}
            elif is_secret_name(key) and not _is_harmless_scalar(item):
                scrubbed[key] = MASK
            else:
                scrubbed[key] = _scrub(item, secret_values)
        return scrubbed
    if isinstance(value, list):
        return [_scrub(item, secret_values) for item in value]
    if isinstance(value, str):
        return _mask_env_values(value, secret_values)
    return value


def _is_harmless_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float))


def scrub_override(override: str) -> str:
    """A `key=value` override (Hydra's, or a `--flag=value`) with the value masked when the key
    names a secret or goes through an environment mapping: `x.api_key=abc`,
    `executor.slurm.env_vars.HF_HOME=/data`, `executor.kubernetes.env_vars={A: b}`."""
    name, sep, value = override.partition("=")
    if not sep:
        return override
    if any(_ENV_MAPPING_KEY.search(part) for part in name.lstrip("+~").split(".")):
        return f"{name}={MASK}"
    if is_secret_name(name) and not _is_harmless_literal(value):
        return f"{name}={MASK}"
    return override


def _is_harmless_literal(text: str) -> bool:
    """A number, boolean or null as an override spells it (`train.sample_tokens=48`)."""
    if text.strip().lower() in ("null", "true", "false"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def scrub_command_line(argv: list[str]) -> list[str]:
    """sys.argv with secret values masked: `x.api_key=abc`, `--token abc`, environment mapping
    overrides (`scrub_override`), env values."""
    secret_values = _secret_env_values()
    scrubbed: list[str] = []
    previous_was_secret_flag = False
    for arg in argv:
        if previous_was_secret_flag:
            scrubbed.append(MASK)
            previous_was_secret_flag = False
            continue
        masked = scrub_override(arg)
        if masked != arg:
            scrubbed.append(masked)
            continue
        previous_was_secret_flag = arg.startswith("-") and is_secret_name(arg)
        scrubbed.append(_mask_env_values(arg, secret_values))
    return scrubbed


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """{"revision": sha or None, "dirty": bool or None} of the checkout holding this code."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    if revision is None:  # not a git checkout (installed wheel), no commits, or no git
        return {"revision": None, "dirty": None}
    # Untracked files (run outputs, caches) do not change what the code computes.
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": None if status is None else bool(status)}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of `names`; packages that are not installed are left out."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def collect_metadata() -> dict[str, Any]:
    return {
        "time": datetime.now(timezone.utc).isoformat(),
        "git": git_state(),
        "packages": package_versions(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "command": scrub_command_line(list(sys.argv)),
    }


def write_run_metadata(run_dir: str | os.PathLike, resolved_config: Any) -> dict[str, Any]:
    """Write run_dir/config.yaml and run_dir/metadata.json; return the metadata written.

    Call it from one process (rank 0): every rank would write the same files.
    """
    import yaml  # only needed here; keeps `import recipes.tracking` light

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    config_text = yaml.safe_dump(scrub_secrets(resolved_config), sort_keys=False)
    _write_atomically(run_dir / "config.yaml", config_text)

    metadata = collect_metadata()
    metadata_path = run_dir / "metadata.json"
    previous = _read_json_or_none(metadata_path)
    if previous is not None:
        # A resumed run keeps the story of every launch, oldest first.
        earlier = previous.pop("previous_launches", [])
        metadata["previous_launches"] = [*earlier, previous]
    _write_atomically(metadata_path, json.dumps(metadata, indent=2) + "\n")
    return metadata


def _read_json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _write_atomically(path: Path, text: str) -> None:
    # A crash mid-write must not leave a half-written config next to a checkpoint.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
