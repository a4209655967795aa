"""The lightning indexer's training loss (DeepSeek-V3.2): KL(main attention || softmax(I)).

The top-k selection passes no gradient to the indexer (sparse_attention.py), so DeepSeek trains it
with a separate loss on detached main-attention probabilities: `indexer_kl_loss` is the dense
reference, `indexer_kl_loss_from_probs` its sparse stage in O(T * topk), from the probabilities the
attention returns (what the model trains with), `dense_indexer_kl_from_probs` the dense warm-up stage
(train.stage: dsa_warmup) from the dense attention's probabilities.
"""
from typing import Optional

import torch

from megaloop.ops.dense_attention import _default_scale, _group_queries
from megaloop.ops.lightning_indexer import indexer_scores_at, lightning_indexer_scores

__all__ = ["dense_indexer_kl_from_probs", "indexer_kl_loss", "indexer_kl_loss_from_probs"]


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


def dense_indexer_kl_from_probs(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor,
                                target: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense warm-up stage: KL(target || softmax of I(t, .) over all causal keys), averaged over
    queries. target (B, T, T): the head-averaged dense attention probabilities (zero on future keys).
    O(T^2) memory (the warm-up is short and dense by definition). Gradients reach q_idx, k_idx, w only.
    doc_ids (B, T): packed documents, the keys of the query's own document only."""
    T = q_idx.shape[1]
    scores = lightning_indexer_scores(q_idx, k_idx, w).float()  # the KL in fp32 (scores may be bf16)
    allowed = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril().expand_as(scores)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return _kl_to_target(target.detach().float(), scores, allowed)
