"""Where a training checkpoint lives and which one a path means.

    <output_dir>/checkpoints/                 the checkpoint root
        latest                                the newest complete tag (DeepSpeed's format: the tag as text)
        step_00000100/                        one tag: DeepSpeed's files, rng_rankNNNNN.pt, and
            megaloop_complete.json            the completeness marker, written last (see engine.py), with a
                                          checksum of every file of the tag (integrity.py)

A tag without the marker is an interrupted save: it is never read (naming it is an error; a root or
run folder skips it and falls back to the newest complete tag).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from megaloop.errors import MegaloopError

COMPLETE = "megaloop_complete.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d+)$")
_MODEL_STATES = ("mp_rank_*_model_states.pt", "layer_*-model_states.pt", "zero_pp_rank_*_model_states.pt",
                 "*zero_pp_rank_*_optim_states.pt")


class CheckpointError(MegaloopError, ValueError):
    """A checkpoint cannot be found or read as asked; the one-line message names the path or file."""


def tag_for(step: int) -> str:
    """The tag (folder name) of the checkpoint saved after `step` optimizer steps."""
    return f"step_{step:08d}"


def tag_step(name: str) -> Optional[int]:
    """The step of a tag name, or None for anything else."""
    m = TAG_RE.match(name)
    return int(m.group(1)) if m else None


def atomic_write(path, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # a full disk leaves no stray temporary; `path` keeps its old contents
        raise


def is_complete(tag_dir) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def marker(tag_dir) -> dict:
    """The completeness marker's contents ({"step", "consumed_samples"}), {} if unreadable."""
    try:
        return json.loads((Path(tag_dir) / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}


def write_marker(tag_dir, step: int, consumed_samples, checksums: Optional[dict] = None) -> None:
    """The marker: step, consumed samples, and (integrity.checksum_tag) every file's size and digest; it is
    written only for weights found finite (engine.save_training), hence "finite": true."""
    fields = {"step": step, "consumed_samples": consumed_samples, "finite": True}
    if checksums is not None:
        fields["checksums"] = checksums
    atomic_write(Path(tag_dir) / COMPLETE, json.dumps(fields))


def tags(root) -> List[Tuple[int, Path]]:
    """(step, folder) of every step_N folder under a checkpoint root, complete or not, by step."""
    root = Path(root)
    out = []
    for d in root.iterdir() if root.is_dir() else ():
        step = tag_step(d.name)
        if step is not None and d.is_dir():
            out.append((step, d))
    return sorted(out)


def complete_tags(root) -> List[Path]:
    """The complete tag folders under a checkpoint root, oldest first."""
    return [d for _, d in tags(root) if is_complete(d)]


def has_model_states(d) -> bool:
    d = Path(d)
    return d.is_dir() and any(any(d.glob(p)) for p in _MODEL_STATES)


def is_tag_dir(path) -> bool:
    """`path` names one tag (complete or not) rather than a root or run folder."""
    path = Path(path)
    return is_complete(path) or has_model_states(path) or tag_step(path.name) is not None


def is_deepspeed_checkpoint(path) -> bool:
    """A run directory (with checkpoints/), a checkpoint root (latest, step_N/, global_stepN/) or one
    tag directory holding DeepSpeed model-state files (as opposed to a plain torch.save'd file)."""
    path = Path(path)
    if not path.is_dir():
        return False
    for root in (path, path / "checkpoints"):
        if not root.is_dir():
            continue
        if (root / LATEST).is_file() or is_complete(root) or has_model_states(root):
            return True
        for d in root.iterdir():
            if d.is_dir() and (TAG_RE.match(d.name) or d.name.startswith("global_step")) and \
                    (is_complete(d) or has_model_states(d)):
                return True
    return False


def root_of(path) -> Path:
    """The checkpoint root a run folder or root path means: `path/checkpoints` for a run folder (it has
    checkpoints/ and no tags or `latest` of its own), else `path`."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and not (path / LATEST).is_file() and not tags(path):
        return path / "checkpoints"
    return path


def _incomplete(tag_dir: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint {tag_dir} is incomplete: it has no {COMPLETE} (its save was interrupted, "
                           f"or it was not written by megaloop); use a complete step instead")


def resolve(path, step: Optional[int] = None, *, required: bool = True) -> Optional[Path]:
    """The complete tag folder `path` means (resume, export, generation and evaluation all use this).

    path: one tag folder (step_N/, or any folder holding the marker or DeepSpeed model states), a
          checkpoint root, or a run folder holding checkpoints/.
    step: picks step_{step:08d} under a root / run folder; with a tag folder it must be that tag's step.
    Without `step`: the tag `latest` names if it is complete, else the newest complete tag.
    An incomplete tag is refused when named (by path or step) and skipped otherwise.

    Raises CheckpointError when there is nothing to read; with required=False returns None instead
    when `path` does not exist or holds no complete tag (a fresh run's output folder). A named
    incomplete tag or a missing `step` raise either way."""
    path = Path(path)
    if not path.exists():
        if not required:
            return None
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_tag_dir(path):
        if not is_complete(path):
            raise _incomplete(path)
        if step is not None:
            written = marker(path).get("step")
            if written is not None and int(written) != step:
                raise CheckpointError(f"step {step} was asked for but {path} holds step {written}")
        return path
    root = root_of(path)
    if step is not None:
        tag_dir = root / tag_for(step)
        if not tag_dir.is_dir():
            have = ", ".join(str(s) for s, _ in tags(root)) or "none"
            raise CheckpointError(f"no step {step} in {root} (looked for {tag_dir.name}/; steps there: {have})")
        if not is_complete(tag_dir):
            raise _incomplete(tag_dir)
        return tag_dir
    latest = root / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and is_complete(root / tag):
            return root / tag
    complete = complete_tags(root)
    if complete:
        return complete[-1]
    if not required:
        return None
    others = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    raise CheckpointError(f"no complete checkpoint in {root}: no tag directory has {COMPLETE} "
                          f"(directories there: {', '.join(others) or 'none'}; an interrupted save leaves none)")
