"""DeepSeek sparse attention's (DSA, DeepSeek-V3.2) lightning indexer and its exact top-k selection.

The indexer is a light scorer of every causal (t, s) pair,
    I(t, s) = sum_j w(t, j) * ReLU(q_I(t, j) . k_I(s)),
and each query keeps its top-k keys (one selection shared by all attention heads; the attention
itself is in sparse_attention.py). The kernels here take q_I, k_I and w as given: DeepSeek-V3.2's
RoPE on part of q_I / k_I, LayerNorm on k_I and score scale H_I^-1/2 * d_I^-1/2 (folded into w, exact
since ReLU is positively homogeneous) are applied by the module (`DeepSeekSparseAttention.index_inputs`). Scoring is O(T^2) time but cheap (few heads, small dim, no softmax)
and blockwise: blocks of queries score only their causal keys, and a staged top-k (a bound first, see
`_topk_rows`) selects exactly the keys of a stable descending sort, so no (T, T) tensor is ever formed.
The selection is not differentiable; `indexer_scores_at` re-scores the selected keys with gradients,
for the indexer's own loss (indexer_loss.py).

`lightning_indexer_scores` and `select_topk_keys` are the dense (T, T) reference.
"""
from typing import Tuple

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["indexer_scores_at", "lightning_indexer_scores", "lightning_indexer_topk", "select_topk_keys"]


def _indexer_scores_block(q_idx_block, k_idx, w_block, first_query: int, doc_ids=None) -> torch.Tensor:
    """Indexer scores for queries [first_query, first_query + block) against the keys k_idx (the
    first k_idx.shape[1] positions), future keys set to -inf, and with doc_ids (B, T) the keys of
    another document too (packed documents).
    Shapes: (B, blk, Hi, Di), (B, S, Di), (B, blk, Hi) -> (B, blk, S)."""
    dots = torch.einsum("btjd,bsd->btjs", q_idx_block, k_idx).relu_()
    scores = torch.einsum("btjs,btj->bts", dots, w_block)
    # Only keys past first_query can be in the future of a query of this block.
    t = torch.arange(first_query, first_query + q_idx_block.shape[1], device=k_idx.device)
    s = torch.arange(first_query, k_idx.shape[1], device=k_idx.device)
    scores[..., first_query:].masked_fill_(s[None, :] > t[:, None], float("-inf"))
    if doc_ids is not None:
        q_docs = doc_ids[:, first_query:first_query + q_idx_block.shape[1]]
        scores.masked_fill_(q_docs[:, :, None] != doc_ids[:, None, :k_idx.shape[1]], float("-inf"))
    return scores


def _valid_slots(indices: torch.Tensor, doc_ids=None) -> torch.Tensor:
    """(B, T, K): the selected key is causal (and, with doc_ids, of the query's own document)."""
    T = indices.shape[1]
    valid = indices <= torch.arange(T, device=indices.device)[None, :, None]
    if doc_ids is not None:
        B, _, K = indices.shape
        key_docs = doc_ids.gather(1, indices.reshape(B, T * K)).view(B, T, K)
        valid = valid & (key_docs == doc_ids[:, :, None])
    return valid


def lightning_indexer_scores(
    q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, query_block_size: int = 256, doc_ids=None
) -> torch.Tensor:
    """I(t, s) = sum_j w(t, j) ReLU(q_idx(t, j) . k_idx(s)) for s <= t, and -inf for s > t.

    q_idx: (B, T, Hi, Di) indexer queries (Hi indexer heads), k_idx: (B, T, Di) one shared indexer
    key per position, w: (B, T, Hi) per-query head weights. Returns (B, T, T): the dense reference
    (and the dense warm-up stage of `indexer_kl_loss`). `lightning_indexer_topk` selects keys
    without ever holding this matrix.
    """
    T = q_idx.shape[1]
    blocks = [
        _indexer_scores_block(q_idx[:, t0:t0 + query_block_size], k_idx, w[:, t0:t0 + query_block_size], t0,
                              doc_ids)
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
    q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, topk: int, query_block_size: int = 64,
    doc_ids=None,
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

    doc_ids (B, T): packed documents; a key of another document scores -inf, so a query selects among
    its own document's keys exactly what it selects with that document alone (ties go to the earlier
    key either way), and slots beyond them are invalid.
    """
    B, T = k_idx.shape[:2]
    K = min(topk, T)
    indices = torch.empty(B, T, K, dtype=torch.long, device=k_idx.device)
    for t0 in range(0, T, query_block_size):
        t1 = min(T, t0 + query_block_size)
        if t1 <= K:  # every key up to t1 - 1 fits: the first K positions, in order
            indices[:, t0:t1] = torch.arange(K, device=k_idx.device)
            continue
        scores = _indexer_scores_block(q_idx[:, t0:t1], k_idx[:, :t1], w[:, t0:t1], t0, doc_ids)  # (B, n, t1)
        indices[:, t0:t1] = _topk_rows(scores.reshape(B * (t1 - t0), t1), K).view(B, t1 - t0, K)
    return indices, _valid_slots(indices, doc_ids)


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
