"""The numbers gathered on logging steps: per-loop diagnostics from the stage holding the looped block and
every rank's memory, packed into one float64 vector on the accelerator and summed over the world (one
all-reduce, one host read)."""
from __future__ import annotations

import torch

from megaloop.parallel.device import zeros_on_accelerator
from megaloop.training.run_logging import memory_bytes

DIAG_KEYS = ("residual_norm", "state_norm", "state_delta", "relative_residual")  # per loop


def gather_stats(diag, max_loops: int, rank: int, world: int, reports_diag: bool) -> dict:
    """diag: the looped block's diagnostics (dict of per-loop tensors) or None; reports_diag: this rank is
    the one (DP 0, TP 0, holding the block) whose diagnostics are reported. Collective over the world.
    Returns {"memory": [bytes per rank], "diag": {key: [per loop]}?, "injection_spectral_norm": float?}."""
    import deepspeed.comm as dist
    K = max_loops
    # [n loops | K per key | has injection_spectral_norm, its value | memory per rank]
    sn = 1 + len(DIAG_KEYS) * K
    mem = sn + 2
    vec = zeros_on_accelerator(mem + world, dtype=torch.float64)
    if diag is not None and reports_diag:
        n = int(diag["residual_norm"].numel())
        vec[0] = n
        for i, k in enumerate(DIAG_KEYS):
            vec[1 + i * K: 1 + i * K + min(n, K)] = diag[k][:K].double()
        if "injection_spectral_norm" in diag:  # Parcae: one number (max |A_bar|), shape (1,)
            vec[sn] = 1.0
            vec[sn + 1] = diag["injection_spectral_norm"].reshape(-1)[0].double()
    vec[mem + rank] = memory_bytes()
    dist.all_reduce(vec)
    vec = vec.cpu()  # (the one host read)
    n = int(vec[0])
    out = {"memory": vec[mem:].tolist()}
    if n:
        out["diag"] = {k: vec[1 + i * K: 1 + i * K + min(n, K)].tolist() for i, k in enumerate(DIAG_KEYS)}
    if vec[sn] > 0:
        out["injection_spectral_norm"] = float(vec[sn + 1])
    return out
