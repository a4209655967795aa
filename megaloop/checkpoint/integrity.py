"""Checksums of a checkpoint's files, and which tag is intact.

Saving (engine.save_training): once every rank has written its files, the ranks hash the tag's files
between them (rank r takes every world-th file of the sorted listing: one read pass over the bytes in
all, in parallel), rank 0 gathers the digests and records them in the completeness marker:

    megaloop_complete.json  {"step": .., "consumed_samples": .., "finite": true,
                             "checksums": {"algorithm": "xxh3_64", "files": {"<name>": [size, "<hex>"]}}}

Reading (resume, export, eval, consolidate, init.from, a distillation teacher): `verify_tag` re-hashes every
recorded file and refuses a tag whose file is missing, has another size or another digest, in one line naming
the file. In a training job rank 0 alone re-hashes and every rank gets its verdict (`resolve_intact_agreed`,
`verified_by_rank0`): one read pass in all, not one per rank.
A tag saved before megaloop recorded checksums still loads (one note: it is not verified).
`resolve_intact` is layout.resolve plus verification: for a run folder or checkpoint root a damaged tag
is skipped (with a note naming it and why) and the previous complete, intact tag is taken.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from megaloop.checkpoint.layout import (COMPLETE, LATEST, CheckpointError, complete_tags, is_deepspeed_checkpoint,
                                        is_tag_dir, marker, resolve, root_of, tag_step)

ALGORITHM = "xxh3_64"
_WINDOW = 256 << 20  # (a multiple of mmap.ALLOCATIONGRANULARITY)
_noted_unverified = set()  # tags already reported as "no checksums" in this process (say so once)


def file_digest(path) -> Tuple[int, str]:
    """(size in bytes, xxh3_64 hex digest) of a file, in one pass (memory-mapped in 256 MiB windows: no copy
    out of the page cache)."""
    import mmap

    import xxhash
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, _WINDOW):
            with mmap.mmap(f.fileno(), min(_WINDOW, size - start), offset=start, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return size, h.hexdigest()


def tag_files(tag_dir) -> List[str]:
    """The files of a tag (relative paths, sorted), the completeness marker and temporaries excluded."""
    tag_dir = Path(tag_dir)
    out = []
    for dirpath, _, names in os.walk(tag_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), tag_dir)
            if rel != COMPLETE and ".tmp" not in n:
                out.append(rel)
    return sorted(out)


def hash_share(tag_dir, rank: int, world: int) -> Dict[str, list]:
    """This rank's share of the tag's digests: every world-th file from `rank` on."""
    files = tag_files(tag_dir)
    return {rel: list(file_digest(Path(tag_dir) / rel)) for rel in files[rank::world]}


def checksum_tag(tag_dir, rank: int, world: int) -> Optional[dict]:
    """Collective (every rank, after the barrier that follows the last file): the digests of every file of
    the tag, hashed by all ranks in parallel and gathered on rank 0 (the others get None)."""
    share = hash_share(tag_dir, rank, world)
    if world > 1:
        import torch.distributed as tdist
        parts = [None] * world if rank == 0 else None
        tdist.gather_object(share, parts, dst=0)
        if rank != 0:
            return None
        share = {k: v for part in parts for k, v in part.items()}
    return {"algorithm": ALGORITHM, "files": dict(sorted(share.items()))}


def verify_tag(tag_dir) -> Optional[str]:
    """Raise CheckpointError naming the first file that is missing or differs from its recorded checksum;
    return a note (once per tag and process) for a tag saved without checksums, else None."""
    tag_dir = Path(tag_dir)
    sums = marker(tag_dir).get("checksums")
    if not isinstance(sums, dict) or not isinstance(sums.get("files"), dict):
        key = os.path.abspath(tag_dir)
        if key in _noted_unverified:
            return None
        _noted_unverified.add(key)
        return f"note: checkpoint {tag_dir} has no checksums (saved before megaloop recorded them): not verified"
    if sums.get("algorithm") != ALGORITHM:
        raise CheckpointError(f"checkpoint {tag_dir}: {COMPLETE} records {sums.get('algorithm')!r} checksums; this "
                              f"megaloop checks {ALGORITHM} (pass --no-verify-checksums / train.verify_checkpoints="
                              f"false to load it unverified)")
    for rel, (size, digest) in sums["files"].items():
        f = tag_dir / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is damaged: {f} is missing (recorded in {COMPLETE})")
        got_size, got = file_digest(f)
        if got_size != size:
            raise CheckpointError(f"checkpoint {tag_dir} is damaged: {f} has {got_size} bytes, {size} were saved "
                                  f"(truncated or overwritten)")
        if got != digest:
            raise CheckpointError(f"checkpoint {tag_dir} is damaged: {f} does not match its checksum ({ALGORITHM} "
                                  f"{got}, saved {digest}): the file was corrupted after it was written")
    return None


def verified(tag_dir, verify: bool = True) -> Path:
    """`tag_dir` after verify_tag (its note, if any, printed once on stderr)."""
    if verify:
        note = verify_tag(tag_dir)
        if note:
            print(note, file=sys.stderr, flush=True)
    return Path(tag_dir)


def resolve_intact(path, step: Optional[int] = None, *, required: bool = True,
                   verify: bool = True) -> Tuple[Optional[Path], List[str]]:
    """(tag, notes): layout.resolve(path, step) verified. A tag named by path or step must be intact (else
    CheckpointError naming the file). For a run folder or root, a damaged tag is skipped with a note (which
    tag, why) and the newest earlier complete, intact tag is taken; none intact raises CheckpointError."""
    first = resolve(path, step, required=required)
    if first is None or not verify:
        return first, []
    notes: List[str] = []
    if step is not None or is_tag_dir(path):
        note = verify_tag(first)
        return first, [note] if note else []
    older = [d for d in complete_tags(root_of(path)) if (tag_step(d.name) or 0) < (tag_step(first.name) or 0)]
    candidates = [first] + older[::-1]
    for tag in candidates:
        try:
            note = verify_tag(tag)
        except CheckpointError as e:
            notes.append(f"skipped {tag}: {e}")
            continue
        if notes:
            notes.append(f"using {tag}, the newest complete and intact checkpoint (`{LATEST}` names {first.name})")
        return tag, notes + ([note] if note else [])
    raise CheckpointError(f"no intact checkpoint in {root_of(path)}: " + "; ".join(notes))


def agreed_on_rank0(fn: Callable[[], Any], *, rank: int, world: int) -> Any:
    """Collective: fn() on rank 0 only (one read of a checkpoint, not one per rank), its result broadcast to
    every rank, or the same CheckpointError raised on every rank (an OSError there too: a rank that raised
    alone would leave the others waiting in the broadcast)."""
    result = None
    if rank == 0:
        try:
            result = (None, fn())
        except CheckpointError as e:
            result = (str(e), None)
        except OSError as e:
            result = (f"cannot read the checkpoint: {e}", None)
    if world > 1:
        import torch.distributed as tdist
        box = [result]
        tdist.broadcast_object_list(box, src=0)
        result = box[0]
    error, value = result
    if error is not None:
        raise CheckpointError(error)
    return value


def resolve_intact_agreed(path, *, required: bool, verify: bool, rank: int, world: int):
    """Collective: resolve_intact(path) on rank 0 only, broadcast to every rank: (tag | None, notes), or the
    same CheckpointError on every rank."""
    def on_rank0():
        tag, notes = resolve_intact(path, required=required, verify=verify)
        return None if tag is None else str(tag), notes

    tag, notes = agreed_on_rank0(on_rank0, rank=rank, world=world)
    return (None if tag is None else Path(tag)), notes


def verified_by_rank0(path, *, verify: bool, rank: int, world: int) -> bool:
    """Collective, before every rank reads the whole checkpoint `path` names (init.from, a distillation
    teacher): with several ranks, rank 0 checks the checksums of its tag (one read pass in all, not one per
    rank; the note for a tag without checksums printed there) and every rank gets the verdict, the same
    CheckpointError everywhere for a damaged tag. Returns the `verify` each rank passes to its loader: False
    once rank 0 has checked (a path that is not a megaloop checkpoint has no checksums: its loader's own
    errors stay as they are); one rank verifies in its loader as before."""
    if not verify or world <= 1:
        return verify

    def on_rank0():
        if Path(path).exists() and is_deepspeed_checkpoint(path):
            note = verify_tag(resolve(path))
            if note:
                print(note, file=sys.stderr, flush=True)

    agreed_on_rank0(on_rank0, rank=rank, world=world)
    return False
