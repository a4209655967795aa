"""Tensor-parallel communication per training step and rank: the activation collectives of
megaloop/parallel/tensor_parallel.py (Megatron's f / g), loop-weighted.

Per micro-batch of B x T tokens, with a = B x T x d_model elements (act):
  every transformer layer run with gradients, per run:  forward 2 x a (g after wo and after w2),
                                                        backward 2 x a (f before wq/wk/wv and w1/w3)
  a looped layer runs R times forward, G times (loops carrying gradients) backward; FLT feeds the
  previous loop's state into every layer's wq (lt_ia: layer 0) and adds one a per such layer in
  backward from loop 1 on;
  the embedding (vocab-parallel, one all-reduce forward: a), the LM head (f: backward a), the
  vocab-parallel cross-entropy (forward 3 x B x T fp32: max, sum-exp, target logit).
These payload counts are what benchmarks/bench_tp_comm.py counts on real TP ranks (its `analytic`).
Bytes: forward collectives carry matmul outputs (2 bytes under bf16/fp16, 4 under fp32), backward
ones the gradients of the stream (4 under fp32 and bf16 autocast, 2 with bf16 / fp16 weights).
Under sequence parallelism each all-reduce of an activation becomes an all-gather plus a
reduce-scatter of the same tensor: the same bytes on the wire per rank for a ring,
2 (tp - 1) / tp x payload. A stage of a pipeline only communicates for the layers it holds.
"""
from __future__ import annotations

from typing import List

from megaloop.config import Config


def _elem(cfg: Config):
    t = cfg.train
    fwd = 4 if t.precision == "fp32" else 2
    bwd = 2 if t.precision == "fp16" or (t.precision == "bf16" and t.bf16_impl == "master_weights") else 4
    return fwd, bwd


def stage_tp_comm(cfg: Config, names: List[str], tp: int, loops_total: float, loops_grad: float,
                  tokens: int = None, elem=None) -> dict:
    """Payload bytes per micro-batch for one TP rank holding the pipeline layers `names`:
    {'forward', 'backward', 'total', 'wire', 'collectives'} (wire: bytes one rank sends, ring)."""
    if tp <= 1:
        return {"forward": 0.0, "backward": 0.0, "total": 0.0, "wire": 0.0, "collectives": 0.0}
    m = cfg.model
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len if tokens is None else tokens
    ef, eb = _elem(cfg) if elem is None else (elem, elem)
    a = tokens * m.d_model
    R, G = loops_total, loops_grad
    fwd = bwd = 0.0
    count = 0.0
    q_layers = {"flt": m.n_loop, "lt_ia": 1}.get(m.arch, 0)
    q_loops = G if G < R else max(G - 1, 0)  # loop 0 has no previous-loop query stream
    for n in names:
        if n in ("prelude", "coda"):
            fwd, bwd, count = fwd + 2 * a * ef, bwd + 2 * a * eb, count + 4
        elif n == "loop":
            fwd += 2 * a * ef * m.n_loop * R
            bwd += 2 * a * eb * m.n_loop * G + a * eb * q_layers * q_loops
            count += 2 * m.n_loop * (R + G)
        elif n == "embedding":
            fwd, count = fwd + a * eb, count + 1  # the embedding output has the weights' dtype
        elif n == "head":
            bwd += a * eb
            fwd += 3 * tokens * 4
            count += 3
    ring = 2 * (tp - 1) / tp
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "wire": (fwd + bwd) * ring, "collectives": count}
