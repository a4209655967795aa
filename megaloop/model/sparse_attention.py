"""Sparse softmax-attention mixers: sliding window ("swa") and DeepSeek-style sparse attention ("dsa").

Both keep the projections, RoPE, QK-norm and output gate of `Attention` and only change which keys a
query sees (`attend`), using the kernels in megaloop.ops (sliding_window, lightning_indexer, sparse_attention, indexer_loss).

DSA: a light indexer scores every causal (query, key) pair (blockwise: no (T, T) matrix is formed),
    I(t, s) = sum_j w(t, j) * H_I^-1/2 * d_I^-1/2 * ReLU(q_I(t, j) . k_I(s)),
DeepSeek-V3.2's lightning indexer (`model.dsa_indexer_form: v3.2`): q_I = W_qI x_q, k_I = LayerNorm(W_kI x),
both with RoPE on their first `model.dsa_index_rope_dim` channels (halves layout, V3.2's non-interleaved
indexer RoPE), w = W_w x_q. Both scales multiply w (ReLU is positively homogeneous, so this is the same
score). The "legacy" form (megaloop's first, for its checkpoints) has no RoPE, no LayerNorm, H_I^-1/2 only.
Each query attends to its top-k keys, the selection shared by all heads. The selection is not
differentiable; the indexer learns from DeepSeek's auxiliary loss, the KL between the (detached)
main attention distribution and softmax(I) over the selected keys (its inputs detached from the
main stream), weighted by
`model.dsa_indexer_loss_coef`. That loss reaches the indexer through `AuxLossInjector`, which adds its
gradient in backward without changing the forward output (Megatron's MoE aux-loss mechanism), so the
training loop needs no extra plumbing.

Dense warm-up (`train.stage: dsa_warmup`, `set_dsa_dense_warmup`): the attention runs dense over all
causal keys and each DSA layer appends KL(dense attention || softmax(I) over all causal keys) to a list
the stage loss reads (megaloop/model/stage_losses.py); no aux-loss injection.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaloop.config import ModelConfig
from megaloop.model.layers import Attention, apply_rope, rope_cache, rope_for_positions
from megaloop.ops import lightning_indexer_topk, sliding_window_attention, sparse_attention_from_indices
from megaloop.ops.indexer_loss import dense_indexer_kl_from_probs, indexer_kl_loss_from_probs


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


def set_dsa_dense_warmup(model: nn.Module, on: bool) -> int:
    """Switch every DSA layer of `model` to the dense warm-up (dense attention, indexer KL collected in
    `layer.warmup_losses`) or back; returns the number of DSA layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, DeepSeekSparseAttention):
            m.dense_warmup, m.warmup_losses = bool(on), []
            n += 1
    return n


def indexer_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """RoPE on the first rope_dim channels of x (B, T, H, D), the rest unchanged (DeepSeek-V3.2's indexer:
    its RoPE part first, then the position-free part); cos/sin (T, rope_dim/2) or (B, T, rope_dim/2)."""
    if rope_dim == 0:
        return x
    return torch.cat([apply_rope(x[..., :rope_dim], cos, sin), x[..., rope_dim:]], dim=-1)


def indexer_key_norm(k: torch.Tensor, norm) -> torch.Tensor:
    """V3.2's LayerNorm on the indexer key, in fp32 (eps 1e-6, learned scale and bias); none: k."""
    if norm is None:
        return k
    return F.layer_norm(k.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).type_as(k)


class SlidingWindowAttention(Attention):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__(cfg, layer_idx)
        self.window = cfg.window

    def attend(self, q, k, v, x=None, q_input=None, docs=None):
        return sliding_window_attention(q, k, v, self.window, doc_ids=None if docs is None else docs.ids)


class DeepSeekSparseAttention(Attention):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__(cfg, layer_idx)
        d, hi, di = cfg.d_model, cfg.dsa_index_heads, cfg.dsa_index_dim
        self.topk = cfg.dsa_topk
        self.index_heads, self.index_dim = hi, di
        self.loss_coef = cfg.dsa_indexer_loss_coef
        self.aux_loss_backward_scale = 1.0  # set_aux_loss_backward_scale
        self.rope_dim, self.rope_theta = cfg.dsa_rope_dim, cfg.rope_theta
        v32 = cfg.dsa_indexer_form == "v3.2"
        # Folded into w: H_I^-1/2 (both forms) and V3.2's d_I^-1/2 (its softmax_scale).
        self.score_scale = hi ** -0.5 * (di ** -0.5 if v32 else 1.0)
        self.dense_warmup, self.warmup_losses = False, []  # set_dsa_dense_warmup
        # The indexer is small and replicated under TP: every rank must select the same keys.
        self.wq_index = nn.Linear(d, hi * di, bias=False)
        self.wk_index = nn.Linear(d, di, bias=False)
        self.k_index_norm = nn.LayerNorm(di, eps=1e-6) if v32 else None
        self.w_index = nn.Linear(d, hi, bias=False)

    def index_inputs(self, x, q_input=None, docs=None):
        # Detached, as in DeepSeek-V3.2: the indexer is optimised separately, by its own KL loss only,
        # and sends no gradient into the main model's stream.
        x = x.detach()
        B, T, _ = x.shape
        qx = x if q_input is None else q_input.detach()
        q_idx = self.wq_index(qx).view(B, T, self.index_heads, self.index_dim)
        k_idx = indexer_key_norm(self.wk_index(x), self.k_index_norm)
        if self.rope_dim:
            if docs is not None and docs.positions is not None:  # positions restart per packed document
                cos, sin = rope_for_positions(docs.positions, self.rope_dim, self.rope_theta)
            else:
                cos, sin = rope_cache(T, self.rope_dim, self.rope_theta, x.device)
            q_idx = indexer_rope(q_idx, cos, sin, self.rope_dim)
            k_idx = indexer_rope(k_idx[:, :, None], cos, sin, self.rope_dim)[:, :, 0]
        w = self.w_index(qx) * self.score_scale
        return q_idx, k_idx, w

    def attend(self, q, k, v, x=None, q_input=None, docs=None):
        return self.sparse_attend(q, k, v, x, q_input, docs=docs)

    def dense_attend(self, q, k, v, x, q_input, head_reduce=None, total_heads=None, docs=None):
        """The dense warm-up: causal attention over all keys; the indexer's KL to the head-averaged
        dense attention distribution (over all causal keys) is appended to `warmup_losses`.
        O(H T^2) memory, as the warm-up is in DeepSeek-V3.2 (a short stage)."""
        from megaloop.ops.dense_attention import _default_scale, _group_queries
        B, H, T, D = q.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        doc_ids = None if docs is None else docs.ids
        if doc_ids is not None:  # (B, 1, 1, T, T): packed documents
            causal = docs.attn_mask[:, :, None]
        qg = _group_queries(q, k)                                                  # (B, Hkv, G, T, D)
        logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k).float() * _default_scale(q, None)
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1).reshape(B, H, T, T)
        y = torch.einsum("bhts,bhsd->bhtd", probs.type_as(v), v.repeat_interleave(H // v.shape[1], dim=1))
        target = probs.detach().sum(1)
        if head_reduce is not None:
            target = head_reduce(target)
        target = target / (total_heads or H)
        q_idx, k_idx, w = self.index_inputs(x, q_input, docs)
        self.warmup_losses.append(dense_indexer_kl_from_probs(q_idx, k_idx, w, target, doc_ids))
        return y

    def sparse_attend(self, q, k, v, x=None, q_input=None, head_reduce=None, total_heads=None, docs=None):
        """Select with the blockwise indexer (no (T, T) matrix), attend, and when the indexer trains
        attach its KL loss, whose target (the head-averaged attention probabilities over the selected
        keys) comes out of the attention itself: O(T * topk) memory throughout.
        head_reduce / total_heads: under tensor parallelism this rank holds only some heads; the
        target's head sum goes through head_reduce (an all-reduce) and is divided by total_heads.
        docs: packed documents; no key of another document is selected (megaloop/model/documents.py)."""
        if self.dense_warmup:
            return self.dense_attend(q, k, v, x, q_input, head_reduce, total_heads, docs)
        q_idx, k_idx, w = self.index_inputs(x, q_input, docs)
        indices, valid = lightning_indexer_topk(q_idx, k_idx, w, self.topk,
                                                doc_ids=None if docs is None else docs.ids)
        train_indexer = self.training and torch.is_grad_enabled() and self.loss_coef > 0
        if not train_indexer:
            return sparse_attention_from_indices(q, k, v, indices, valid)
        y, probs = sparse_attention_from_indices(q, k, v, indices, valid, return_probs=True)
        if head_reduce is not None:
            probs = head_reduce(probs)
        target = probs / (total_heads or q.shape[1])
        aux = indexer_kl_loss_from_probs(q_idx, k_idx, w, indices, valid, target)
        return AuxLossInjector.apply(y, aux, self.loss_coef * self.aux_loss_backward_scale)
