"""Where an export writes, safely: nothing partial, nothing that is not an export is ever replaced.

An export (remote-code or llama format) is written to a temporary folder beside its output
(`make_temp_dir`) and renamed into place at the end (`move_into_place`), so a failed export never
leaves a partial folder; `check_output_dir` and `check_export_paths` refuse, before anything is read,
an output that would replace someone's files or the checkpoint being read; `output_failure` turns a
failed write (disk full, read-only, permissions) into one OutputError line.
"""
from __future__ import annotations

import contextlib

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from megaloop import checkpoint as ckpt
from megaloop.errors import OutputError, os_error_in
from megaloop.export.hf_files import TEMPLATE_FILES
from megaloop.export.inputs import ExportError
from megaloop.tempfiles import remove_stale, temp_suffix


def output_failure(err: BaseException, out_dir: Path, tmp: Optional[Path] = None) -> Optional[OutputError]:
    """The one-line OutputError for a write that failed (disk full, read-only, permissions) while exporting
    to out_dir, or None for any other error. A failure to read an input (a file outside the output's folder)
    is left alone. safetensors reports a full disk in its own error type: its message is matched."""
    import errno

    os_err = os_error_in(err)
    if os_err is None:
        text = str(err)
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            if os.strerror(code) in text or f"os error {code})" in text:
                os_err = OSError(code, os.strerror(code))
                break
    if os_err is None:
        return None
    if tmp is not None and os_err.filename is not None:
        where = os.path.abspath(os.fspath(os_err.filename))
        if not where.startswith(str(out_dir.parent) + os.sep) and where != str(out_dir.parent):
            return None
    return OutputError(os_err, out_dir.parent, f"nothing was written to {out_dir}"
                       + (" (the previous export there is untouched)" if out_dir.exists() else ""))


def make_temp_dir(out_dir: Path) -> Path:
    """The temporary folder beside out_dir that an export is written into before it is renamed."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out_dir.parent, f".{out_dir.name}")  # what a killed export to out_dir left behind
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{temp_suffix()}-", dir=out_dir.parent))
    except OSError as e:
        raise output_failure(e, out_dir) from e


# Every name an export (remote-code or llama format) writes into its folder: --overwrite replaces a
# folder holding these only, so a folder with anything else in it (someone's files) is never deleted.
EXPORT_FILES = frozenset(("config.json", "model.safetensors", "generation_config.json", "README.md",
                          "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "tokenizer.json",
                          "megaloop_unrolled.json", "__pycache__") + TEMPLATE_FILES)


def previous_export_problem(path) -> Optional[str]:
    """None when `path` is a folder an earlier export wrote (config.json of a megaloop export, or of a
    llama-format export with its megaloop_unrolled.json, and no other files) or an empty folder, so
    that --overwrite may replace it; otherwise why it is not."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "it is not a folder"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return None
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if not (model_type == "megaloop" or (model_type == "llama" and (path / "megaloop_unrolled.json").is_file())):
        return "it holds no config.json of a megaloop export"
    foreign = [n for n in names if n not in EXPORT_FILES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"besides an export it holds {shown}, which an export does not write"
    return None


def check_output_dir(out_dir, overwrite: bool) -> None:
    """Refuse (ExportError, one line, nothing touched) an existing output without overwrite, and with
    overwrite anything but a previous export: --overwrite never deletes a folder it did not write."""
    out_dir = Path(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    why = previous_export_problem(out_dir)
    if why:
        raise ExportError(f"refusing to overwrite {out_dir}: {why}; --overwrite only replaces a previous export "
                          f"(choose another output folder, or move that one away). Nothing was deleted.")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_paths(checkpoint, output_dir) -> None:
    """Refuse an output folder that would destroy or pollute the checkpoint being read: the checkpoint
    itself, a folder containing it, or a folder inside its checkpoint tree (a run's checkpoints/, a
    checkpoint root, a step tag). Real paths are compared, so symlinks do not hide the overlap. A run's
    own subfolder beside its checkpoints (runs/X/hf) is allowed."""
    ckpt_path, out = Path(checkpoint).resolve(), Path(output_dir).resolve()
    if _inside(ckpt_path, out):
        what = "is" if ckpt_path == out else "contains"
        example = ckpt_path / 'hf' if ckpt_path.is_dir() else ckpt_path.parent / 'hf'
        raise ExportError(f"--output {output_dir} {what} the checkpoint being read ({ckpt_path}): writing there "
                          f"would delete it; export to another folder (e.g. {example})")
    if not ckpt_path.is_dir():
        return
    if (ckpt_path / "checkpoints").is_dir():  # a training run: its checkpoint root
        tree = ckpt_path / "checkpoints"
    elif ckpt.is_tag_dir(ckpt_path):
        tree = ckpt_path.parent  # one step tag: the root holding it and its sibling tags
    elif ckpt.is_deepspeed_checkpoint(ckpt_path):
        tree = ckpt_path  # a checkpoint root
    else:
        return  # a plain checkpoint folder: check_output_dir keeps its files (they are no export)
    if _inside(out, tree):
        raise ExportError(f"--output {output_dir} lies inside the checkpoint folder {tree} being read; export "
                          f"beside it instead (e.g. {tree.parent / 'hf'})")


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename a completed temporary folder to out_dir; an existing out_dir (overwrite) is swapped out
    first and removed only once the new folder is in place. An existing out_dir that is not a previous
    export (see previous_export_problem) is refused, untouched."""
    if out_dir.exists() or out_dir.is_symlink():
        check_output_dir(out_dir, overwrite=True)
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{temp_suffix('old')}-", dir=out_dir.parent))
        os.rename(out_dir, old / "x")
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


@contextlib.contextmanager
def staged_output(out_dir: Path):
    """Write an export into a temporary folder beside `out_dir` (the block's `tmp`); a clean end renames it
    into place (`move_into_place`), any failure removes it and re-raises, an OSError as an OutputError
    naming the folder (`output_failure`): never a half-written export under the final name."""
    tmp = make_temp_dir(out_dir)
    try:
        yield tmp
        move_into_place(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = output_failure(e, out_dir, tmp)
        if failure is not None:
            raise failure from e
        raise
