"""Sliding-window causal attention: query t sees keys s with t - window < s <= t.

Computed in query blocks of size `window` against the current and previous key block, so memory is
O(T * window). Layout and grouped-query heads as in dense_attention.py. With packed documents
(doc_ids (B, T), megaloop/model/documents.py) the band is also cut at document starts: a query sees
the keys of its own document only.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from megaloop.ops.dense_attention import _default_scale, _group_queries, masked_attention_dense

__all__ = ["sliding_window_attention", "sliding_window_attention_dense"]


def sliding_window_attention_dense(q, k, v, window: int, scale: Optional[float] = None,
                                   doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    T = q.shape[2]
    t = torch.arange(T, device=q.device)
    offset = t[:, None] - t[None, :]                      # t - s
    allowed = (offset >= 0) & (offset < window)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return masked_attention_dense(q, k, v, allowed, scale)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: Optional[float] = None,
    doc_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention where query t sees the `window` keys (t - window, t] (itself included), and with
    doc_ids (B, T) only those of its own document.

    Queries are split into blocks of `window` positions; a block's keys all lie in the same or the
    previous key block, so each block does one (window x 2 window) score matrix: O(T * window) memory.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, H, T, D = q.shape
    if window >= T:  # the band covers the whole causal triangle
        if doc_ids is not None:
            mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & torch.ones(
                T, T, dtype=torch.bool, device=q.device).tril()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=_default_scale(q, scale),
                                                  enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=_default_scale(q, scale), enable_gqa=True)
    scale = _default_scale(q, scale)
    Hkv, Dv = k.shape[1], v.shape[-1]
    w = window
    N = (T + w - 1) // w
    pad = N * w - T

    # Queries: pad the tail (outputs discarded). Keys/values: one extra zero block in front so
    # that query block n reads key blocks n-1 and n as the contiguous slice [n w, (n + 2) w).
    qg = F.pad(_group_queries(q, k), (0, 0, 0, pad)).reshape(B, Hkv, H // Hkv, N, w, D)
    k_blocks = F.pad(k, (0, 0, w, pad)).unfold(2, 2 * w, w).transpose(-1, -2)   # (B, Hkv, N, 2w, D)
    v_blocks = F.pad(v, (0, 0, w, pad)).unfold(2, 2 * w, w).transpose(-1, -2)   # (B, Hkv, N, 2w, Dv)

    # Local query i (absolute n w + i) and local key j (absolute (n - 1) w + j): the band
    # t - w < s <= t becomes i < j <= i + w, the same for every block. Block 0's first half is
    # the zero padding in front of the sequence.
    i = torch.arange(w, device=q.device)[:, None]
    j = torch.arange(2 * w, device=q.device)[None, :]
    allowed = ((j > i) & (j <= i + w)).expand(N, w, 2 * w).clone()
    allowed[0, :, :w] = False
    if doc_ids is not None:  # (B, N, w, 2w): the band within the query's own document
        q_docs = F.pad(doc_ids, (0, pad), value=-1).view(B, N, w)
        k_docs = F.pad(doc_ids, (w, pad), value=-1).unfold(1, 2 * w, w)             # (B, N, 2w)
        allowed = (allowed & (q_docs[..., :, None] == k_docs[..., None, :]))[:, None, None]

    scores = torch.einsum("bhgnid,bhnjd->bhgnij", qg, k_blocks) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhgnij,bhnjd->bhgnid", probs, v_blocks)
    return out.reshape(B, H, N * w, Dv)[:, :, :T]
