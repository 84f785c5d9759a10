"""The public-domain corpus shipped in `corpus/`, tokenized on first use.

`data.paths: [bundled]` names it. The indexed dataset is written once per
(corpus, tokenizer) pair into `<cache>/bundled-<hash>/` and reused afterwards.
Concurrent builders are kept apart twice over: under torch.distributed rank 0
builds while the others wait at a barrier, and an exclusive file lock plus an
atomic rename of the finished folder keeps separate processes (or ranks on
other nodes whose cache is not shared) from reading a half-written dataset.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional


BUNDLED = "bundled"
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_FILE = CORPUS_DIR / "austen.jsonl.gz"
DATASET_NAME = "austen_text_document"
# Bump when the on-disk layout written by preprocess changes, to invalidate old caches.
FORMAT_VERSION = "1"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "falcon_h1_train"


def preprocess_files(*args, **kwargs):
    """recipes.data.preprocess.preprocess_files, imported when a build needs it: it imports
    Megatron Core, which the config checks reading this module must not pay for."""
    from recipes.data.preprocess import preprocess_files as preprocess

    return preprocess(*args, **kwargs)


def resolve_cache_dir(cache_dir: Optional[str]) -> Path:
    """`data.cache_dir`, or ~/.cache/falcon_h1_train when unset."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def bundled_cache_key(tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(FORMAT_VERSION.encode())
    digest.update(CORPUS_FILE.read_bytes())
    digest.update(tokenizer.fingerprint.encode())
    return digest.hexdigest()[:16]


def _is_built(prefix: Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def _build_if_missing(cache_root: Path, tokenizer) -> Path:
    final_dir = cache_root / f"bundled-{bundled_cache_key(tokenizer)}"
    prefix = final_dir / DATASET_NAME
    if _is_built(prefix):
        return prefix
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f"{final_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_built(prefix):  # another process finished while we waited
            return prefix
        staging = Path(tempfile.mkdtemp(prefix=f"{final_dir.name}.partial-", dir=cache_root))
        try:
            preprocess_files([CORPUS_FILE], tokenizer, staging / DATASET_NAME)
            if final_dir.exists():  # a crashed earlier build without its files
                shutil.rmtree(final_dir)
            os.rename(staging, final_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return prefix


def ensure_bundled_dataset(tokenizer, cache_dir: Optional[str] = None) -> str:
    """Return the indexed-dataset prefix of the bundled corpus, building it if needed.

    Call on every rank when torch.distributed is initialised (it holds a barrier).
    """
    import torch.distributed as dist

    cache_root = resolve_cache_dir(cache_dir)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            _build_if_missing(cache_root, tokenizer)
        dist.barrier()
        # On a shared cache this only finds rank 0's result; on a node-local
        # cache the first rank of each node builds its own copy under the lock.
        if dist.get_rank() != 0:
            _build_if_missing(cache_root, tokenizer)
        return str(cache_root / f"bundled-{bundled_cache_key(tokenizer)}" / DATASET_NAME)
    return str(_build_if_missing(cache_root, tokenizer))
