"""The one place megaloop unpickles a file: loading never executes code from a file megaloop did not write.

A `.pt` file is a pickle, and a pickle can name any Python callable to run while it loads (a `model.pt`
whose `__reduce__` returns `os.system`). So:

- `load(path)`: torch.load(weights_only=True), torch's restricted unpickler, which builds tensors,
  containers and primitives and refuses every other callable; the few non-tensor types DeepSpeed itself
  saves (SAFE_GLOBALS: its ZeRO stage enum, loss scaler, fragment addresses) and numpy's RNG-state array
  (rng_rank*.pt written before megaloop saved the numpy state as a tensor) are allow-listed, within this
  call only. Everything megaloop reads itself goes through here (plain model files, DeepSpeed's model /
  layer / optimizer states in megaloop.checkpoint.reader and training_state, the per-rank RNG files).
- `check_folder(tag_dir)`: DeepSpeed's engine.load_checkpoint and zero_to_fp32 call
  torch.load(weights_only=False) themselves (deepspeed 0.19 hard-codes it), so before megaloop hands them a
  checkpoint folder every .pt file in it is read statically (torch.serialization.get_unsafe_globals_in_checkpoint
  disassembles the pickle without running it) and refused unless every callable it names is one the
  restricted unpickler allows. What DeepSpeed then unpickles can call nothing else.

A refused file is a one-line CheckpointError naming the file and the callable.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import List

import torch

from megaloop.checkpoint.layout import CheckpointError

# What a checkpoint from someone else is: code, as with any pickle. These lines say so in the error.
_WHY = ("a pickle can run code as it loads, so megaloop unpickles only tensors, containers and the few DeepSpeed "
        "types it saves; re-save the weights as safetensors (or a dict of tensors with torch.save)")


def _safe_globals() -> list:
    """The non-tensor types megaloop's and DeepSpeed's own checkpoints hold (found with
    get_unsafe_globals_in_checkpoint on ZeRO 0-3, PP 2, fp32 / bf16 runs): plain data, no code runs."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    out = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, np.ndarray, np.dtype,
           type(np.dtype(np.uint32))]
    try:  # numpy >= 2 pickles arrays through numpy._core; numpy 1 through numpy.core
        from numpy._core.multiarray import _reconstruct
        out.append((_reconstruct, "numpy._core.multiarray._reconstruct"))
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct
    out.append((_reconstruct, "numpy.core.multiarray._reconstruct"))
    return out


@contextlib.contextmanager
def _allowed():
    with torch.serialization.safe_globals(_safe_globals()):
        yield


def unsafe_globals(path) -> List[str]:
    """The callables a torch.save file names that the restricted unpickler would refuse (none run: the pickle
    is disassembled, not loaded). Raises CheckpointError for a file that is not a torch.save zip archive or
    whose pickle uses opcodes the restricted unpickler does not know."""
    try:
        with _allowed():
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (pickle.UnpicklingError, EOFError) as e:  # an opcode the static reader (and torch's) does not accept
        raise CheckpointError(f"{path}: refused: its pickle cannot be checked without running it "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); {_WHY}") from e
    except (ValueError, RuntimeError, OSError) as e:  # not a zip archive (a bare pickle), truncated, unreadable
        raise CheckpointError(f"{path}: refused: not a complete torch.save archive ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:120]}); a truncated copy, or a bare pickle, which "
                              f"megaloop does not run") from e


def _refused(path, names: List[str]) -> CheckpointError:
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return CheckpointError(f"{path}: refused: it names Python callables ({listed}); {_WHY}")


def _unpickler_reason(e: Exception) -> str:
    """The informative line of torch's long weights_only message ("Unsupported operand 149", ...)."""
    lines = [" ".join(line.split()) for line in str(e).splitlines()]
    picked = [line for line in lines if "unsupported" in line.lower()]
    return picked[0][:160] if picked else "torch's restricted unpickler refused it"


def load(path, mmap: bool = False):
    """torch.load(path) on the CPU with weights_only=True (plus SAFE_GLOBALS); a file that needs anything else,
    or that cannot be read, is a CheckpointError naming it."""
    try:
        with _allowed():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        try:
            names = unsafe_globals(path)
        except CheckpointError:
            names = []
        if names:
            raise _refused(path, names) from e
        raise CheckpointError(f"{path}: refused: {_unpickler_reason(e)}; {_WHY}") from e
    except Exception as e:  # noqa: BLE001 - a truncated / foreign file: name it
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from e


def check_file(path) -> None:
    """Refuse (CheckpointError) a file DeepSpeed is about to torch.load(weights_only=False) unless every callable
    its pickle names is allowed."""
    names = unsafe_globals(path)
    if names:
        raise _refused(path, names)


def check_folder(folder) -> None:
    """check_file on every .pt file in a checkpoint tag folder (DeepSpeed reads them by its own names)."""
    for f in sorted(Path(folder).glob("*.pt")):
        check_file(f)


def safetensors_index(path):
    """({name: shape}, metadata) of a safetensors file, from its header (no tensor read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError, a truncated file
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from e


def read_safetensors_tensor(path, name: str):
    """One tensor of a safetensors file (its own memory)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(name)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read '{name}' from {path}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}") from e
