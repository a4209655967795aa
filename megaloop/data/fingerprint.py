"""A fingerprint of each dataset a run reads, saved in its checkpoints and compared on resume.

A resume continues the sample order of the data it started on; the same prefix holding another corpus (a
re-tokenised or replaced .bin/.idx) would be read on silently. Each checkpoint's client state carries

    data_fingerprint: {prefix: {"bin_bytes", "idx_bytes", "documents", "sequences", "index_xxh64"}}

and megaloop.training.resume_policy refuses a resume whose datasets differ (`--override-resume-config`
accepts it). index_xxh64 hashes the whole .idx file up to 8 MiB; a larger one is hashed in three 1 MiB
pieces (head, middle, tail; its size is in idx_bytes), so every rank of a large job computes it at start-up and
on resume for a few MiB read, whatever the corpus size.
"""
from __future__ import annotations

import os
from typing import Dict, List

FULL_HASH_BYTES = 8 << 20
PIECE_BYTES = 1 << 20


def _index_hash(path: str, size: int) -> str:
    import xxhash

    h = xxhash.xxh64()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for start in (0, size // 2, size - PIECE_BYTES):
                f.seek(start)
                h.update(f.read(PIECE_BYTES))
    return h.hexdigest()


def dataset_fingerprint(prefix: str) -> dict:
    """The fingerprint of one indexed dataset (its .idx header is read; .bin only stat'ed)."""
    from megaloop.data.indexed_dataset import IndexedDataset, dataset_paths

    bin_path, idx_path = dataset_paths(prefix)
    ds = IndexedDataset(prefix)
    idx_bytes = os.path.getsize(idx_path)
    return {"bin_bytes": os.path.getsize(bin_path), "idx_bytes": idx_bytes, "documents": int(ds.num_documents),
            "sequences": int(len(ds)), "index_xxh64": _index_hash(idx_path, idx_bytes)}


def data_fingerprint(cfg) -> Dict[str, dict]:
    """{prefix: fingerprint} of every dataset in cfg.data.data_path ({} for a synthetic task)."""
    if cfg.data.task or not cfg.data.data_path:
        return {}
    from megaloop.data import parse_data_paths

    return {str(p): dataset_fingerprint(str(p)) for p in parse_data_paths(cfg.data.data_path)[0]}


def fingerprint_changes(saved: Dict[str, dict], now: Dict[str, dict]) -> List[str]:
    """One clause per dataset whose fingerprint differs ([] when the same; a prefix added or removed is a
    data.data_path change, which resume_policy reports itself)."""
    out = []
    for prefix in sorted(set(saved) & set(now)):
        a, b = saved[prefix], now[prefix]
        diff = [f"{k} {a.get(k)} -> {b.get(k)}" for k in ("documents", "sequences", "bin_bytes", "idx_bytes",
                                                          "index_xxh64") if a.get(k) != b.get(k)]
        if diff:
            out.append(f"{prefix} ({', '.join(diff)})")
    return out
