"""Checks of the numbers the tools take on their command line, shared so each tool refuses the same way (one
UsageError line naming the flag) before it reads a model or builds anything.

Loop counts have a stated bound: each loop is one more pass of the looped block, so `--loops 1000000000`
would not finish (and the planner would model it). DEFAULT_MAX_LOOPS is far above any trained R megaloop's
configs use; `--max-loops N` raises it on purpose.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from megaloop.errors import UsageError

DEFAULT_MAX_LOOPS = 256


def add_max_loops_flag(parser) -> None:
    parser.add_argument("--max-loops", type=int, default=DEFAULT_MAX_LOOPS,
                        help=f"refuse a loop count above this (default {DEFAULT_MAX_LOOPS}; raise it on purpose)")


def check_loops(flag: str, loops: Iterable[float], max_loops: int) -> None:
    """Every loop count in `loops` (given by `flag`) must be at most max_loops."""
    if max_loops < 1:
        raise UsageError(f"--max-loops {max_loops}: must be at least 1")
    high = max(loops, default=None)
    if high is not None and high > max_loops:
        raise UsageError(f"{flag}: {high:g} loops is above --max-loops {max_loops} (each loop is one more pass of "
                         f"the looped block); use fewer, or raise --max-loops on purpose")


def check_temperature(temperature: float) -> None:
    """0 is greedy decoding; a negative temperature would sample the least likely tokens."""
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"--temperature {temperature}: must be a finite number >= 0 (0 decodes greedily)")


def check_finite(flag: str, value: Optional[float], low: float = None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or (low is not None and value < low):
        raise UsageError(f"{flag} {value}: must be a finite number" + (f" >= {low:g}" if low is not None else ""))


def check_seq_len(seq_len: Optional[int], max_seq_len: int, model) -> int:
    """The evaluation window: --seq-len (default: the model's max_seq_len), refused above max_seq_len (positions
    the model never saw, and windows it cannot take)."""
    if seq_len is None:
        return max_seq_len
    if seq_len < 1:
        raise UsageError(f"--seq-len {seq_len}: must be at least 1")
    if seq_len > max_seq_len:
        raise UsageError(f"--seq-len {seq_len}: {model} takes at most {max_seq_len} tokens (model.max_seq_len); "
                         f"give --seq-len {max_seq_len} or less")
    return seq_len
