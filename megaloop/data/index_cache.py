"""Build sampling index arrays once, cache them on disk under a key of everything they depend on.

Every rank calls build_or_load_arrays with the same description. One builds, the others wait, then all
memory-map the same .npy files:
  * under torch.distributed, global rank 0 builds before a barrier;
  * after the barrier (or without torch.distributed at all), a rank that still finds no cache -- a
    node-local cache directory, or plain multi-process use -- takes a file lock, and the first holder
    builds while the others wait on the lock and then load.
Every file is written to a temporary name and renamed into place, the description file last, so a
reader never sees a half-written cache, whatever crashes or races happen.
"""
import contextlib
import hashlib
import json
import os
import sys
from typing import Callable, Dict, Optional

import numpy as np

Arrays = Dict[str, np.ndarray]


def cache_key(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


def file_fingerprint(path: str) -> dict:
    """Identity of an input file for cache keys: a rewritten file gets a new size or mtime."""
    stat = os.stat(path)
    return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _distributed():
    # Never import torch just to learn that torch.distributed is not in use.
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl

    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass  # a filesystem without locks: atomic renames still keep the cache valid, work may repeat
        try:
            yield
        finally:
            try:
                fcntl.flock(f, fcntl.LOCK_UN)
            except OSError:
                pass


class IndexCache:
    """The files of one cached entry: {cache_dir}/{key}-{name}-{array}.npy plus a description json."""

    def __init__(self, cache_dir: str, name: str, description: dict):
        self.description = description
        self.base = os.path.join(cache_dir, f"{cache_key(description)}-{name}")
        self.description_path = self.base + "-description.json"
        self.lock_path = self.base + ".lock"

    def array_path(self, array_name: str) -> str:
        return f"{self.base}-{array_name}.npy"

    def exists(self) -> bool:
        return os.path.isfile(self.description_path)

    def save(self, arrays: Arrays):
        tmp_suffix = f".tmp-{os.getpid()}"
        for name, array in arrays.items():
            path = self.array_path(name)
            with open(path + tmp_suffix, "wb") as f:
                np.save(f, array)
            os.replace(path + tmp_suffix, path)
        with open(self.description_path + tmp_suffix, "w") as f:
            json.dump({"description": self.description, "arrays": sorted(arrays)}, f, indent=1, sort_keys=True)
        os.replace(self.description_path + tmp_suffix, self.description_path)  # the commit point

    def load(self) -> Arrays:
        with open(self.description_path) as f:
            saved = json.load(f)
        if saved["description"] != json.loads(json.dumps(self.description)):
            raise ValueError(f"{self.description_path}: cache entry describes something else (hash collision?); "
                             f"delete it")
        return {name: np.load(self.array_path(name), mmap_mode="r") for name in saved["arrays"]}

    def build_locked(self, build: Callable[[], Arrays]):
        with _file_lock(self.lock_path):
            if not self.exists():  # somebody else may have built it while we waited
                self.save(build())


def build_or_load_arrays(cache_dir: Optional[str], name: str, description: dict,
                         build: Callable[[], Arrays]) -> Arrays:
    """The arrays for description, from the cache when possible; cache_dir=None builds in memory."""
    if cache_dir is None:
        return build()
    os.makedirs(cache_dir, exist_ok=True)
    cache = IndexCache(cache_dir, name, description)
    dist = _distributed()
    if dist is not None:
        if dist.get_rank() == 0 and not cache.exists():
            cache.build_locked(build)
        dist.barrier()
    if not cache.exists():
        cache.build_locked(build)
    return cache.load()
