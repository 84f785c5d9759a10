"""The files of saved checkpoints: checksums, which checkpoints exist, retention, disk space.

Plain file work (no torch, no Megatron), used by `recipes.checkpointing` around Megatron's
save and load:

* `checksums.json`, written into a checkpoint directory last (after every rank's shards and
  Megatron's metadata, before the directory is published by rename), lists each file's size and
  SHA-256. A checkpoint is verified against it before it is loaded: a truncated, missing or
  changed file is named, and the loader falls back to the newest checkpoint that verifies.
  Checkpoints written before checksums existed have no `checksums.json` and load unverified.
* `train.keep_checkpoints = N`: after each save the newest N published checkpoints (up to the
  one just written) stay, older ones are deleted.
* A save that runs out of disk says where, and roughly how much it needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

from falcon_h1.errors import ConfigValueError, is_int_at_least

MANIFEST = "checksums.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST_FORMAT = 1
HASH = "sha256"
_ITER_DIR = re.compile(r"^iter_(\d{7})(\.old)?$")
_TMP_DIR = re.compile(r"^iter_(\d{7})\.tmp$")
# Files the torch_dist writer names after the global rank that wrote them: __<rank>_<n>.distcp
_RANK_FILE = re.compile(r"^__(\d+)[_.]")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def checkpoint_dir(ckpt_root, step: int) -> Path:
    return Path(ckpt_root) / f"iter_{step:07d}"


def validate_keep_checkpoints(keep) -> None:
    if not is_int_at_least(keep, 1):
        raise ConfigValueError(
            "train.keep_checkpoints", keep, "an integer >= 1",
            message=f"train.keep_checkpoints = {keep!r} is not allowed: an integer >= 1 (after each save the "
            "newest N complete checkpoints are kept and older ones deleted; the newest is what a "
            "rerun resumes from, so at least one must stay).")


# ------------------------------------------------------------------ which checkpoints exist


def published_checkpoints(ckpt_root) -> list[tuple[int, Path]]:
    """(step, directory) of every published checkpoint, newest first, up to the step that
    `latest_checkpointed_iteration.txt` names (a later one was never announced as complete).

    `iter_N.old` stands in for `iter_N` while a re-save of step N replaces it. Without a
    readable pointer file every directory counts."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for entry in root.iterdir():
        match = _ITER_DIR.match(entry.name)
        if match and entry.is_dir():
            step = int(match.group(1))
            if match.group(2) is None or step not in found:
                found[step] = entry
    newest = latest_pointer_step(root)
    steps = sorted((s for s in found if newest is None or s <= newest), reverse=True)
    return [(step, found[step]) for step in steps]


def latest_pointer_step(ckpt_root) -> Optional[int]:
    """The step in `latest_checkpointed_iteration.txt`, or None when it is missing or unreadable."""
    try:
        text = (Path(ckpt_root) / LATEST_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def has_checkpoints(ckpt_root) -> bool:
    return bool(published_checkpoints(ckpt_root))


# ------------------------------------------------------------------ checksums


def files_hashed_by(directory: Path, rank: int, world_size: int) -> list[str]:
    """This rank's share of a freshly written checkpoint: the shards it wrote itself (still in
    its page cache, and listed by its own node) and, on rank 0, every file no rank is named in."""
    names = sorted(entry.name for entry in directory.iterdir() if entry.is_file())
    mine = []
    for name in names:
        match = _RANK_FILE.match(name)
        owner = int(match.group(1)) if match and int(match.group(1)) < world_size else 0
        if owner == rank:
            mine.append(name)
    return mine


def digests(directory: Path, names: Iterable[str]) -> dict[str, dict]:
    result = {}
    for name in names:
        path = directory / name
        with open(path, "rb") as stream:
            digest = hashlib.file_digest(stream, HASH).hexdigest()
        result[name] = {"size": path.stat().st_size, HASH: digest}
    return result


def write_manifest(directory: Path, files: dict[str, dict], step: int) -> None:
    """Write `checksums.json` atomically (temporary file, fsync, rename, fsync of the directory)."""
    record = {"format": MANIFEST_FORMAT, "step": step, "algorithm": HASH,
              "files": {name: files[name] for name in sorted(files)}}
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as stream:
        stream.write(json.dumps(record, indent=1) + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, directory / MANIFEST)
    fsync_dir(directory)


def read_manifest(directory: Path) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None), (None, None) for a checkpoint saved before checksums existed, or
    (None, reason) when the manifest itself is damaged."""
    path = directory / MANIFEST
    if not path.exists():
        return None, None
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if record.get("algorithm") != HASH or not isinstance(files, dict):
            raise ValueError(f"unknown layout (algorithm {record.get('algorithm')!r})")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{MANIFEST} is unreadable ({error})"
    return record, None


def share_of_manifest(manifest: dict, rank: int, world_size: int) -> list[str]:
    """The files this rank verifies: the manifest split by size over the ranks (the same split
    on every rank, whatever parallel layout saved the checkpoint)."""
    load = [0] * world_size
    mine = []
    for name, entry in sorted(manifest["files"].items(), key=lambda item: (-item[1]["size"], item[0])):
        owner = min(range(world_size), key=lambda r: (load[r], r))
        load[owner] += entry["size"]
        if owner == rank:
            mine.append(name)
    return mine


def verification_problems(directory: Path, manifest: dict, names: Iterable[str]) -> list[str]:
    """What is wrong with the listed files of `directory` against its manifest: missing,
    truncated or grown, or changed content. Empty when they are as saved."""
    problems = []
    for name in names:
        expected = manifest["files"][name]
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size != expected["size"]:
            how = "truncated" if size < expected["size"] else "longer than saved"
            problems.append(f"{name} is {size} bytes, saved as {expected['size']} ({how})")
            continue
        with open(path, "rb") as stream:
            if hashlib.file_digest(stream, HASH).hexdigest() != expected[HASH]:
                problems.append(f"{name} has another SHA-256 than when it was saved (its content changed)")
    return problems


# ------------------------------------------------------------------ retention


def prune(ckpt_root, keep: int, newest_step: int) -> list[Path]:
    """Delete the published checkpoints older than the newest `keep` ones up to `newest_step`,
    and leftover `.tmp` directories of saves at or before it; returns what was deleted.

    Checkpoints after `newest_step` are left alone: a run that resumed from an earlier
    checkpoint (the newer one was damaged) replaces them when it saves those steps again."""
    root = Path(ckpt_root)
    kept_steps: list[int] = []
    removed = []
    for step, path in _iter_dirs_newest_first(root):
        if step > newest_step:
            continue
        if step in kept_steps or len(kept_steps) == keep:  # a leftover .old twin, or past the newest N
            removed.append(path)
        else:
            kept_steps.append(step)
    removed += [entry for entry in root.iterdir()
                if (match := _TMP_DIR.match(entry.name)) and int(match.group(1)) <= newest_step]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _iter_dirs_newest_first(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of iter_N and iter_N.old directories; for one step, iter_N before its .old."""
    found = [(int(m.group(1)), entry) for entry in root.iterdir() if (m := _ITER_DIR.match(entry.name))]
    return sorted(found, key=lambda item: (item[0], not item[1].name.endswith(".old")), reverse=True)


# ------------------------------------------------------------------ disk space


def directory_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file()) if path.exists() else 0


def disk_full_message(error: BaseException, directory: Path, needed_bytes: int) -> Optional[str]:
    """A plain "no space left" sentence when `error` (raised while writing `directory`) came
    from a full disk or quota, else None.

    torch's writer reports a full disk as "file write failed" / "unexpected pos" without the
    errno, so a failed save also counts as disk full when the free space left is smaller than
    what the save still had to write."""
    free = shutil.disk_usage(_existing_parent(directory)).free
    if not (_has_disk_full_errno(error) or free < needed_bytes - directory_bytes(directory)):
        return None
    return (f"no space left on {_existing_parent(directory.parent)}, needs ~{_megabytes(needed_bytes)} MB "
            f"for this checkpoint ({_megabytes(free)} MB were free when the write failed)")


def _has_disk_full_errno(error: BaseException) -> bool:
    seen, pending = set(), [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        pending += [current.__cause__, current.__context__]
        # torch.distributed.checkpoint's CheckpointException keeps each rank's (error, traceback)
        pending += [failure[0] if isinstance(failure, tuple) else failure
                    for failure in (getattr(current, "failures", None) or {}).values()]
    return False


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f}" if count < 10e6 else f"{count / 1e6:,.0f}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
