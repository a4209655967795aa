"""Bytes per rank of weights, gradients and optimizer state, by precision recipe and ZeRO stage.

Per parameter element held by a (stage, TP rank), before ZeRO partitioning:

  recipe                              weights  grads  fp32 master  fp32 grad accum  AdamW (m, v)
  fp32                                   4       4         -              -             8
  bf16, train.bf16_impl=autocast         4       4         -              -             8   (fp32 weights, bf16 matmuls)
  bf16, train.bf16_impl=master_weights   2       2         4              4             8
  fp16                                   2       2         4              -             8

ZeRO over the DP group (dp = world / (tp x pp)); sharded bytes are ceil(elements / dp) x bytes:
  stage 0: nothing sharded (DeepSpeed's bf16 engine at ZeRO 0 is its BF16_Optimizer, which already
           shards the fp32 master copy and the AdamW moments over DP: counted that way);
  stage 1: + the fp32 master copy and the AdamW moments;
  stage 2: + the gradients (and the fp32 gradient accumulation buffer);
  stage 3: + the weights.
train.optimizer=muon: the Muon matrices hold one fp32 momentum (4 bytes) instead of AdamW's two moments.
Not counted: DeepSpeed's communication buckets, allocator fragmentation, CUDA context, activations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

BYTES = {  # recipe -> (weights, grads, master, grad_accum, optimizer)
    "fp32": (4, 4, 0, 0, 8),
    "bf16_autocast": (4, 4, 0, 0, 8),
    "bf16_master_weights": (2, 2, 4, 4, 8),
    "fp16": (2, 2, 4, 0, 8),
}


def recipe(precision: str, bf16_impl: str = "autocast") -> str:
    if precision == "bf16":
        return f"bf16_{bf16_impl}"
    return precision


@dataclass
class MemoryBytes:
    weights: int
    grads: int
    master: int
    grad_accum: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.master + self.grad_accum + self.optimizer

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _shard(n: int, dp: int) -> int:
    return -(-n // dp)


def state_bytes(params: int, precision: str = "fp32", bf16_impl: str = "autocast", zero_stage: int = 0,
                dp: int = 1, muon_params: int = 0) -> MemoryBytes:
    """Bytes one rank holds for `params` elements (its stage's TP shard) under the recipe and ZeRO;
    `muon_params` of them on Muon (one momentum, half of AdamW's state)."""
    key = recipe(precision, bf16_impl)
    if key not in BYTES:
        raise ValueError(f"unknown precision recipe {key!r} (known: {', '.join(BYTES)})")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    w, g, m, a, o = BYTES[key]
    opt_sharded = zero_stage >= 1 or key == "bf16_master_weights"
    n_opt = _shard(params, dp) if opt_sharded else params
    n_grad = _shard(params, dp) if zero_stage >= 2 else params
    n_w = _shard(params, dp) if zero_stage >= 3 else params
    n_muon = _shard(muon_params, dp) if opt_sharded else muon_params
    return MemoryBytes(weights=w * n_w, grads=g * n_grad, master=m * n_opt, grad_accum=a * n_grad,
                       optimizer=o * n_opt - (o // 2) * n_muon)
