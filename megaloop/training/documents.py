"""Packed documents in training (data.reset_attention_mask / reset_position_ids / eod_mask_loss).

`document_packing(cfg)` turns the data.* flags and the tokenizer's end-of-document id into the model's
setting (`LoopedLM.packing`, set before tensor / pipeline parallelism split the model, so every stage
knows it); the model then derives the document structure from each micro-batch's tokens on the device
(megaloop/model/documents.py). `mask_eod_labels` is Megatron's eod_mask_loss: the label of every
position whose input token is the eod (the next document's first token, which the eod's document
cannot predict) is ignored; applied where the batches are made (megaloop/training/data.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from megaloop.config import Config
from megaloop.model.documents import DocumentPacking


@functools.lru_cache(maxsize=8)
def _eod_id(tokenizer_type: str, tokenizer_model: Optional[str], tokenizer_eod: Optional[str]) -> int:
    from megaloop.data import build_tokenizer
    return int(build_tokenizer(tokenizer_type, tokenizer_model, eod_token=tokenizer_eod).eod_id)


def eod_id(cfg: Config) -> int:
    """The end-of-document id of the run's tokenizer (data.tokenizer_type / tokenizer_model / tokenizer_eod)."""
    d = cfg.data
    return _eod_id(d.tokenizer_type, d.tokenizer_model, getattr(d, "tokenizer_eod", None))


def document_packing(cfg: Config) -> Optional[DocumentPacking]:
    """The model's packing setting for this run, or None when neither reset flag is on."""
    d = cfg.data
    if not (d.reset_attention_mask or d.reset_position_ids):
        return None
    return DocumentPacking(eod_id(cfg), reset_attention_mask=d.reset_attention_mask,
                           reset_position_ids=d.reset_position_ids)


def eod_loss_mask_id(cfg: Config) -> Optional[int]:
    """The eod id whose positions lose their label (data.eod_mask_loss), else None."""
    return eod_id(cfg) if cfg.data.eod_mask_loss and not cfg.data.task else None


def mask_eod_labels(tokens: torch.Tensor, labels: torch.Tensor, eod: int) -> torch.Tensor:
    """labels with -1 (ignored) where the input token is `eod`. A new tensor (labels may share memory
    with tokens), page-locked again when labels were (the trainer's asynchronous copy to the device)."""
    out = labels.masked_fill(tokens == eod, -1)
    if labels.is_pinned():
        from deepspeed.accelerator import get_accelerator
        out = get_accelerator().pin_memory(out)
    return out
