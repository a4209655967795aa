"""Sparse causal softmax attention: sliding window, and DeepSeek-style top-k sparse attention (DSA).

Layout: q (B, H, T, D); k, v (B, Hkv, T, D) with grouped-query attention (H a multiple of Hkv;
query head h uses kv head h // (H // Hkv), as in F.scaled_dot_product_attention(enable_gqa=True)).
KV heads are never materialised H/Hkv times: queries are viewed as (B, Hkv, group, T, D) instead.

- sliding_window_attention: query t sees keys s with t - window < s <= t. Computed in query blocks
  of size `window` against the current and previous key block, so memory is O(T * window).
- DSA (DeepSeek-V3.2): a light "lightning indexer" scores every causal (t, s) pair,
      I(t, s) = sum_j w(t, j) * ReLU(q_I(t, j) . k_I(s)),
  each query keeps its top-k keys (one selection shared by all heads) and attends to those only.
  The indexer is O(T^2) time but cheap (few heads, small dim, no softmax) and blockwise: blocks of
  queries score only their causal keys, and a staged top-k (a bound first, see `_topk_rows`)
  selects exactly the keys of a stable descending sort, so no (T, T) tensor is ever formed. The
  attention is O(T * topk) and flash-attention style (only a log-sum-exp per query is kept, backward
  recomputes): on CPU `_SampledSparseAttention` gets the scores as sampled dense-dense products
  (`torch.sparse.sampled_addmm` on the selection pattern) and every product with P or dS as fused
  gather + weighted sums (`F.embedding_bag`), the key-side gradients over the selection sorted by
  key, so nothing gathered is ever stored and nothing is scattered; elsewhere
  `_GatheredSparseAttention` gathers each query block's keys/values into a buffer.
  GPU: no third-party fused kernel is wired in. fla's `parallel_nsa` (the nearest, Triton) selects
  *blocks* of keys per kv head with its own layout and gating, not DeepSeek's token-level top-k;
  FlashMLA's sparse kernels are MLA/Hopper inference kernels. On CUDA the attention block runs
  through torch.compile instead (lazily, eager fallback); selection is plain torch there too.
  The top-k selection is not differentiable: no gradient reaches the indexer through the main
  attention. DeepSeek trains the indexer with a separate loss, KL(main attention || softmax(I))
  on detached main-attention probabilities; `indexer_kl_loss` implements it (dense reference) and
  `indexer_kl_loss_from_probs` its sparse stage in O(T * topk), from the probabilities the
  attention returns (what the model trains with).

The `*_dense` functions are plain masked O(T^2) versions: test references and documentation.
"""
import math
import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "causal_attention_dense",
    "indexer_kl_loss",
    "indexer_kl_loss_from_probs",
    "indexer_scores_at",
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
    """Indexer scores for queries [first_query, first_query + block) against the keys k_idx (the
    first k_idx.shape[1] positions), future keys set to -inf.
    Shapes: (B, blk, Hi, Di), (B, S, Di), (B, blk, Hi) -> (B, blk, S)."""
    dots = torch.einsum("btjd,bsd->btjs", q_idx_block, k_idx).relu_()
    scores = torch.einsum("btjs,btj->bts", dots, w_block)
    # Only keys past first_query can be in the future of a query of this block.
    t = torch.arange(first_query, first_query + q_idx_block.shape[1], device=k_idx.device)
    s = torch.arange(first_query, k_idx.shape[1], device=k_idx.device)
    scores[..., first_query:].masked_fill_(s[None, :] > t[:, None], float("-inf"))
    return scores


def lightning_indexer_scores(
    q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, query_block_size: int = 256
) -> torch.Tensor:
    """I(t, s) = sum_j w(t, j) ReLU(q_idx(t, j) . k_idx(s)) for s <= t, and -inf for s > t.

    q_idx: (B, T, Hi, Di) indexer queries (Hi indexer heads), k_idx: (B, T, Di) one shared indexer
    key per position, w: (B, T, Hi) per-query head weights. Returns (B, T, T): the dense reference
    (and the dense warm-up stage of `indexer_kl_loss`). `lightning_indexer_topk` selects keys
    without ever holding this matrix.
    """
    T = q_idx.shape[1]
    blocks = [
        _indexer_scores_block(q_idx[:, t0:t0 + query_block_size], k_idx, w[:, t0:t0 + query_block_size], t0)
        for t0 in range(0, T, query_block_size)
    ]
    return torch.cat(blocks, dim=1)


def select_topk_keys(index_scores: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k causal keys per query from (B, T, T) scores (the dense reference selection).

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


def _topk_earliest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (R, k), ascending, of the k largest entries of each row of x (R, S), ties broken
    towards the earlier position: exactly the first k of a stable descending sort, as a set.

    torch.topk finds the k-th largest value v; its own choice among entries equal to v is
    unspecified, so the set is rebuilt: every entry > v, then the earliest entries == v.
    (-0.0 == 0.0 here, as in the sort.)"""
    R, S = x.shape
    if k >= S:
        return torch.arange(S, device=x.device).expand(R, S)
    v = x.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = x > v
    tied = x == v
    need = k - above.sum(-1, keepdim=True)
    take = above | (tied & (tied.cumsum(-1) <= need))
    return take.nonzero()[:, 1].view(R, k)


def _topk_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """`_topk_earliest` for long rows, through a lower bound on each row's k-th largest key.

    The keys are split into c strided groups (x[i], x[i + n], x[i + 2n], ...) of n = S // c keys;
    each group's maximum is a distinct key, so the k-th largest group maximum is at most the k-th
    largest key: every key >= it is a candidate (at least k per row; about 1.4 k on random
    scores with c = S // 2k). The candidates are compacted in their order (padded with -inf at
    later positions, which never win a tie) and `_topk_earliest` picks the k winners among them:
    every key above the k-th largest and every key equal to it are candidates, so the set, ties to
    the earlier key included, is the one over the whole row. topk then scans about
    S / c + 1.4 k keys per row rather than S, and the strided maxima are a plain vectorised max."""
    R, S = x.shape
    c = S // (2 * k)
    if c < 4:
        return _topk_earliest(x, k)
    n = S // c
    maxima = x[:, :c * n].view(R, c, n).amax(1)                                  # (R, n)
    bound = maxima.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    flat = (x >= bound).view(-1).nonzero().view(-1)                              # row-major
    row, col = flat.div(S, rounding_mode="floor"), flat.remainder(S)
    counts = torch.bincount(row, minlength=R)
    rank = torch.arange(row.numel(), device=x.device) - (counts.cumsum(0) - counts)[row]
    width = int(counts.max())
    candidates = torch.full((R, width), S, dtype=torch.long, device=x.device)
    candidates[row, rank] = col
    values = torch.full((R, width), float("-inf"), dtype=x.dtype, device=x.device)
    values[row, rank] = x[row, col]
    return candidates.gather(-1, _topk_earliest(values, k))


@torch.no_grad()
def lightning_indexer_topk(
    q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, topk: int, query_block_size: int = 64
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The selection of `select_topk_keys(lightning_indexer_scores(...), topk)` without the (T, T)
    matrix: blocks of queries score only their causal keys [0, block end), and each row's top-k is
    found by `_topk_rows` (a lower bound from strided group maxima, then topk over the keys above it).
    Peak memory O(blk * T * Hi); no autograd graph (the selection is not differentiable).

    Same keys as the reference, tie-breaking included (the k largest scores, ties to the earlier
    key). Returns (indices, valid), both (B, T, K), K = min(topk, T); each row's indices ascending
    (which also makes the attention's gathers walk memory forwards). Slots past a query's t + 1
    causal keys hold future keys and are invalid.

    Precision: scores are computed in the dtype of the inputs (the model's compute dtype: bf16 under
    bf16 training, as DeepSeek runs its indexer in low precision), fp32 accumulation being whatever
    the matmul does. No separate down-cast is applied: on CPU bf16 matmuls are not faster, and the
    exported HF model (which scores with the same einsums in the same dtype) must select the very
    same keys. Ties, common in low precision, are broken deterministically towards the earlier key.
    """
    B, T = k_idx.shape[:2]
    K = min(topk, T)
    indices = torch.empty(B, T, K, dtype=torch.long, device=k_idx.device)
    for t0 in range(0, T, query_block_size):
        t1 = min(T, t0 + query_block_size)
        if t1 <= K:  # every key up to t1 - 1 fits: the first K positions, in order
            indices[:, t0:t1] = torch.arange(K, device=k_idx.device)
            continue
        scores = _indexer_scores_block(q_idx[:, t0:t1], k_idx[:, :t1], w[:, t0:t1], t0)  # (B, n, t1)
        indices[:, t0:t1] = _topk_rows(scores.reshape(B * (t1 - t0), t1), K).view(B, t1 - t0, K)
    valid = indices <= torch.arange(T, device=k_idx.device)[None, :, None]
    return indices, valid


def indexer_scores_at(
    q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, indices: torch.Tensor, query_block_size: int = 256
) -> torch.Tensor:
    """Indexer scores of the selected keys only: (B, T, K) with [b, t, j] = I(t, indices[b, t, j]),
    differentiable in q_idx, k_idx, w (no causal mask: invalid slots are the caller's to mask).
    Computed in query blocks under activation checkpointing, so neither a (T, T) matrix nor the
    gathered (T, K, Di) indexer keys are kept for backward: O(T K) memory."""
    B, T, Hi, Di = q_idx.shape
    needs_graph = torch.is_grad_enabled() and any(x.requires_grad for x in (q_idx, k_idx, w))

    def block(q_b, w_b, idx_b):
        k_sel = _gather_rows(k_idx, idx_b)                                     # (B, n, K, Di)
        dots = torch.einsum("btjd,btkd->btjk", q_b, k_sel).relu()
        return torch.einsum("btjk,btj->btk", dots, w_b)

    out = []
    for t0 in range(0, T, query_block_size):
        args = (q_idx[:, t0:t0 + query_block_size], w[:, t0:t0 + query_block_size], indices[:, t0:t0 + query_block_size])
        out.append(checkpoint(block, *args, use_reentrant=False) if needs_graph else block(*args))
    return torch.cat(out, dim=1)


def _gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x (B, T, C), indices (B, n, K) -> x[b, indices[b, t, k]] as (B, n, K, C)."""
    B, T, C = x.shape
    rows = (indices + (torch.arange(B, device=x.device) * T).view(B, 1, 1)).reshape(-1)
    return x.reshape(B * T, C).index_select(0, rows).view(*indices.shape, C)


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


def _finish_forward(ctx, saved, scale, out, probs_sum):
    """The sparse-attention Functions' common end of forward: keep what backward recomputes from, and
    return (out, head-summed probabilities or an empty placeholder)."""
    ctx.save_for_backward(*saved)
    ctx.scale = scale
    if probs_sum is None:
        return out, out.new_empty(0)
    ctx.mark_non_differentiable(probs_sum)
    return out, probs_sum


class _GatheredSparseAttention(torch.autograd.Function):
    """Top-k sparse attention with a hand-written, recomputing backward (flash-attention style).

    Keys and values live in one (B, Hkv, T, D + Dv) table, so each block of queries does a single
    gather of its selected rows per kv head, into a buffer reused across blocks (no allocation, no
    page faults in the loop); products use zero-padded queries so the gathered rows are read as
    they are. Forward keeps only the output and the per-(query, head) log-sum-exp;
    backward gathers again, rebuilds the probabilities from the log-sum-exp and scatters the key and
    value gradients with one index_add per block. Optionally returns the attention probabilities
    summed over heads (B, T, K), detached: the indexer's training target.
    """

    @staticmethod
    def forward(ctx, q, k, v, indices, valid, scale: float, block: int, want_probs: bool):
        B, H, T, D = q.shape
        Hkv, Dv, K = k.shape[1], v.shape[-1], indices.shape[-1]
        G, C = H // Hkv, D + Dv
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        table = torch.cat([k, v], dim=-1)                                        # (B, Hkv, T, C)
        # Queries zero-padded over the value columns, so that every product reads the gathered
        # (K, D + Dv) rows as they are (no strided k / v halves, no copies).
        qpad = q.new_zeros(B, Hkv, T, G, C)
        qpad[..., :D] = (q * scale).reshape(B, Hkv, G, T, D).transpose(2, 3)
        invalid = ~valid[:, :, None, :]                                          # (B, T, 1, K)
        out = q.new_empty(B, Hkv, T, G, Dv)
        lse = torch.empty(B, Hkv, T, G, 1, dtype=acc, device=q.device)
        probs_sum = torch.zeros(B, T, K, dtype=acc, device=q.device) if want_probs else None
        gathered = q.new_empty(block * K, C)
        # One (batch, kv head) at a time: its (T, D + Dv) table is all the gathers touch, which
        # keeps them in cache at long T.
        for b in range(B):
            for h in range(Hkv):
                tab = table[b, h]
                for t0 in range(0, T, block):
                    t1 = min(T, t0 + block)
                    rows = indices[b, t0:t1].reshape(-1)
                    g = torch.index_select(tab, 0, rows, out=gathered[:rows.numel()]).view(t1 - t0, K, C)
                    s = torch.matmul(qpad[b, h, t0:t1], g.transpose(-1, -2)).to(acc)   # (n, G, K)
                    s.masked_fill_(invalid[b, t0:t1], float("-inf"))
                    m = torch.logsumexp(s, dim=-1, keepdim=True)
                    lse[b, h, t0:t1] = m
                    p = s.sub_(m).exp_()
                    if want_probs:
                        probs_sum[b, t0:t1] += p.sum(dim=1)
                    out[b, h, t0:t1] = torch.matmul(p.to(q.dtype), g)[..., D:]
        out = out.transpose(2, 3).reshape(B, H, T, Dv)
        ctx.block = block
        return _finish_forward(ctx, (q, k, v, indices, valid, out, lse), scale, out, probs_sum if want_probs else None)

    @staticmethod
    def backward(ctx, dout, _dprobs):
        q, k, v, indices, valid, out, lse = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        B, H, T, D = q.shape
        Hkv, Dv, K = k.shape[1], v.shape[-1], indices.shape[-1]
        G, C = H // Hkv, D + Dv
        acc = lse.dtype
        table = torch.cat([k, v], dim=-1)
        # [[q, 0], [0, dout]] per (query, kv head): one product with the gathered [k | v] rows gives
        # the scores (first G rows) and dP (last G rows); its transpose against [dS; P] gives the
        # gathered [dk | dv] rows, contiguous, ready for a single index_add.
        qd = q.new_zeros(B, Hkv, T, 2 * G, C)
        qd[..., :G, :D] = (q * scale).reshape(B, Hkv, G, T, D).transpose(2, 3)
        qd[..., G:, D:] = dout.reshape(B, Hkv, G, T, Dv).transpose(2, 3)
        delta = (dout.to(acc) * out.to(acc)).sum(-1).reshape(B, Hkv, G, T).transpose(2, 3)[..., None]
        invalid = ~valid[:, :, None, :]
        dq = q.new_empty(B, Hkv, T, G, D)
        dtable = torch.zeros(B, Hkv, T, C, dtype=acc, device=q.device)
        gathered = q.new_empty(block * K, C)
        dgathered = q.new_empty(block * K, C)
        for b in range(B):
            for h in range(Hkv):
                tab, dtab = table[b, h], dtable[b, h]
                for t0 in range(0, T, block):
                    t1 = min(T, t0 + block)
                    n = t1 - t0
                    rows = indices[b, t0:t1].reshape(-1)
                    g = torch.index_select(tab, 0, rows, out=gathered[:rows.numel()]).view(n, K, C)
                    qdb = qd[b, h, t0:t1]
                    sdp = torch.matmul(qdb, g.transpose(-1, -2)).to(acc)                # (n, 2G, K)
                    s, dp = sdp[:, :G], sdp[:, G:]
                    s.masked_fill_(invalid[b, t0:t1], float("-inf"))
                    p = s.sub_(lse[b, h, t0:t1]).exp_()                                 # P, in place
                    dp.sub_(delta[b, h, t0:t1]).mul_(p)                                 # dS, in place
                    dsp = torch.cat([dp, p], dim=1).to(q.dtype)                         # [dS; P]
                    dq[b, h, t0:t1] = torch.matmul(dsp[:, :G], g)[..., :D]
                    dg = dgathered[:rows.numel()]
                    torch.matmul(dsp.transpose(-1, -2), qdb, out=dg.view(n, K, C))      # [dk | dv] rows
                    dtab.index_add_(0, rows, dg.to(acc))  # (fp32 accumulation of bf16/fp16 rows)
        dq = dq.transpose(2, 3).reshape(B, H, T, D) * scale
        return dq, dtable[..., :D].to(k.dtype), dtable[..., D:].to(v.dtype), None, None, None, None, None


def _selection_pattern(crow: torch.Tensor, cols: torch.Tensor, T: int, S: int, dtype: torch.dtype) -> torch.Tensor:
    """A (T, S) CSR matrix with the entries crow/cols (int32) and zero values: a sampling pattern
    for `_sampled_dots`, which writes its results into the pattern's own values."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), dtype=dtype, device=cols.device),
                                       size=(T, S), check_invariants=False)


def _sampled_dots(pattern: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[t, j] = a[t] . b[cols[t, j]] for the pattern's (T, K) columns, written in place into the
    pattern's values (no copy of the pattern); returns them as (T, K). The values must be finite
    on entry (the kernel computes 0 * old + dot)."""
    torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0, out=pattern)
    return pattern.values().view(a.shape[0], -1)


def _weighted_rows(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[i] = sum over bag i (rows[offsets[i]:offsets[i + 1]]) of weights * table[rows]: a gather
    and weighted sum in one pass (embedding_bag's fused kernel; nothing gathered is stored)."""
    return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights)


class _SampledSparseAttention(torch.autograd.Function):
    """Top-k sparse attention as sampled dense-dense products and weighted row sums (CPU).

    Per (batch, query head): scores = `torch.sparse.sampled_addmm` of q k^T on the selection
    pattern (a dot product per selected (query, key), gathered rows never stored), the masked
    softmax on the (T, K) scores, and out = P V through `F.embedding_bag` with per-sample weights
    P (a fused gather + weighted sum). Forward keeps only the output and a log-sum-exp per
    (query, head). Backward recomputes P, gets dP = dout v^T the same way, and
    dq = dS k, dk = dS^T q, dv = P^T dout as weighted row sums; the transposed ones run over the
    selection sorted by key (one integer sort per batch row, shared by all heads), so no scatter
    (index_add) is needed. Everything is computed in fp32 at least (bf16/fp16 inputs are upcast
    one (T, D) slice at a time). Same results as `_GatheredSparseAttention` up to rounding.
    """

    @staticmethod
    def forward(ctx, q, k, v, indices, valid, scale: float, want_probs: bool):
        B, H, T, D = q.shape
        Hkv, S, Dv, K = k.shape[1], k.shape[2], v.shape[-1], indices.shape[-1]
        G = H // Hkv
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        out = q.new_empty(B, H, T, Dv)
        lse = torch.empty(B, H, T, dtype=acc, device=q.device)
        probs_sum = torch.zeros(B, T, K, dtype=acc, device=q.device) if want_probs else None
        crow = torch.arange(0, T * K + 1, K, dtype=torch.int32, device=q.device)
        offsets = crow[:-1]
        for b in range(B):
            cols = indices[b].reshape(-1).to(torch.int32)
            pattern = _selection_pattern(crow, cols, T, S, acc)
            invalid = ~valid[b]
            for kv in range(Hkv):
                k_bh, v_bh = k[b, kv].to(acc).contiguous(), v[b, kv].to(acc).contiguous()
                for h in range(kv * G, (kv + 1) * G):
                    s = _sampled_dots(pattern, q[b, h].to(acc) * scale, k_bh)         # (T, K)
                    s.masked_fill_(invalid, float("-inf"))
                    m = torch.logsumexp(s, dim=-1, keepdim=True)
                    lse[b, h] = m[:, 0]
                    p = s.sub_(m).exp_()
                    if want_probs:
                        probs_sum[b] += p
                    out[b, h] = _weighted_rows(v_bh, cols, offsets, p.view(-1))
        return _finish_forward(ctx, (q, k, v, indices, valid, out, lse), scale, out, probs_sum if want_probs else None)

    @staticmethod
    def backward(ctx, dout, _dprobs):
        q, k, v, indices, valid, out, lse = ctx.saved_tensors
        scale = ctx.scale
        B, H, T, D = q.shape
        Hkv, S, Dv, K = k.shape[1], k.shape[2], v.shape[-1], indices.shape[-1]
        G = H // Hkv
        acc = lse.dtype
        delta = (dout.to(acc) * out.to(acc)).sum(-1)                                   # (B, H, T)
        dq = torch.empty(B, H, T, D, dtype=acc, device=q.device)
        dk = torch.zeros(B, Hkv, S, D, dtype=acc, device=q.device)
        dv = torch.zeros(B, Hkv, S, Dv, dtype=acc, device=q.device)
        crow = torch.arange(0, T * K + 1, K, dtype=torch.int32, device=q.device)
        offsets = crow[:-1]
        key_dtype = torch.int16 if S <= torch.iinfo(torch.int16).max else torch.int32
        for b in range(B):
            cols = indices[b].reshape(-1).to(torch.int32)
            # Two value buffers on one structure: P and dP/dS live side by side.
            pattern_p = _selection_pattern(crow, cols, T, S, acc)
            pattern_ds = _selection_pattern(crow, cols, T, S, acc)
            invalid = ~valid[b]
            # The selection by key: order lists the (query, slot) entries key by key (queries
            # ascending within a key); bag s of the transposed products holds key s's queries.
            order = cols.to(key_dtype).sort(stable=True).indices
            queries_by_key = order.to(torch.int32).div_(K, rounding_mode="floor")
            counts = torch.bincount(cols, minlength=S)
            key_offsets = (counts.cumsum(0) - counts).to(torch.int32)
            for kv in range(Hkv):
                k_bh, v_bh = k[b, kv].to(acc).contiguous(), v[b, kv].to(acc).contiguous()
                for h in range(kv * G, (kv + 1) * G):
                    qs = q[b, h].to(acc) * scale
                    do = dout[b, h].to(acc).contiguous()
                    s = _sampled_dots(pattern_p, qs, k_bh)
                    s.masked_fill_(invalid, float("-inf"))
                    p = s.sub_(lse[b, h, :, None]).exp_()                              # P
                    ds = _sampled_dots(pattern_ds, do, v_bh).sub_(delta[b, h, :, None]).mul_(p)  # dS
                    dq[b, h] = _weighted_rows(k_bh, cols, offsets, ds.view(-1))
                    dk[b, kv] += _weighted_rows(qs, queries_by_key, key_offsets, ds.view(-1).index_select(0, order))
                    dv[b, kv] += _weighted_rows(do, queries_by_key, key_offsets, p.view(-1).index_select(0, order))
        dq = dq.mul_(scale).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _use_fused_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda and os.environ.get("MEGALOOP_DSA_COMPILE", "1") != "0"


_compiled_block = None  # None: not built yet; False: torch.compile unavailable or failed


def _cuda_sparse_attention_block(*args) -> torch.Tensor:
    """`_sparse_attention_block` through torch.compile for CUDA tensors (fuses the gather, the
    masked softmax and the products), built lazily on first CUDA use; eager if compiling fails."""
    global _compiled_block
    if _compiled_block is None:
        try:
            _compiled_block = torch.compile(_sparse_attention_block, dynamic=True)
        except Exception:  # pragma: no cover - no compiler backend
            _compiled_block = False
    if _compiled_block is not False:
        try:
            return _compiled_block(*args)
        except Exception as err:  # pragma: no cover - GPU only
            import warnings
            warnings.warn(f"torch.compile of the DSA attention block failed, running eagerly: {err}")
            _compiled_block = False
    return _sparse_attention_block(*args)


def sparse_attention_from_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    scale: Optional[float] = None,
    query_block_size: Optional[int] = None,
    recompute: bool = True,
    return_probs: bool = False,
):
    """Each query t attends to the keys indices[b, t, :] where valid[b, t, :] (shared by all heads).

    recompute=True (default): a flash-attention style kernel, autograd keeping only the output and
    a log-sum-exp per (query, head). On CPU `_SampledSparseAttention` (sampled products and
    embedding_bag sums, see its docstring; query_block_size is unused). Elsewhere
    `_GatheredSparseAttention`: blocks of `query_block_size` queries (default 64) gather their
    keys and values together, one (batch, kv head) at a time; backward gathers again and
    scatters with index_add. On CUDA, unless MEGALOOP_DSA_COMPILE=0
    or return_probs, the blocks instead run a torch.compile'd `_sparse_attention_block` under
    activation checkpointing (the compiler fuses the gather into the products; lazily built, eager
    if compiling fails). No fused third-party kernel is used (see the module docstring).
    recompute=False: plain autograd through the per-block gathers (reference; keeps the gathered
    keys/values of every block until backward: O(T K D) per kv head).

    return_probs=True also returns the attention probabilities over the selected keys summed over
    heads, (B, T, K), detached (the target of `indexer_kl_loss_from_probs`; zero on invalid slots).
    """
    scale = _default_scale(q, scale)
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"number of query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    T = q.shape[2]
    needs_graph = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if recompute and q.device.type == "cpu":
        out, probs = _SampledSparseAttention.apply(q, k, v, indices, valid, scale, return_probs)
        return (out, probs) if return_probs else out
    if recompute and not (_use_fused_cuda(q) and not return_probs):
        block = query_block_size or 64
        out, probs = _GatheredSparseAttention.apply(q, k, v, indices, valid, scale, block, return_probs)
        return (out, probs) if return_probs else out
    block_fn = _cuda_sparse_attention_block if recompute and _use_fused_cuda(q) else _sparse_attention_block
    query_block_size = query_block_size or 64
    blocks = []
    for t0 in range(0, T, query_block_size):
        block_args = (q[:, :, t0:t0 + query_block_size], k, v,
                      indices[:, t0:t0 + query_block_size], valid[:, t0:t0 + query_block_size], scale)
        if recompute and needs_graph:
            blocks.append(checkpoint(block_fn, *block_args, use_reentrant=False))
        else:
            blocks.append(block_fn(*block_args))
    out = torch.cat(blocks, dim=2)
    if return_probs:
        raise ValueError("return_probs needs recompute=True")
    return out


def topk_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index_scores: torch.Tensor,
    topk: int,
    scale: Optional[float] = None,
    query_block_size: Optional[int] = None,
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
    Cost: O(H T^2) time and memory: the dense reference. The model trains with
    `indexer_kl_loss_from_probs`, the sparse stage in O(T K) (the dense warm-up stage has no
    blockwise version here: the model never runs it).
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
    return _kl_to_target(target, index_scores, allowed)


def _kl_to_target(target: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """mean over rows of sum_j target * (log target - log_softmax(scores)) over the allowed slots."""
    with torch.no_grad():
        log_target = target.clamp_min(torch.finfo(target.dtype).tiny).log()
    log_pred = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    # 0 * log 0 = 0: only allowed keys contribute (elsewhere both sides are -inf / 0).
    kl_terms = torch.where(allowed, target * (log_target - log_pred.masked_fill(~allowed, 0.0)), 0.0)
    return kl_terms.sum(-1).mean()


def indexer_kl_loss_from_probs(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """The sparse stage of `indexer_kl_loss` in O(T K) memory: KL(target || softmax over the
    selected keys of I(t, .)), averaged over queries.

    target (B, T, K): the head-averaged main attention probabilities over the selected keys, e.g.
    `sparse_attention_from_indices(..., return_probs=True)[1] / H` (under tensor parallelism, summed
    over all ranks' heads first): the attention already computed them, so no (H, T, T) logits are
    formed. Gradients reach q_idx, k_idx, w only (through `indexer_scores_at`)."""
    scores = indexer_scores_at(q_idx, k_idx, w, indices)
    return _kl_to_target(target.detach().to(scores.dtype), scores, valid)
