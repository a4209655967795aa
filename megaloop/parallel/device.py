"""Where collective tensors live: the accelerator's current device, never the host by default.

NCCL (and other device-side backends) only take tensors on the rank's own device; gloo takes host tensors
too, so a CPU run alone cannot tell `torch.tensor([flag])` from a correct one. Host-side values that a
collective needs (stop / NaN flags, scalars, stats vectors) go through `on_accelerator`, never an ad-hoc
`torch.tensor(...)` at the call site. tests/test_device_discipline.py checks every collective of a
training run against this rule on CPU.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch


def accelerator_device() -> torch.device:
    """This rank's accelerator device (`cuda:<local rank>` on GPUs, `cpu` with DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def on_accelerator(values: Union[float, Sequence[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Host values as a tensor on the accelerator's device, ready to hand to a collective."""
    return torch.tensor(values, dtype=dtype, device=accelerator_device())


def zeros_on_accelerator(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=accelerator_device())
