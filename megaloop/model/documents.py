"""Packed documents: Megatron-LM's reset_attention_mask / reset_position_ids (the data.* fields of the same
names), as the structure every mixer reads.

A training sample is a window of a token stream in which documents follow each other, each ended by the
end-of-document token (eod). Megatron's `get_ltor_masks_and_position_ids` is the reference: a document
starts at the token AFTER an eod, and the eod belongs to the document it ends. Here that structure is
one integer tensor per micro-batch,

    doc_ids[b, t] = number of eod tokens in tokens[b, :t]          (B, T), computed on the device by a cumsum

from which everything else is derived (vectorised, once per micro-batch, then reused by every layer and
every loop iteration): the position of each token in its document (RoPE restarts per document) and,
for softmax attention, the boolean mask "same document and causal" (B, 1, T, T) that SDPA takes. The
other mixers take the document ids themselves: sliding-window attention adds "same document" to its
band, DSA's indexer never scores (so never selects) a key of another document, Gated DeltaNet's short
convolution does not reach across a document start and its scan starts each document from a zero state.

The structure rides in the `rope` argument every layer and mixer already receives: `RopeCache(cos, sin,
docs)` instead of the plain (cos, sin) pair. A mixer asks `docs_of(rope)`; None means an unpacked sample.
Under pipeline parallelism the (B, T) `doc_ids` travel between stages as one more (integer) tensor of
the activation tuple and each stage derives the rest (megaloop/parallel/pipeline.py); under sequence
parallelism the mixers see the gathered sequence, so the structure is always the full (B, T) one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass(frozen=True)
class DocumentPacking:
    """What the model does with the document structure of its input tokens (set on LoopedLM.packing by
    the training set-up from data.reset_attention_mask / data.reset_position_ids and the tokenizer's eod)."""

    eod_id: int
    reset_attention_mask: bool = False  # attention (every mixer) does not cross a document start
    reset_position_ids: bool = False    # RoPE positions restart at 0 at each document start


class Documents(NamedTuple):
    ids: Optional[torch.Tensor]        # (B, T) document index within the row; None: mixers cross documents
    positions: Optional[torch.Tensor]  # (B, T) position within the document; None: 0..T-1
    attn_mask: Optional[torch.Tensor]  # (B, 1, T, T) bool: same document and key <= query (SDPA's mask)


class RopeCache(NamedTuple):
    """The `rope` argument of layers and mixers when documents are packed: (cos, sin) as before (per row
    (B, T, D/2) when positions restart per document), plus the document structure."""

    cos: torch.Tensor
    sin: torch.Tensor
    docs: Optional[Documents] = None


def docs_of(rope) -> Optional[Documents]:
    """The document structure carried by `rope`, or None (a plain (cos, sin) pair: one document per row)."""
    return rope.docs if isinstance(rope, RopeCache) else None


def doc_ids_of(rope) -> Optional[torch.Tensor]:
    """(B, T) document ids when attention must not cross documents, else None."""
    docs = docs_of(rope)
    return None if docs is None else docs.ids


def document_ids(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """(B, T) ids: the number of eod tokens before each position (the eod ends its own document)."""
    eod = (tokens == eod_id).to(torch.int64)
    return eod.cumsum(1) - eod


def positions_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token in its document: t minus the index where its document starts."""
    T = doc_ids.shape[1]
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return t - torch.where(start, t, torch.zeros_like(t)).cummax(dim=1).values


def same_document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: key s visible to query t iff s <= t and both are in the same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal


def packed_rope(packing: DocumentPacking, doc_ids: torch.Tensor, head_dim: int, theta: float) -> RopeCache:
    """The `rope` argument for a micro-batch with document ids `doc_ids` (B, T)."""
    from megaloop.model.layers import rope_cache, rope_for_positions  # (layers imports this module)
    T = doc_ids.shape[1]
    positions = positions_in_document(doc_ids) if packing.reset_position_ids else None
    if positions is None:
        cos, sin = rope_cache(T, head_dim, theta, doc_ids.device)
    else:
        cos, sin = rope_for_positions(positions, head_dim, theta)
    ids = mask = None
    if packing.reset_attention_mask:
        ids, mask = doc_ids, same_document_causal_mask(doc_ids)
    return RopeCache(cos, sin, Documents(ids, positions, mask))


def select_rows(rope, sel: Optional[torch.Tensor]):
    """`rope` for the batch rows `sel` (loop.granularity=sequence runs a loop on some rows only)."""
    docs = docs_of(rope)
    if docs is None or sel is None:
        return rope
    per_row = rope.cos.dim() == 3

    def pick(x):
        return None if x is None else x.index_select(0, sel)
    return RopeCache(pick(rope.cos) if per_row else rope.cos, pick(rope.sin) if per_row else rope.sin,
                     Documents(*(pick(x) for x in docs)))


def repeat_rows(rope, batch: int):
    """`rope` for a batch stacked n = batch / B times on the batch axis (the pipeline's per-loop outputs)."""
    docs = docs_of(rope)
    if docs is None:
        return rope
    rows = next(x for x in (docs.ids, docs.positions) if x is not None).shape[0]
    if rows == batch:
        return rope
    n = batch // rows

    def rep(x):
        return None if x is None else x.repeat(n, *([1] * (x.dim() - 1)))
    per_row = rope.cos.dim() == 3
    return RopeCache(rep(rope.cos) if per_row else rope.cos, rep(rope.sin) if per_row else rope.sin,
                     Documents(*(rep(x) for x in docs)))
