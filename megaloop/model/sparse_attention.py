"""Sparse softmax-attention mixers: sliding window ("swa") and DeepSeek-style sparse attention ("dsa").

Both keep the projections, RoPE, QK-norm and output gate of `Attention` and only change which keys a
query sees (`attend`), using the kernels in megaloop.ops (sliding_window, lightning_indexer, sparse_attention, indexer_loss).

DSA: a light indexer scores every causal (query, key) pair (blockwise: no (T, T) matrix is formed),
    I(t, s) = sum_j w(t, j) * ReLU(q_I(t, j) . k_I(s)),
and each query attends to its top-k keys, the selection shared by all heads. The selection is not
differentiable; the indexer learns from DeepSeek's auxiliary loss, the KL between the (detached)
main attention distribution and softmax(I) over the selected keys (its inputs detached from the
main stream), weighted by
`model.dsa_indexer_loss_coef`. That loss reaches the indexer through `AuxLossInjector`, which adds its
gradient in backward without changing the forward output (Megatron's MoE aux-loss mechanism), so the
training loop needs no extra plumbing. The indexer has no RoPE here (DeepSeek applies RoPE to part
of its dims): a simplification worth revisiting at scale.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megaloop.config import ModelConfig
from megaloop.model.layers import Attention
from megaloop.ops import lightning_indexer_topk, sliding_window_attention, sparse_attention_from_indices
from megaloop.ops.indexer_loss import indexer_kl_loss_from_probs


class AuxLossInjector(torch.autograd.Function):
    """Identity on `output` in forward; in backward, also sends gradient `scale` into `aux_loss`
    (scale = the loss coefficient x the main loss's backward scale, see `set_aux_loss_backward_scale`)."""

    @staticmethod
    def forward(ctx, output, aux_loss, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def set_aux_loss_backward_scale(model: nn.Module, scale: float) -> None:
    """Megatron's MoEAuxLossAutoScaler.set_loss_scale, per model instead of global: the factor the main
    loss's gradient carries when backward starts (DeepSpeed's engine.backward divides the loss by
    gradient_accumulation_steps and multiplies it by the fp16 loss scale), so the DSA indexer's aux loss
    is scaled alike and keeps its weight `dsa_indexer_loss_coef` relative to the main loss. The trainer
    sets it (megaloop.training.engine.main_loss_backward_scale); 1.0, the default, suits a plain
    `loss.backward()`."""
    for m in model.modules():
        if isinstance(m, DeepSeekSparseAttention):
            m.aux_loss_backward_scale = float(scale)


class SlidingWindowAttention(Attention):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__(cfg, layer_idx)
        self.window = cfg.window

    def attend(self, q, k, v, x=None, q_input=None):
        return sliding_window_attention(q, k, v, self.window)


class DeepSeekSparseAttention(Attention):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__(cfg, layer_idx)
        d, hi, di = cfg.d_model, cfg.dsa_index_heads, cfg.dsa_index_dim
        self.topk = cfg.dsa_topk
        self.index_heads, self.index_dim = hi, di
        self.loss_coef = cfg.dsa_indexer_loss_coef
        self.aux_loss_backward_scale = 1.0  # set_aux_loss_backward_scale
        # The indexer is small and replicated under TP: every rank must select the same keys.
        self.wq_index = nn.Linear(d, hi * di, bias=False)
        self.wk_index = nn.Linear(d, di, bias=False)
        self.w_index = nn.Linear(d, hi, bias=False)

    def index_inputs(self, x, q_input=None):
        # Detached, as in DeepSeek-V3.2: the indexer is optimised separately, by its own KL loss only,
        # and sends no gradient into the main model's stream.
        x = x.detach()
        B, T, _ = x.shape
        qx = x if q_input is None else q_input.detach()
        q_idx = self.wq_index(qx).view(B, T, self.index_heads, self.index_dim)
        k_idx = self.wk_index(x)
        w = self.w_index(qx) / self.index_heads ** 0.5
        return q_idx, k_idx, w

    def attend(self, q, k, v, x=None, q_input=None):
        return self.sparse_attend(q, k, v, x, q_input)

    def sparse_attend(self, q, k, v, x=None, q_input=None, head_reduce=None, total_heads=None):
        """Select with the blockwise indexer (no (T, T) matrix), attend, and when the indexer trains
        attach its KL loss, whose target (the head-averaged attention probabilities over the selected
        keys) comes out of the attention itself: O(T * topk) memory throughout.
        head_reduce / total_heads: under tensor parallelism this rank holds only some heads; the
        target's head sum goes through head_reduce (an all-reduce) and is divided by total_heads."""
        q_idx, k_idx, w = self.index_inputs(x, q_input)
        indices, valid = lightning_indexer_topk(q_idx, k_idx, w, self.topk)
        train_indexer = self.training and torch.is_grad_enabled() and self.loss_coef > 0
        if not train_indexer:
            return sparse_attention_from_indices(q, k, v, indices, valid)
        y, probs = sparse_attention_from_indices(q, k, v, indices, valid, return_probs=True)
        if head_reduce is not None:
            probs = head_reduce(probs)
        target = probs / (total_heads or q.shape[1])
        aux = indexer_kl_loss_from_probs(q_idx, k_idx, w, indices, valid, target)
        return AuxLossInjector.apply(y, aux, self.loss_coef * self.aux_loss_backward_scale)
