"""A CPU stand-in for "host memory vs accelerator memory", so that CPU-only CI catches the GPU-only bug
class "a host tensor handed to a collective" (gloo accepts it, NCCL raises `No backend type associated
with device type cpu`).

On a CPU machine the accelerator's device *is* the host, so a stray `torch.tensor([...])` and a tensor
made on `get_accelerator().current_device_name()` are indistinguishable. `install()` makes them
distinguishable again by tracking a shadow "host" attribute:

- a tensor made by a factory (`torch.tensor`, `torch.zeros`, ...) **without a `device=` argument**, called
  from the project's own code (megaloop/, pretrain_looped.py, tools/), lands on the shadow host, exactly
  where it would land on a GPU machine; so does the result of `.cpu()`;
- so are the parameters of a module built from such tensors (`nn.Parameter` keeps the mark), until the
  module is moved with `.to(<device>)`;
- `.to(<device>)` / `.to(device=...)` moves a tensor to the accelerator (it clears the mark);
- an op whose (non-scalar) inputs are on the shadow host produces host tensors (propagation), as on a GPU;
- every torch.distributed collective / p2p call checks its tensors: one on the shadow host, or on a device
  type other than the accelerator's, raises `DeviceDisciplineError` naming the call site, on every rank.

Only the project's own factory calls are marked: DeepSpeed's and torch's internals are trusted (they place
their tensors through the accelerator themselves). Limitation: `.to('cpu')` cannot be told from
`.to(accelerator_device)` on a CPU machine (both say 'cpu'), so it counts as a move to the accelerator.

Used by tests/device_guard_run.py (a `pretrain_looped.py` that installs the guard first).
"""
from __future__ import annotations

import os
import sys
import traceback
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROJECT = tuple(os.path.join(REPO, p) for p in ("megaloop" + os.sep, "tools" + os.sep, "pretrain_looped.py"))
_TORCH = os.path.dirname(torch.__file__) + os.sep


class DeviceDisciplineError(RuntimeError):
    pass


_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye, torch.from_numpy, torch.scalar_tensor}
_HOST = {}  # id(tensor) -> weakref (tensors compare elementwise, so no WeakSet)
violations = []


def _project_caller() -> bool:
    """Is the nearest frame outside torch (and this file) in the project's own code?"""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.startswith(_TORCH) or name == __file__):
            return name.startswith(_PROJECT)
        f = f.f_back
    return False


def _tensors(obj):
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def is_host(t: torch.Tensor) -> bool:
    ref = _HOST.get(id(t))
    return ref is not None and ref() is t


def _mark(t: torch.Tensor) -> None:
    key = id(t)
    _HOST[key] = weakref.ref(t, lambda _r, key=key: _HOST.pop(key, None))


def _unmark(t: torch.Tensor) -> None:
    if is_host(t):
        del _HOST[id(t)]


class _ShadowHost(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            if kwargs.get("device") is None and isinstance(out, torch.Tensor) and _project_caller():
                _mark(out)
            return out
        name = getattr(func, "__name__", "")
        if name == "cpu":
            for t in _tensors(out):
                _mark(t)
            return out
        if name == "to":
            moves = kwargs.get("device") is not None or any(
                isinstance(a, (str, torch.device)) or (isinstance(a, torch.Tensor) and not is_host(a))
                for a in args[1:])
            if moves:
                for t in _tensors(out):
                    _unmark(t)
                return out
        ins = _tensors((args, kwargs))
        if ins and any(is_host(t) for t in ins):
            big = [t for t in ins if t.dim() > 0]
            host = any(is_host(t) for t in big) if big else True
            if host:
                inputs = {id(t) for t in ins}
                for t in _tensors(out):
                    if id(t) not in inputs:  # in-place results keep their own mark
                        _mark(t)
        return out


def _check(op: str, args, kwargs):
    from deepspeed.accelerator import get_accelerator
    want = get_accelerator().device_name()
    for t in _tensors((args, kwargs)):
        bad = None
        if is_host(t):
            bad = "a host tensor (made without device=, or by .cpu())"
        elif t.device.type != want:
            bad = f"a tensor on {t.device}"
        if bad:
            site = "".join(traceback.format_stack(limit=8)[:-2])
            msg = (f"device discipline: torch.distributed.{op} was handed {bad}, not a tensor on the "
                   f"accelerator's device ({want}); NCCL would reject it. Call site:\n{site}")
            violations.append(msg)
            raise DeviceDisciplineError(msg)


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
                "all_to_all_single", "all_to_all")


def _wrap(mod, name):
    orig = getattr(mod, name, None)
    if orig is None or getattr(orig, "_device_guard", False):
        return

    def wrapped(*args, **kwargs):
        _check(name, args, kwargs)
        return orig(*args, **kwargs)

    wrapped._device_guard = True
    wrapped.__wrapped__ = orig
    setattr(mod, name, wrapped)


def _track_parameters() -> None:
    """nn.Parameter(t) is a new tensor object made in C: it inherits t's place (a model built on the host
    has its parameters on the host until it is moved)."""
    orig = torch.nn.Parameter.__new__
    if getattr(orig, "_device_guard", False):
        return

    def __new__(cls, data=None, requires_grad=True):
        p = orig(cls, data, requires_grad)
        if data is not None and is_host(data):
            _mark(p)
        return p

    __new__._device_guard = True
    torch.nn.Parameter.__new__ = __new__


def install() -> None:
    """Wrap the collectives and enter the shadow-host mode for the rest of the process."""
    import torch.distributed as tdist
    import torch.distributed.distributed_c10d as c10d
    for name in _COLLECTIVES:
        _wrap(tdist, name)
        _wrap(c10d, name)
    _track_parameters()
    _ShadowHost().__enter__()
