"""The global gradient norm of a model split over TP ranks and pipeline stages, and clipping by it.

Every distinct gradient element is counted exactly once over the model-parallel group:
- sharded parameters (column / row / vocab): every rank holds a different shard -> counted everywhere;
- kv-replicated wk / wv (1 < n_kv_heads < tp): the `replicas` ranks sharing a kv head hold the same
  (summed) shard -> counted on the first rank of each group, tp_rank % replicas == 0;
- replicated parameters (identical on every TP rank after the TP grad hooks, `install_tp_grad_hooks`)
  -> counted on TP rank 0;
- the tied embedding held by the first and last pipeline stage -> counted on one stage (the caller
  says which parameters are such duplicates).
DeepSpeed de-duplicates with Megatron's rule instead (count if `tensor_model_parallel` or model-parallel
rank 0); `tag_for_deepspeed_norm` sets that attribute so both rules count the same elements.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch

from megaloop.parallel.device import zeros_on_accelerator
from megaloop.parallel.tensor_parallel import partition_of


def counts_toward_grad_norm(p: torch.Tensor, tp_rank: int) -> bool:
    part = partition_of(p)
    if not part.sharded:
        return tp_rank == 0
    return tp_rank % part.replicas == 0


def tag_for_deepspeed_norm(model: torch.nn.Module, tp_rank: int) -> None:
    """Megatron's `tensor_model_parallel` flag as DeepSpeed's grad-norm de-duplication needs it: True on
    the ranks that hold a shard nobody before them holds (for kv-replicated weights: the first rank of
    each replica group; rank 0 is counted by DeepSpeed anyway)."""
    for p in model.parameters():
        part = partition_of(p)
        if part.sharded:
            p.tensor_model_parallel = counts_toward_grad_norm(p, tp_rank)


def grad_norm_(params: Iterable[torch.nn.Parameter], clip: float, tp_rank: int, group=None,
               skip: Optional[Callable[[torch.nn.Parameter], bool]] = None) -> torch.Tensor:
    """Pre-clip global grad norm over `group` (the model-parallel group: TP ranks x pipeline stages), then
    scale the gradients by min(1, clip / norm) if clip > 0. All on the device, no host sync; a
    non-finite norm leaves the gradients alone. Returns the norm (a 0-dim float64 device tensor)."""
    import deepspeed.comm as dist
    params = [p for p in params if p.grad is not None]
    counted: List[torch.Tensor] = [p.grad.detach() for p in params
                                   if counts_toward_grad_norm(p, tp_rank) and not (skip and skip(p))]
    sq = zeros_on_accelerator((), dtype=torch.float64)
    if counted:
        sq = sq + torch.stack(torch._foreach_norm(counted)).double().pow(2).sum()
    if group is not None:
        dist.all_reduce(sq, group=group)
    norm = sq.sqrt()
    if clip > 0:
        coef = (clip / (norm + 1e-6)).clamp(max=1.0)
        coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
        grads = [p.grad.detach() for p in params]
        for dtype in {g.dtype for g in grads}:
            torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))
    return norm
