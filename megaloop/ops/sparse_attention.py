"""Sparse causal softmax attention: sliding window, and DeepSeek-style top-k sparse attention (DSA).

Layout: q (B, H, T, D); k, v (B, Hkv, T, D) with grouped-query attention (H a multiple of Hkv;
query head h uses kv head h // (H // Hkv), as in F.scaled_dot_product_attention(enable_gqa=True)).
KV heads are never materialised H/Hkv times: queries are viewed as (B, Hkv, group, T, D) instead.

- sliding_window_attention: query t sees keys s with t - window < s <= t. Computed in query blocks
  of size `window` against the current and previous key block, so memory is O(T * window).
- DSA (DeepSeek-V3.2): a light "lightning indexer" scores every causal (t, s) pair,
      I(t, s) = sum_j w(t, j) * ReLU(q_I(t, j) . k_I(s)),
  each query keeps its top-k keys (one selection shared by all heads) and attends to those only.
  The indexer is O(T^2) but cheap (few heads, small dim, no softmax); the attention is O(T * topk),
  computed in query blocks over gathered keys, recomputed in backward (activation checkpointing).
  The top-k selection is not differentiable: no gradient reaches the indexer through the main
  attention. DeepSeek trains the indexer with a separate loss, KL(main attention || softmax(I))
  on detached main-attention probabilities; `indexer_kl_loss` implements it.

The `*_dense` functions are plain masked O(T^2) versions: test references and documentation.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "causal_attention_dense",
    "indexer_kl_loss",
    "lightning_indexer_scores",
    "lightning_indexer_topk",
    "masked_attention_dense",
    "select_topk_keys",
    "sliding_window_attention",
    "sliding_window_attention_dense",
    "sparse_attention_from_indices",
    "topk_sparse_attention",
]


def _default_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _group_queries(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, Hkv, H // Hkv, T, D): query heads grouped by the kv head they read."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if H % Hkv != 0:
        raise ValueError(f"number of query heads ({H}) must be a multiple of kv heads ({Hkv})")
    return q.view(B, Hkv, H // Hkv, T, D)


# --------------------------------------------------------------------------------------------
# Dense references
# --------------------------------------------------------------------------------------------


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


def sliding_window_attention_dense(q, k, v, window: int, scale: Optional[float] = None) -> torch.Tensor:
    T = q.shape[2]
    t = torch.arange(T, device=q.device)
    offset = t[:, None] - t[None, :]                      # t - s
    return masked_attention_dense(q, k, v, (offset >= 0) & (offset < window), scale)


# --------------------------------------------------------------------------------------------
# Sliding window
# --------------------------------------------------------------------------------------------


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: Optional[float] = None
) -> torch.Tensor:
    """Causal attention where query t sees the `window` keys (t - window, t] (itself included).

    Queries are split into blocks of `window` positions; a block's keys all lie in the same or the
    previous key block, so each block does one (window x 2 window) score matrix: O(T * window) memory.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, H, T, D = q.shape
    if window >= T:  # the band covers the whole causal triangle
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

    scores = torch.einsum("bhgnid,bhnjd->bhgnij", qg, k_blocks) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhgnij,bhnjd->bhgnid", probs, v_blocks)
    return out.reshape(B, H, N * w, Dv)[:, :, :T]


# --------------------------------------------------------------------------------------------
# DeepSeek sparse attention: lightning indexer + top-k selection + gathered attention
# --------------------------------------------------------------------------------------------


def _indexer_scores_block(q_idx_block, k_idx, w_block, first_query: int) -> torch.Tensor:
    """Indexer scores for queries [first_query, first_query + block) against all keys, future
    keys set to -inf. Shapes: (B, blk, Hi, Di), (B, T, Di), (B, blk, Hi) -> (B, blk, T)."""
    dots = torch.einsum("btjd,bsd->btjs", q_idx_block, k_idx).relu()
    scores = torch.einsum("btjs,btj->bts", dots, w_block)
    t = torch.arange(first_query, first_query + q_idx_block.shape[1], device=k_idx.device)
    s = torch.arange(k_idx.shape[1], device=k_idx.device)
    return scores.masked_fill(s[None, :] > t[:, None], float("-inf"))


def lightning_indexer_scores(
    q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, query_block_size: int = 256
) -> torch.Tensor:
    """I(t, s) = sum_j w(t, j) ReLU(q_idx(t, j) . k_idx(s)) for s <= t, and -inf for s > t.

    q_idx: (B, T, Hi, Di) indexer queries (Hi indexer heads), k_idx: (B, T, Di) one shared indexer
    key per position, w: (B, T, Hi) per-query head weights. Returns (B, T, T).
    The result is O(T^2); the (B, blk, Hi, T) intermediate is bounded by computing it in query
    blocks. Use `lightning_indexer_topk` to never hold the full matrix.
    """
    T = q_idx.shape[1]
    blocks = [
        _indexer_scores_block(q_idx[:, t0:t0 + query_block_size], k_idx, w[:, t0:t0 + query_block_size], t0)
        for t0 in range(0, T, query_block_size)
    ]
    return torch.cat(blocks, dim=1)


def select_topk_keys(index_scores: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k causal keys per query from (B, T, T) scores.

    Returns indices (B, T, K) with K = min(topk, T) and a validity mask (B, T, K). Query t has only
    t + 1 causal keys: when that is fewer than K all of them are selected and the remaining slots
    point at future keys and are marked invalid (causality is enforced here, whatever the scores).
    """
    B, T, _ = index_scores.shape
    K = min(topk, T)
    t = torch.arange(T, device=index_scores.device)
    future = t[None, :] > t[:, None]
    scores = index_scores.detach().masked_fill(future, float("-inf"))
    # A stable sort, not topk: the indexer's ReLU makes exact ties (0.0) common, and topk breaks ties
    # differently for rows of different lengths, so a query's selection would depend on how many
    # tokens follow it (a cached decode step would then disagree with the full forward). Ties go to
    # the earlier key.
    indices = scores.sort(dim=-1, descending=True, stable=True).indices[..., :K]
    valid = indices <= t[None, :, None]
    return indices, valid


@torch.no_grad()
def lightning_indexer_topk(
    q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, topk: int, query_block_size: int = 256
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`select_topk_keys(lightning_indexer_scores(...), topk)` computed block by block, so peak
    memory is O(blk * T * Hi) rather than O(T^2). Returns (indices, valid), both (B, T, K).
    No autograd graph is kept: the selection is not differentiable anyway."""
    B, T = k_idx.shape[:2]
    K = min(topk, T)
    indices, valid = [], []
    for t0 in range(0, T, query_block_size):
        scores = _indexer_scores_block(q_idx[:, t0:t0 + query_block_size], k_idx, w[:, t0:t0 + query_block_size], t0)
        block_indices = scores.sort(dim=-1, descending=True, stable=True).indices[..., :K]  # see select_topk_keys
        t = torch.arange(t0, t0 + scores.shape[1], device=k_idx.device)
        indices.append(block_indices)
        valid.append(block_indices <= t[None, :, None])
    return torch.cat(indices, dim=1), torch.cat(valid, dim=1)


def _gather_keys(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x: (B, Hkv, T, D), indices: (B, Tq, K) -> x[b, h, indices[b, t, k]] as (B, Hkv, Tq, K, D).

    An index_select over flattened (batch, head, time) rows: its backward is an index_add into a
    (B Hkv T, D) buffer, so no (Tq, T)-sized gradient is ever formed. The result is contiguous
    with (B, Hkv, Tq) leading, ready for a batched matmul per query.
    """
    B, Hkv, T, D = x.shape
    Tq, K = indices.shape[1:]
    row_offsets = (torch.arange(B * Hkv, device=x.device) * T).view(B, Hkv, 1, 1)
    rows = (indices[:, None] + row_offsets).reshape(-1)
    return x.reshape(B * Hkv * T, D).index_select(0, rows).view(B, Hkv, Tq, K, D)


def _sparse_attention_block(q_block, k, v, indices, valid, scale: float) -> torch.Tensor:
    B, H, Tq, D = q_block.shape
    Hkv = k.shape[1]
    k_selected = _gather_keys(k, indices)                                    # (B, Hkv, Tq, K, D)
    v_selected = _gather_keys(v, indices)
    qg = q_block.reshape(B, Hkv, H // Hkv, Tq, D).transpose(2, 3)           # (B, Hkv, Tq, G, D)
    scores = (qg @ k_selected.transpose(-1, -2)) * scale                     # (B, Hkv, Tq, G, K)
    probs = scores.masked_fill(~valid[:, None, :, None, :], float("-inf")).softmax(dim=-1)
    out = probs @ v_selected                                                 # (B, Hkv, Tq, G, Dv)
    return out.transpose(2, 3).reshape(B, H, Tq, v.shape[-1])


def sparse_attention_from_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    scale: Optional[float] = None,
    query_block_size: int = 64,
    recompute: bool = True,
) -> torch.Tensor:
    """Each query t attends to the keys indices[b, t, :] where valid[b, t, :] (shared by all heads).

    Memory: the selected keys/values of a block of queries are gathered into
    (B, Hkv, blk, K, D) buffers, so the transient working set is O(blk * K * D) per kv head.
    With recompute=True (default) each block runs under activation checkpointing: autograd keeps
    only the inputs and the (B, T, K) selection, and the backward gathers again. Without it,
    the gathered keys/values of every block stay alive until backward: O(T * K * D) per kv head,
    K * D / T times a dense attention's saved scores.
    """
    scale = _default_scale(q, scale)
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"number of query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    T = q.shape[2]
    needs_graph = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    blocks = []
    for t0 in range(0, T, query_block_size):
        block_args = (q[:, :, t0:t0 + query_block_size], k, v,
                      indices[:, t0:t0 + query_block_size], valid[:, t0:t0 + query_block_size], scale)
        if recompute and needs_graph:
            blocks.append(checkpoint(_sparse_attention_block, *block_args, use_reentrant=False))
        else:
            blocks.append(_sparse_attention_block(*block_args))
    return torch.cat(blocks, dim=2)


def topk_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index_scores: torch.Tensor,
    topk: int,
    scale: Optional[float] = None,
    query_block_size: int = 64,
    recompute: bool = True,
) -> torch.Tensor:
    """DSA: each query attends to its top-k causal keys under index_scores (B, T, T), the selection
    shared by all heads. With topk >= T this is dense causal attention. No gradient flows to
    index_scores (see `indexer_kl_loss`)."""
    indices, valid = select_topk_keys(index_scores, topk)
    return sparse_attention_from_indices(q, k, v, indices, valid, scale, query_block_size, recompute)


def indexer_kl_loss(
    index_scores: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: Optional[float] = None,
    indices: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DeepSeek-V3.2's indexer training loss: mean over queries of KL(p_t || softmax(I(t, :))).

    p_t is the main attention distribution of query t summed over heads and renormalised (i.e. the
    head-average), computed from *detached* q, k: the loss trains only the indexer, and the main
    model never sees a gradient from it. Dense warm-up stage: indices=None, over all causal keys.
    Sparse stage: pass the selected (indices, valid) and both distributions are restricted to that
    set. index_scores: (B, T, T) from `lightning_indexer_scores` (future = -inf).
    Cost: O(H T^2) for the target, like the dense attention it imitates.
    """
    scale = _default_scale(q, scale)
    B, H, T, D = q.shape
    t = torch.arange(T, device=q.device)
    causal = (t[None, :] <= t[:, None]).expand(B, T, T)

    with torch.no_grad():
        qg = _group_queries(q.detach(), k)
        target_logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k.detach()) * scale
        target_logits = target_logits.reshape(B, H, T, T)
    if indices is not None:
        if valid is None:
            valid = indices <= t[None, :, None]
        target_logits = target_logits.gather(-1, indices[:, None].expand(B, H, T, indices.shape[-1]))
        index_scores = index_scores.gather(-1, indices)
        allowed = valid
    else:
        allowed = causal

    with torch.no_grad():
        target = target_logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(dim=1)
        log_target = target.clamp_min(torch.finfo(target.dtype).tiny).log()
    log_pred = index_scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    # 0 * log 0 = 0: only allowed keys contribute (elsewhere both sides are -inf / 0).
    kl_terms = torch.where(allowed, target * (log_target - log_pred.masked_fill(~allowed, 0.0)), 0.0)
    return kl_terms.sum(-1).mean()
