"""The plain checkpoint format: one `torch.save`d file holding a one-process LoopedLM state dict (under
"model" / "state_dict" / "module", or the dict of tensors itself) and, optionally, the run config
under "config" (else config.yaml beside the file or in its parent folder). tools/consolidate.py writes
it; tests and demos save one with save_plain_checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import torch

from megaloop.checkpoint.layout import CheckpointError
from megaloop.config import Config, ConfigError, config_from_dict
from megaloop.checkpoint.saved_config import saved_config_from_dict
from megaloop.errors import OutputError, os_error_in

PLAIN_NAMES = ("model.pt", "model.pth", "pytorch_model.bin", "consolidated.pt", "state_dict.pt")


def plain_file(checkpoint, step: Optional[int] = None) -> Path:
    """The file a plain checkpoint path means: the file itself, or a folder holding one of PLAIN_NAMES
    (`step` picks its step_{step}/, step{step}/ or iter_{step:07d}/ subfolder)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        if step is not None:
            raise CheckpointError(f"--step {step} was given but {checkpoint} is a single file")
        return checkpoint
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    base = checkpoint
    if step is not None:
        for name in (f"step_{step}", f"step{step}", f"iter_{step:07d}"):
            if (checkpoint / name).is_dir():
                base = checkpoint / name
                break
        else:
            raise CheckpointError(f"no step {step} in {checkpoint} (looked for step_{step}/, iter_{step:07d}/)")
    for name in PLAIN_NAMES:
        if (base / name).is_file():
            return base / name
    raise CheckpointError(f"no model state dict in {base} (looked for {', '.join(PLAIN_NAMES)}, and for a "
                          f"megaloop/DeepSpeed checkpoint: latest, step_NNNNNNNN/ with model-state files)")


def _read(f: Path):
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated / foreign file: name it
        raise CheckpointError(f"cannot read {f}: {type(e).__name__}: {e}") from e


def load_plain_state_dict(checkpoint, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
    f = plain_file(checkpoint, step)
    obj = _read(f)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict) and obj[key] and all(torch.is_tensor(v) for v in obj[key].values()):
                return dict(obj[key])
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(f"{checkpoint}: not a state dict (a dict of tensors, or one under 'model'/'state_dict')")


def load_plain_config(checkpoint, step: Optional[int] = None) -> Config:
    from megaloop.config import load_config

    f = plain_file(checkpoint, step)
    obj = _read(f)
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        try:
            return saved_config_from_dict(obj["config"])
        except ConfigError as e:
            raise CheckpointError(f"{f}: its saved config is invalid: {e}") from e
    for d in (f.parent, f.parent.parent):
        for name in ("config.yaml", "config.yml"):
            if (d / name).is_file():
                return load_config(d / name)
    raise CheckpointError(f"no config for {f}: save it in the checkpoint under 'config' or as config.yaml beside it")


def save_plain(state_dict: Dict[str, torch.Tensor], config: Config, path) -> Path:
    """torch.save a one-process state dict + its run config in the plain format."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # a Python file: a full disk raises OSError (ENOSPC), not RuntimeError
            torch.save({"model": state_dict, "config": config.to_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.exists():
            tmp.unlink()
        if os_error_in(e) is not None:
            raise OutputError(os_error_in(e), path.parent, f"nothing was written to {path}"
                              + (" (the previous file there is untouched)" if path.exists() else "")) from e
        raise
    return path


def save_plain_checkpoint(model, config: Config, path) -> Path:
    """torch.save a one-process model + config in the plain format (tests, demos)."""
    return save_plain(model.state_dict(), config, path)
