"""The plain checkpoint format: one file holding a one-process LoopedLM state dict and, optionally, the run
config (else config.yaml beside the file or in its parent folder). Two forms:

- `*.safetensors` (what tools/import_hf.py writes, and tools/consolidate.py for such an output name): the
  tensors, the config as JSON under the metadata key "megaloop_config" (a tied head is stored once, as
  embedding.weight); the format holds no code.
- any other name (model.pt, ...): a `torch.save`d dict, the state dict under "model" / "state_dict" /
  "module" (or the dict of tensors itself) and the config under "config"; read with
  torch.load(weights_only=True) (megaloop.checkpoint.safe_load): a pickle naming any other callable is refused.

Tests and demos save one with save_plain_checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from megaloop.checkpoint.layout import CheckpointError
from megaloop.config import Config, ConfigError, config_from_dict
from megaloop.checkpoint.saved_config import saved_config_from_dict
from megaloop.errors import OutputError, os_error_in

CONFIG_KEY = "megaloop_config"  # the safetensors metadata key holding the run config (JSON)
PLAIN_NAMES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin", "consolidated.pt", "state_dict.pt")


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
    """The file's contents as the torch.save form's dict ({"model": tensors, "config": dict} for safetensors,
    whose tensors are read one at a time when asked for: megaloop.checkpoint.lazy_state_dict)."""
    from megaloop.checkpoint.lazy_state_dict import SafetensorsStateDict
    from megaloop.checkpoint.sharded_read import load_mapped

    if f.suffix != ".safetensors":
        return load_mapped(f)
    tensors = SafetensorsStateDict(f)
    meta = tensors.metadata
    obj = {"model": tensors}
    if CONFIG_KEY in meta:
        try:
            obj["config"] = json.loads(meta[CONFIG_KEY])
        except ValueError as e:
            raise CheckpointError(f"{f}: its '{CONFIG_KEY}' metadata is not JSON ({e})") from e
    return obj


def load_plain_state_dict(checkpoint, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
    from megaloop.checkpoint.lazy_state_dict import SafetensorsStateDict
    f = plain_file(checkpoint, step)
    obj = _read(f)
    if isinstance(obj, dict):
        if isinstance(obj.get("model"), SafetensorsStateDict):
            if not obj["model"]:
                raise CheckpointError(f"{f} holds no tensors")
            return obj["model"]  # (read per tensor; safetensors holds tensors only)
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


def _save_safetensors(state_dict: Dict[str, torch.Tensor], config: Config, tmp: Path) -> None:
    import errno

    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for k, t in state_dict.items():
        if k == "head.weight" and config.model.tie_embeddings:
            continue  # the reader ties it back to embedding.weight
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[k] = t.clone() if key in seen else t  # safetensors refuses tensors sharing memory
        seen.add(key)
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_KEY: json.dumps(config.to_dict())})
    except Exception as e:  # noqa: BLE001 - safetensors reports a failed write in its own error type
        full = "no space left" in str(e).lower()
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else str(e)) from e
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def save_plain(state_dict: Dict[str, torch.Tensor], config: Config, path) -> Path:
    """Write a one-process state dict + its run config in the plain format (safetensors for a .safetensors
    name, else torch.save), under a temporary name renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            _save_safetensors(state_dict, config, tmp)
        else:
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
    """Save a one-process model + config in the plain format (tests, demos)."""
    return save_plain(model.state_dict(), config, path)
