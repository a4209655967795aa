"""Causal depthwise short convolution over time, the local mixer GDN applies to q, k and v.

Each channel c has its own W-tap filter weight[c] (W = 4 typically); output position t sees the
inputs t-W+1 .. t only. The last tap weight[:, -1] multiplies the current token (the layout of
nn.Conv1d(C, C, W, groups=C) weights, squeezed to (C, W), so checkpoints map over directly).

State: the W-1 most recent inputs, shaped (B, C, W-1), oldest first. Passing the returned
final_state as the next call's initial_state continues the sequence exactly (chunked prefill,
decode, or a state carried across loops); None means the sequence starts with zeros.
The activation (SiLU in GDN) is the caller's job.

Packed documents: with doc_ids (B, T) (megaloop/model/documents.py) a tap that would read a token of
an earlier document reads zero instead, so every document is convolved as if it started the sequence.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["causal_depthwise_conv1d", "causal_depthwise_conv1d_step"]


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            initial_state: Optional[torch.Tensor] = None,
                            doc_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: (B, T, C), weight: (C, W), bias: (C,), initial_state: (B, C, W-1), doc_ids: (B, T) packed
    documents (the carried initial_state belongs to the first token's document).
    Returns y (B, T, C) and final_state (B, C, W-1)."""
    B, T, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"weight must be (C, W) with C = {C}, got {tuple(weight.shape)}")
    W = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(B, C, W - 1)
    elif initial_state.shape != (B, C, W - 1):
        raise ValueError(f"initial_state must be (B, C, W-1) = ({B}, {C}, {W - 1}), got {tuple(initial_state.shape)}")

    # Prepend the carried inputs instead of zero padding: this is what makes the conv causal and
    # resumable. conv1d is a cross-correlation, so weight[:, -1] lands on the newest input.
    history = torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=2)  # (B, C, W-1+T)
    final_state = history[:, :, history.shape[2] - (W - 1):]
    if doc_ids is not None:
        return _conv_within_documents(history, weight, bias, doc_ids).transpose(1, 2), final_state
    y = F.conv1d(history, weight.unsqueeze(1), bias, groups=C)                  # (B, C, T)
    return y.transpose(1, 2), final_state


def _conv_within_documents(history, weight, bias, doc_ids):
    """The conv as W shifted products, tap w reading lag W-1-w only where that token is in the query's
    document: (B, C, W-1+T) -> (B, C, T). W is small (4): W element-wise products, no (T, W) unfold."""
    W, T = weight.shape[1], doc_ids.shape[1]
    docs = torch.cat([doc_ids[:, :1].expand(-1, W - 1), doc_ids], dim=1)          # history's documents
    y = history[:, :, W - 1:] * weight[:, W - 1, None]
    for w in range(W - 1):
        same = (docs[:, w:w + T] == doc_ids).unsqueeze(1)                        # (B, 1, T)
        y = y + torch.where(same, history[:, :, w:w + T], 0.0) * weight[:, w, None]
    return y if bias is None else y + bias[:, None]


def causal_depthwise_conv1d_step(x_t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                                 state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decode step. x_t: (B, C) the new token, state: (B, C, W-1).
    Returns y_t (B, C) and the new state (B, C, W-1)."""
    B, C = x_t.shape
    W = weight.shape[1]
    if state is None:
        state = x_t.new_zeros(B, C, W - 1)
    window = torch.cat([state.to(x_t.dtype), x_t.unsqueeze(-1)], dim=-1)  # (B, C, W)
    y_t = (window * weight).sum(-1)
    if bias is not None:
        y_t = y_t + bias
    return y_t, window[:, :, 1:]
