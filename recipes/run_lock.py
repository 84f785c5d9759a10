"""One training at a time per run directory.

`lock_run_dir(run_dir)` gives the run an exclusive lock on `run_dir/run.lock` for as long as it
trains. Global rank 0 holds it (a POSIX `fcntl` record lock, which the kernel drops when the
process ends, however it ends) and the file names the holder: pid, host, Slurm job id and start
time. A second training in the same directory refuses with those, instead of interleaving its
checkpoints, metrics and summary with the first one's.

* A file left by a holder that is gone (killed with SIGKILL, node lost) is stale: its lock is
  free, so the next run takes it over and says whose it was.
* A Slurm requeue starts the same job again (same SLURM_JOB_ID) while its earlier attempt may
  still be stopping: it waits up to `REQUEUE_WAIT_S` for that holder to let go, then takes over.
  A lock that is still held is never taken.
* Filesystems without POSIX locks (ENOLCK, ENOSYS, EOPNOTSUPP: NFS without lockd, Lustre without
  `flock`) get the file created with O_EXCL instead; the holder counts as gone when it ran on
  this host and its pid no longer exists, or when it was an earlier attempt of this Slurm job.

Released on exit: `RunDirLock.release()` (or leaving its `with` block) removes the file. Only one
`train()` runs in a process at a time (Megatron's parallel state is process-wide), so a lock this
process still holds from an earlier `train()` that raised is taken over by the next one.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from falcon_h1.errors import ConfigValueError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# Slurm stops the earlier attempt of a requeued job (SIGTERM, then SIGKILL after KillWait,
# 30 s by default) before the next attempt starts; a network filesystem may hold the lock of a
# lost node until its lease runs out (NFSv4: 90 s).
REQUEUE_WAIT_S = 180.0
POLL_S = 0.5
_NO_POSIX_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_HELD: dict[Path, "RunDirLock"] = {}  # locks this process holds, by lock-file path


class RunDirInUse(ConfigValueError):
    """Another training holds the run directory."""


class RunDirLock:
    """The lock of one run directory; `release()` or the end of a `with` block lets it go."""

    def __init__(self, path: Optional[Path], fd: Optional[int]):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.pop(self.path, None)
        try:
            # Removed while still locked: a process waiting on the old file sees it gone once it
            # gets the lock (_same_file) and starts over on a new one.
            if _same_file(fd, self.path):
                self.path.unlink()
        finally:
            os.close(fd)  # drops the fcntl lock

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir, requeue_wait_s: float = REQUEUE_WAIT_S) -> RunDirLock:
    """Lock `run_dir` for this training. Call on every rank: global rank 0 takes the lock and
    every rank raises the same error when it cannot (RunDirInUse names the holder)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    lock, failure = RunDirLock(None, None), None
    if not distributed or dist.get_rank() == 0:
        try:
            lock = acquire(Path(run_dir), requeue_wait_s)
        except (RunDirInUse, OSError) as error:
            failure = error
    if distributed:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        raise failure
    return lock


def acquire(run_dir: Path, requeue_wait_s: float = REQUEUE_WAIT_S) -> RunDirLock:
    """This process takes the lock of `run_dir` (no collective; see lock_run_dir)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK_FILE).resolve()
    if path in _HELD:  # left by an earlier train() of this process
        _HELD.pop(path).release()
    wait = _Wait(path, requeue_wait_s)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)  # this process holds no lock on the file, so closing drops nothing
            if error.errno in _NO_POSIX_LOCKS:
                return _acquire_by_exclusive_create(path, wait)
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            wait.or_refuse(_read_holder(path), "holds its lock")
            continue
        if not _same_file(fd, path):  # released and removed between our open and lock
            os.close(fd)
            continue
        previous = _parse_holder(os.pread(fd, 1 << 16, 0))  # not via a new open: closing it would unlock
        _write_holder(fd)
        if previous:
            logger.warning("%s: took over the lock of %s, which is gone (its lock was free).",
                           path, _describe(previous))
        return _register(RunDirLock(path, fd))


def _acquire_by_exclusive_create(path: Path, wait: "_Wait") -> RunDirLock:
    """The lock where the filesystem has no POSIX locks: whoever creates the file holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder and _holder_is_gone(holder):
                logger.warning("%s: removing the stale lock of %s, which is gone.", path, _describe(holder))
                path.unlink(missing_ok=True)
                continue
            wait.or_refuse(holder, "created it (this filesystem has no POSIX locks)")
            continue
        _write_holder(fd)
        return _register(RunDirLock(path, fd))


class _Wait:
    """When the lock is taken: pause and try again, or refuse."""

    def __init__(self, path: Path, requeue_wait_s: float):
        self.path, self.deadline, self.announced = path, time.monotonic() + requeue_wait_s, False

    def or_refuse(self, holder: Optional[dict], how: str) -> None:
        """Return after a pause while waiting is right (an earlier attempt of this Slurm job, or
        a holder that has not written its record yet); raise RunDirInUse otherwise."""
        in_time = time.monotonic() < self.deadline
        if in_time and (holder is None or _is_earlier_attempt_of_this_job(holder)):
            if holder is not None and not self.announced:
                logger.warning("%s: waiting for %s (an earlier attempt of this Slurm job) to stop.",
                               self.path, _describe(holder))
                self.announced = True
            time.sleep(POLL_S)
            return
        requeued = bool(holder) and _is_earlier_attempt_of_this_job(holder)
        waited = " and did not let go within the requeue wait" if requeued else ""
        leftover = (f"stop it: kill {holder.get('pid')} on {holder.get('host')}" if holder else
                    f"stop it; the holder has not written its pid into {self.path}")
        raise RunDirInUse(
            "train.run_dir", str(self.path.parent), "a train.run_dir no other training uses",
            message=f"train.run_dir = {str(self.path.parent)!r} is in use: {_describe(holder)} {how}{waited}. A second "
            "training in the same directory would mix its checkpoints and metrics with that one's. Allowed: a "
            "train.run_dir no other training uses, or wait until that training ends (if it is a leftover, "
            f"{leftover})."
        )


def _holder_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_holder(fd: int) -> None:
    data = (json.dumps(_holder_record()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(path: Path) -> Optional[dict]:
    """The holder's record, or None when the file is gone or not written yet. Only for a
    process that does not hold the lock: closing any descriptor of the file drops its lock."""
    try:
        with open(path, "rb") as stream:
            return _parse_holder(stream.read())
    except OSError:
        return None


def _parse_holder(data: bytes) -> Optional[dict]:
    try:
        record = json.loads(data or b"null")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "an unknown process"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {holder.get('started')}"


def _is_earlier_attempt_of_this_job(holder: dict) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job) and holder.get("slurm_job_id") == job and holder.get("pid") != os.getpid()


def _holder_is_gone(holder: dict) -> bool:
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if _is_earlier_attempt_of_this_job(holder) and restart > int(holder.get("slurm_restart_count") or 0):
        return True  # Slurm starts an attempt only once the previous one has ended
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False  # another host's processes cannot be seen from here
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by another user
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _register(lock: RunDirLock) -> RunDirLock:
    _HELD[lock.path] = lock
    return lock


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()
