"""Masked softmax attention: the layout the sparse kernels share, and the dense O(T^2) references.

Layout: q (B, H, T, D); k, v (B, Hkv, T, D) with grouped-query attention (H a multiple of Hkv;
query head h uses kv head h // (H // Hkv), as in F.scaled_dot_product_attention(enable_gqa=True)).
KV heads are never materialised H/Hkv times: queries are viewed as (B, Hkv, group, T, D) instead.

The `*_dense` functions are plain masked versions: test references and documentation for
sliding_window.py and sparse_attention.py.
"""
import math
from typing import Optional

import torch

__all__ = ["causal_attention_dense", "masked_attention_dense"]


def _default_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _group_queries(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, Hkv, H // Hkv, T, D): query heads grouped by the kv head they read."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if H % Hkv != 0:
        raise ValueError(f"number of query heads ({H}) must be a multiple of kv heads ({Hkv})")
    return q.view(B, Hkv, H // Hkv, T, D)


def masked_attention_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """Softmax attention restricted to allowed[..., t, s] (broadcastable to (B, T, T)).
    Every query must be allowed at least one key."""
    scale = _default_scale(q, scale)
    B, H, T, D = q.shape
    qg = _group_queries(q, k)
    scores = torch.einsum("bhgtd,bhsd->bhgts", qg, k) * scale
    allowed = allowed.expand(B, T, T)[:, None, None]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhgts,bhsd->bhgtd", probs, v).reshape(B, H, T, v.shape[-1])


def causal_attention_dense(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return masked_attention_dense(q, k, v, causal, scale)
