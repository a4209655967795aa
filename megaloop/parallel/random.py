"""Model-parallel RNG: dropout that differs across TP ranks where it must, matches where it must, and
replays exactly when activation checkpointing recomputes.

Megatron keeps two streams: the *default* generator, identical on every TP rank (dropout on the
replicated residual stream, the Parcae/Huginn noise initial state: every TP rank must draw the same),
and a *model-parallel* stream, different on every TP rank, forked around regions that hold a shard
of the heads (attention-probability dropout inside sharded attention).

Megatron's tracker keeps the model-parallel stream as its own stateful generator and therefore needs
its own checkpoint function to rewind it on recompute. Here the stream is instead *derived* from the
default generator: `fork()` draws one 63-bit number from the CPU default generator (the same number
on every TP rank, because that generator is in step across them), mixes it with the TP rank and a
stream name into a seed, and runs the region with the accelerator's generator seeded from it; on exit
the accelerator's generator is put back. Consequences:
  * masks inside `fork()` differ across TP ranks, outside they agree (the default generator only
    ever advances identically on all TP ranks, by exactly one draw per fork);
  * `torch.utils.checkpoint` (either flavour, DeepSpeed's too) already saves and restores the CPU
    default generator around recomputation, so the recomputed `fork()` draws the same number and
    reproduces the same masks, with no tracker state to save;
  * no extra state to checkpoint when a run is saved and resumed: the default generators are all.
Device RNG goes through `deepspeed.accelerator.get_accelerator()`; with the CPU accelerator the
"device" generator is the CPU default generator itself.

The one requirement is Megatron's: the default generator must be seeded identically on all TP ranks
(`set_parallel_seed(seed, state)`), and `check_rng_in_step(state)` verifies it at start-up.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"  # differs across TP ranks (sharded regions)
DATA_PARALLEL_RNG = "data-parallel-rng"  # identical across TP ranks, differs across data-parallel ranks


def _accelerator():
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


def _mix(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class _DeviceRNG:
    """get/set/seed the generator that dropout on the model's device draws from."""

    def __init__(self):
        acc = _accelerator()
        self.acc = acc
        self.is_cpu = acc.device_name() == "cpu"

    def get_state(self):
        return torch.get_rng_state() if self.is_cpu else self.acc.get_rng_state()

    def set_state(self, state) -> None:
        if self.is_cpu:
            torch.set_rng_state(state)
        else:
            self.acc.set_rng_state(state)

    def seed(self, seed: int) -> None:
        if self.is_cpu:
            torch.default_generator.manual_seed(seed)
        else:
            self.acc.manual_seed(seed)


class RNGTracker:
    """`with tracker.fork(): ...` runs its body on this TP rank's model-parallel stream.

    tp_rank / dp_rank: where this process sits in the grid (see topology.ParallelState).
    Streams: MODEL_PARALLEL_RNG (keyed by TP rank: differs across TP ranks), DATA_PARALLEL_RNG (keyed
    by data-parallel rank only: identical across the TP ranks of a replica), or any name with
    `add(name, keyed_by_tp_rank)`.
    """

    def __init__(self, tp_rank: int = 0, dp_rank: int = 0, pp_rank: int = 0):
        self.tp_rank, self.dp_rank, self.pp_rank = tp_rank, dp_rank, pp_rank
        self.streams = {MODEL_PARALLEL_RNG: True, DATA_PARALLEL_RNG: False}
        self._device = None

    @classmethod
    def from_state(cls, state) -> "RNGTracker":
        return cls(state.tp_rank, state.dp_rank, state.pp_rank)

    def add(self, name: str, keyed_by_tp_rank: bool = True) -> None:
        if name in self.streams:
            raise ValueError(f"RNG stream {name!r} already exists")
        self.streams[name] = keyed_by_tp_rank

    @property
    def device(self) -> _DeviceRNG:
        if self._device is None:
            self._device = _DeviceRNG()
        return self._device

    def stream_seed(self, name: str, draw: int) -> int:
        if name not in self.streams:
            raise KeyError(f"unknown RNG stream {name!r}; known: {sorted(self.streams)}")
        tp_key = self.tp_rank if self.streams[name] else -1
        return _mix(name, draw, tp_key, self.dp_rank, self.pp_rank)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        # One draw from the CPU default generator: identical on all TP ranks, and replayed by
        # checkpoint recomputation because checkpoint restores that generator.
        draw = int(torch.randint(0, 2 ** 62, (1,)).item())
        dev = self.device
        saved = dev.get_state()
        dev.seed(self.stream_seed(name, draw))
        try:
            yield
        finally:
            dev.set_state(saved)

    def __deepcopy__(self, memo):
        return self


def set_parallel_seed(seed: int, state=None, *, offset_by_data_rank: bool = True) -> int:
    """Seed the default (CPU and accelerator) generators for training: identical on all TP ranks and
    pipeline stages of a replica, different per data-parallel replica unless disabled. Returns the seed.

    Identical across TP ranks is Megatron's rule (replicated computations such as dropout on the
    replicated stream and Huginn's noise start must agree; the model-parallel stream is RNGTracker's).
    Identical across pipeline stages makes a pipelined run draw what the one-stage run draws (stages run
    different layers, so they need no streams of their own). Never keyed by the global rank.

    Build (initialise) the model BEFORE calling this, with the plain `seed` on every rank, so every
    rank starts from the same full weights and cuts its own shard from them.
    """
    s = int(seed)
    if state is not None and offset_by_data_rank:
        s += 100003 * (state.dp_rank + 1)
    torch.manual_seed(s)
    acc = _accelerator()
    if acc.device_name() != "cpu":
        acc.manual_seed_all(s)
    return s


def rng_fingerprint() -> int:
    """A 63-bit digest of the default generators' states (CPU and accelerator)."""
    parts = [bytes(torch.get_rng_state().numpy())]
    acc = _accelerator()
    if acc.device_name() != "cpu":
        parts.append(bytes(acc.get_rng_state().cpu().numpy()))
    return _mix(*parts)


def check_rng_in_step(state_or_comm, what: str = "default RNG") -> None:
    """Raise if the default generators differ across the TP ranks (one tiny all-gather)."""
    from megaloop.parallel.comm import TPComm

    comm = TPComm.coerce(state_or_comm)
    if comm.size == 1:
        return
    from megaloop.parallel.device import on_accelerator
    fp = on_accelerator([rng_fingerprint()], dtype=torch.int64)
    every = comm.all_gather(fp, dim=0).tolist()
    if len(set(every)) != 1:
        raise RuntimeError(f"the {what} is not the same on the {comm.size} tensor-parallel ranks "
                           f"(fingerprints {every}); seed with set_parallel_seed(seed, state), which keys "
                           f"the seed by data-parallel rank, never by global rank")


