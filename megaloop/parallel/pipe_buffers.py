"""Receive buffers of DeepSpeed's pipeline engine that keep their dtype.

DeepSpeed 0.19's PipelineEngine keeps ONE cache of receive buffers, indexed by position in the tuple
(`_allocate_or_extend_buffers(idx, shape, dtype)`), shared by the activations a stage receives from the
previous stage and the gradients it receives from the next one; a cached buffer is reused whenever it
is large enough, whatever its dtype. A looped stage in the middle of the pipeline (PP >= 3) receives
(e, loops) - loops a long tensor [R, R_grad] at position 1 - and, with Ouro's exit gate, receives the
gradients of (stacked per-loop outputs, exit probabilities) - a float tensor at position 1. After the
first backward the position-1 buffer is the float32 exit-probability gradient, so the next micro-batch's
loop counts (2 x int64 = 16 bytes) are received into a float32 view of 2 elements (8 bytes): gloo
aborts with "Received data size doesn't match expected size. 16 vs 8" (NCCL would silently mis-read).

`key_receive_buffers_by_dtype(engine)` replaces that cache, on this engine instance only, with one keyed
by (position, dtype): same reuse-and-extend rule, never a buffer of the wrong dtype. What is sent, and
every layout that worked before, is unchanged (a buffer of the right dtype is reused exactly as before).
"""
from __future__ import annotations

import math

import torch


class PipelineBufferError(RuntimeError):
    """The DeepSpeed pipeline engine no longer has the buffer cache this module replaces."""


def key_receive_buffers_by_dtype(engine) -> None:
    """Make `engine` (a deepspeed PipelineEngine) keep one receive buffer per (position, dtype)."""
    if not hasattr(engine, "_allocate_or_extend_buffers") or not hasattr(engine, "_grad_layer_buf"):
        raise PipelineBufferError(
            f"DeepSpeed {_ds_version()}'s pipeline engine has no _allocate_or_extend_buffers / _grad_layer_buf; "
            f"megaloop.parallel.pipe_buffers was written for DeepSpeed 0.19 and needs updating")
    cache = {}

    def allocate_or_extend(idx, shape, dtype):
        numel = math.prod(shape)
        buf = cache.get((idx, dtype))
        if buf is None or buf.numel() < numel:
            buf = cache[(idx, dtype)] = torch.zeros(shape, dtype=dtype, device=engine.device)
            return buf
        return buf.flatten()[:numel].view(shape)

    engine._allocate_or_extend_buffers = allocate_or_extend


def _ds_version() -> str:
    try:
        import deepspeed
        return deepspeed.__version__
    except Exception:  # noqa: BLE001
        return "?"
