"""Looped transformer language models exported from megaloop, for Hugging Face transformers.

Self-contained: imports only torch and transformers (never megaloop). It re-implements every
architecture of the megaloop family with megaloop's parameter names, so a megaloop state dict loads
1:1:

  embedding (x embed_scale) -> embed_norm -> prelude -> (prelude_norm) -> looped block x R -> (out_proj)
            -> (coda_norm) -> coda -> final_norm -> head

  arch recurrent  s(t) = Block(inject(s(t-1), e)); injection none | add | concat_adapter | parcae,
                  standard or internal recall, inner or outer normalization, state init
                  embed | zeros | noise, Ouro's shared final norm (share_outer_final_norm)
  arch flt        every loop restarts from e; attention queries of every layer from h(k-1)
  arch lt_ia      ... queries of layer 0 only
  arch lt_i       the stream starts from norm(e + h(k-1))
  arch flt_res    every layer first does x = norm(x + h(k-1))
  layers          pre-norm, sandwich norm (Ouro) or Huginn's normalised stream, RoPE, GQA, optional
                  QK-norm, SwiGLU or ReLU^2, LT2's zero-init sigmoid attention output gate; LT2's
                  per-loop residual gate rho; logit soft-cap; tied or untied head; Ouro exit gate.
  token mixers    of the looped layers (config.mixer: one name, a comma list, or an "N:M" ratio):
                  attn (softmax), gdn (Gated DeltaNet, LT2), swa (sliding window), dsa (DeepSeek
                  sparse attention: lightning indexer + top-k keys).

Usage:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    out = model(input_ids, num_loops=8)                        # any R >= 1
    out = model(input_ids, exit_strategy="kl", exit_threshold=1e-3)  # out.exit_loops: loop per token
    ids = model.generate(input_ids, max_new_tokens=32, num_loops=6)  # kwargs reach forward()

KV cache (`MegaloopCache`): one slot per (loop, layer) pair, plus one per prelude layer and per
(loop, coda layer) pair: every loop attends to its own keys/values of the earlier positions. For
the FLT family the query of a new position comes from the previous loop's h at that position (computed
in the same step), while keys/values come from the current loop's stream, which is exactly what the
per-(loop, layer) slots hold. A cache is tied to the number of loops (and exit mode) it was filled
with; continuing it with another R is refused.

Token mixers are looked up by name in MIXERS; a config naming another mixer is refused with a clear
message. Each keeps its per-(loop, layer) state in the cache slot dict it receives: attn keys/values;
swa the newest window-1 keys/values; dsa keys/values and the indexer keys; gdn the recurrent state
(B, H, Dk, Dv) and the short-conv states of q, k, v (the last conv_size-1 inputs). As megaloop runs each
loop's GDN scan from a zero state over that loop's stream, a (loop, layer) slot continues exactly
that scan: cached decoding equals the full forward.

Noise state init: see MegaloopConfig.noise_init (default "seeded": deterministic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

try:
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover - very old transformers: PreTrainedModel is the mixin
    GenerationMixin = object

from .configuration_megaloop import MegaloopConfig

try:
    import transformers as _tf

    _TF_MAJOR = int(_tf.__version__.split(".")[0])
except Exception:  # pragma: no cover
    _TF_MAJOR = 5


# ------------------------------------------------------------------------------------------------
# Building blocks. This file imports nothing from megaloop, so what it shares with megaloop is copied:
# each copy is marked "# Copied from megaloop/<path>:<name>", and tests/test_hf_template_copies.py
# fails when the source changes and the copy does not.


# Copied from megaloop/model/layers.py:rms_norm
def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    # Copied from megaloop/model/layers.py:RMSNorm.__init__
    def __init__(self, dim: int, eps: float = 1e-6, scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None

    def forward(self, x):
        y = rms_norm(x, self.eps)
        return y * self.weight if self.weight is not None else y


# Copied from megaloop/model/layers.py:rope_for_positions
def rope_for_positions(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin of shape (B, T, head_dim/2) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


# Copied from megaloop/model/layers.py:apply_rope
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by position, halves layout (as Llama's HF port); cos/sin (T, D/2) or (B, T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over the heads
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


@dataclass
class AttnContext:
    """What every mixer call of one forward shares: rotary tables, the attention mask, and where the
    new tokens sit (past = cached positions before them; key_valid = which positions are real tokens)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: Optional[torch.Tensor]  # bool (B, 1, T, past + T), True = attend; None = plain causal
    causal: bool  # use is_causal (no cache, no padding): bit-identical to megaloop's path
    past: int = 0
    key_valid: Optional[torch.Tensor] = None  # bool (B, past + T), False = left padding; None = no padding
    positions: Optional[torch.Tensor] = None  # (B, T) RoPE positions of the new tokens (DSA's indexer RoPE)
    tokens: Optional[torch.Tensor] = None  # (B, T) ids of the new positions, for value embeddings

    def allowed(self, T: int, L: int, device) -> torch.Tensor:
        """Bool (B or 1, T, L): query past + i may read key position past + T - L + j (causal, real keys;
        a padding query reads itself so that no row is empty). L <= past + T: the newest L keys."""
        q_pos = torch.arange(self.past, self.past + T, device=device)[:, None]
        k_pos = torch.arange(self.past + T - L, self.past + T, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None]
        if self.key_valid is not None:
            allowed = (allowed & self.key_valid[:, -L:].to(device)[:, None, :]) | (k_pos == q_pos)[None]
        return allowed

    def token_valid(self, T: int) -> Optional[torch.Tensor]:
        """Bool (B, T): which of the T new tokens are real (None: all of them)."""
        return None if self.key_valid is None else self.key_valid[:, -T:]


def _concat_slot(slot: Optional[dict], name: str, new: torch.Tensor, dim: int) -> torch.Tensor:
    """Cached positions of `name` followed by the new ones; the slot keeps the result."""
    if slot is None:
        return new
    if name in slot:
        new = torch.cat([slot[name], new], dim=dim)
    slot[name] = new
    return new


class MegaloopAttention(nn.Module):
    """Causal GQA softmax attention with RoPE, optional QK-norm and LT2 output gate.

    q_input: the normalised stream the queries come from (FLT attention injection), else x.
    slot:    this (segment, loop, layer)'s cache dict ({"k", "v"} of earlier positions), or None.
    Sparse variants (SWA, DSA) override `attend`, which sees the cached keys too.
    """

    kv_names = ("k", "v")  # the per-position tensors of a slot, time on dim 2 (extend_slot)

    def __init__(self, config: MegaloopConfig, layer_idx: int = 0):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.head_dim = hd
        self.wq = nn.Linear(d, config.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(config.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.norm_eps, config.norm_scale) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.norm_eps, config.norm_scale) if config.qk_norm else None
        self.gate = nn.Linear(d, config.n_heads * hd, bias=False) if config.attn_output_gate else None
        self.value_embed = None  # value_embeddings: set on the chosen layers (attach_value_embeddings)

    def forward(self, x, ctx: AttnContext, q_input=None, slot: Optional[dict] = None):
        q, k, v = self.project(x, q_input, ctx.cos, ctx.sin)
        if self.value_embed is not None:  # before the cache: cached values include it
            v = self.value_embed(v, x, ctx.tokens)
        return self.output(self.attend(q, k, v, x, q_input, ctx, slot), x)

    # Copied from megaloop/model/layers.py:Attention.project
    def project(self, x, q_input, cos, sin):
        """Queries (B, H, T, D) from q_input (else x), keys/values (B, Hkv, T, D) from x; RoPE on q, k."""
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.wq(x if q_input is None else q_input).view(B, T, -1, hd)
        k = self.wk(x).view(B, T, -1, hd)
        v = self.wv(x).view(B, T, -1, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    # Copied from megaloop/model/layers.py:Attention.output
    def output(self, y, x):
        """Attention output (B, H, T, D) -> (B, T, d): heads merged, LT2's output gate, W_o."""
        B, H, T, D = y.shape
        y = y.transpose(1, 2).reshape(B, T, H * D)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return self.wo(y)

    @staticmethod
    def _repeat_kv(q, k, v):
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return k, v

    def attend(self, q, k, v, x, q_input, ctx: AttnContext, slot):
        """New queries (B, H, T, D) and keys/values (B, Hkv, T, D) -> (B, H, T, D)."""
        T = q.shape[2]
        k, v = _concat_slot(slot, "k", k, 2), _concat_slot(slot, "v", v, 2)
        k, v = self._repeat_kv(q, k, v)
        if ctx.mask is None and (ctx.causal or T == 1):
            return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal and T > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)

    def extend_slot(self, dst: dict, src: dict, n_new: int):
        """Give `dst` (a skipped loop's slot) the newest n_new positions of `src` (exit_kv='copy')."""
        for name in self.kv_names:
            dim = 2 if src[name].dim() == 4 else 1  # k, v (B, H, S, D); DSA's indexer keys (B, S, Di)
            new = src[name].narrow(dim, src[name].shape[dim] - n_new, n_new)
            dst[name] = torch.cat([dst[name], new], dim=dim) if name in dst else new


# Value embeddings (megaloop/model/value_embeddings.py)

GATE_CHANNELS = 32


# Copied from megaloop/model/value_embeddings.py:has_value_embedding
def has_value_embedding(layer: int, n_layers: int) -> bool:
    return layer % 2 == (n_layers - 1) % 2


# Copied from megaloop/model/value_embeddings.py:value_embedding_layers with ModelConfig->MegaloopConfig
def value_embedding_layers(cfg: MegaloopConfig) -> Iterator[Tuple[str, int]]:
    stacks = [("prelude", cfg.n_prelude), ("loop", cfg.n_loop), ("coda", cfg.n_coda)]
    n_layers = sum(n for _, n in stacks)
    offset = 0
    for stack, n in stacks:
        for i in range(n):
            if has_value_embedding(offset + i, n_layers):
                yield stack, i
        offset += n


# Copied from megaloop/model/value_embeddings.py:ValueEmbedding with ModelConfig->MegaloopConfig, kv_heads->n_kv_heads, attn_head_dim->head_dim
class ValueEmbedding(nn.Module):
    def __init__(self, cfg: MegaloopConfig):
        super().__init__()
        self.table = nn.Embedding(cfg.padded_vocab_size, cfg.n_kv_heads * cfg.head_dim)
        self.gate_channels = min(GATE_CHANNELS, cfg.d_model)
        self.gate = nn.Linear(self.gate_channels, cfg.n_kv_heads, bias=False)
        self.gate.zero_init = True

    def forward(self, v: torch.Tensor, x: torch.Tensor, tokens) -> torch.Tensor:
        if tokens is None:
            raise ValueError("model.value_embeddings: this attention layer needs the token ids (tokens=...)")
        B, H, T, D = v.shape
        ve = self.table(tokens).view(B, T, H, D).transpose(1, 2)
        gate = 2 * torch.sigmoid(self.gate(x[..., :self.gate_channels]))
        return v + (gate.transpose(1, 2).unsqueeze(-1) * ve).to(v.dtype)


# Copied from megaloop/model/value_embeddings.py:attach_value_embeddings with ModelConfig->MegaloopConfig
def attach_value_embeddings(prelude, block_layers, coda, cfg: MegaloopConfig) -> None:
    stacks = {"prelude": prelude, "loop": block_layers, "coda": coda}
    for stack, i in value_embedding_layers(cfg):
        stacks[stack][i].mixer.value_embed = ValueEmbedding(cfg)


class MegaloopSlidingWindowAttention(MegaloopAttention):
    """"swa": query t reads the keys (t - window, t] (megaloop/model/sparse_attention.py). The cache
    keeps only the newest window - 1 keys/values per (loop, layer): O(window) memory however long
    the generation."""

    def __init__(self, config: MegaloopConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.window = int(config.window)

    def attend(self, q, k, v, x, q_input, ctx: AttnContext, slot):
        T = q.shape[2]
        if slot is not None and "k" in slot:
            k, v = torch.cat([slot["k"], k], dim=2), torch.cat([slot["v"], v], dim=2)
        if slot is not None:
            start = max(0, k.shape[2] - (self.window - 1))
            slot["k"], slot["v"] = k[:, :, start:], v[:, :, start:]
        L = k.shape[2]
        k, v = self._repeat_kv(q, k, v)
        if ctx.causal and L == T and self.window >= T:  # the band covers the causal triangle
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        allowed = ctx.allowed(T, L, q.device)
        q_pos = torch.arange(ctx.past, ctx.past + T, device=q.device)[:, None]
        k_pos = torch.arange(ctx.past + T - L, ctx.past + T, device=q.device)[None, :]
        allowed = allowed & (k_pos > q_pos - self.window)[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])

    def extend_slot(self, dst: dict, src: dict, n_new: int):
        super().extend_slot(dst, src, n_new)
        for name in ("k", "v"):
            dst[name] = dst[name][:, :, max(0, dst[name].shape[2] - (self.window - 1)):]


# Copied from megaloop/model/sparse_attention.py:indexer_rope
def indexer_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """RoPE on the first rope_dim channels of x (B, T, H, D), the rest unchanged (DeepSeek-V3.2's indexer)."""
    if rope_dim == 0:
        return x
    return torch.cat([apply_rope(x[..., :rope_dim], cos, sin), x[..., rope_dim:]], dim=-1)


# Copied from megaloop/model/sparse_attention.py:indexer_key_norm
def indexer_key_norm(k: torch.Tensor, norm) -> torch.Tensor:
    """V3.2's LayerNorm on the indexer key, in fp32; none: k."""
    if norm is None:
        return k
    return F.layer_norm(k.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).type_as(k)


class MegaloopSparseAttention(MegaloopAttention):
    """"dsa", DeepSeek sparse attention (megaloop/model/sparse_attention.py): a lightning indexer
    I(t, s) = sum_j w(t, j) ReLU(q_I(t, j) . k_I(s)) scores every causal key, each query attends to
    its top-k keys (one selection for all heads). dsa_indexer_form "v3.2" (DeepSeek-V3.2's indexer):
    k_I = LayerNorm(W_kI x), RoPE on the first dsa_index_rope_dim channels of q_I and k_I, and w scaled
    by H_I^-1/2 * d_I^-1/2; "legacy": no RoPE, no LayerNorm, H_I^-1/2 only. The cache keeps keys/values
    and the indexer keys ("ki", (B, S, Di), after their RoPE) per (loop, layer); a new query is scored
    against every cached indexer key."""

    kv_names = ("k", "v", "ki")

    def __init__(self, config: MegaloopConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        d, hi, di = config.d_model, config.dsa_index_heads, config.dsa_index_dim
        self.topk = int(config.dsa_topk)
        self.index_heads, self.index_dim = hi, di
        v32 = config.dsa_indexer_form == "v3.2"
        self.rope_dim, self.rope_theta = int(config.dsa_index_rope_dim), config.rope_theta
        self.score_scale = hi ** -0.5 * (di ** -0.5 if v32 else 1.0)
        self.wq_index = nn.Linear(d, hi * di, bias=False)
        self.wk_index = nn.Linear(d, di, bias=False)
        self.k_index_norm = nn.LayerNorm(di, eps=1e-6) if v32 else None
        self.w_index = nn.Linear(d, hi, bias=False)

    def select(self, x, q_input, ctx: AttnContext, slot) -> torch.Tensor:
        """Bool (B, T, S): the keys each new query attends to."""
        B, T, _ = x.shape
        qx = x if q_input is None else q_input
        q_idx = self.wq_index(qx).view(B, T, self.index_heads, self.index_dim)
        k_new = indexer_key_norm(self.wk_index(x), self.k_index_norm)
        if self.rope_dim:
            positions = ctx.positions if ctx.positions is not None else \
                torch.arange(ctx.past, ctx.past + T, device=x.device)[None].expand(B, T)
            cos, sin = rope_for_positions(positions, self.rope_dim, self.rope_theta)
            q_idx = indexer_rope(q_idx, cos, sin, self.rope_dim)
            k_new = indexer_rope(k_new[:, :, None], cos, sin, self.rope_dim)[:, :, 0]
        k_idx = _concat_slot(slot, "ki", k_new, 1)
        w = self.w_index(qx) * self.score_scale
        S = k_idx.shape[1]
        dots = torch.einsum("btjd,bsd->btjs", q_idx, k_idx).relu()
        scores = torch.einsum("btjs,btj->bts", dots, w)
        allowed = ctx.allowed(T, S, x.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        # Top-k with ties broken towards the earlier key (a stable sort): the ReLU makes exact ties (score
        # 0.0) common, and torch.topk breaks them differently for rows of different lengths, which would
        # make a cached decode step disagree with the full forward.
        indices = scores.sort(dim=-1, descending=True, stable=True).indices[..., :min(self.topk, S)]
        valid = allowed.expand(B, T, S).gather(-1, indices)
        # Every row keeps at least its own position (causal; a padding query is allowed itself only).
        return torch.zeros(B, T, S, dtype=torch.bool, device=x.device).scatter(-1, indices, valid)

    def attend(self, q, k, v, x, q_input, ctx: AttnContext, slot):
        selected = self.select(x, q_input, ctx, slot)
        k, v = _concat_slot(slot, "k", k, 2), _concat_slot(slot, "v", v, 2)
        k, v = self._repeat_kv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=selected[:, None])


# ------------------------------------------------------------------------------------------------
# Gated DeltaNet (megaloop/model/gated_deltanet.py; kernels from megaloop/ops/{short_conv,gated_delta}.py)


# Copied from megaloop/ops/short_conv.py:causal_depthwise_conv1d
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


# Copied from megaloop/ops/short_conv.py:_conv_within_documents
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


# Copied from megaloop/ops/gated_delta.py:_compute_dtype
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The state is a long-lived accumulator: never run it in half precision.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# Copied from megaloop/ops/gated_delta.py:_check_shapes
def _check_shapes(q, k, v, g, beta, initial_state):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (B, T, H, Dv) = ({B}, {T}, {H}, Dv), got {tuple(v.shape)}")
    if g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"g and beta must be (B, T, H) = ({B}, {T}, {H}), got {tuple(g.shape)}, {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(f"initial_state must be (B, H, Dk, Dv) = ({B}, {H}, {Dk}, {Dv}), got {tuple(initial_state.shape)}")


# Copied from megaloop/ops/gated_delta.py:document_starts
def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the token starts a new document (its predecessor is in another one; never at t = 0,
    whose state is the carried initial state)."""
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


# Copied from megaloop/ops/gated_delta.py:gated_delta_rule_recurrent
def gated_delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                               initial_state: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                               doc_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Naive token-by-token gated delta rule. The reference the chunked form is tested against,
    and the right tool for single-token decode. Returns (o (B, T, H, Dv), final_state (B, H, Dk, Dv))."""
    _check_shapes(q, k, v, g, beta, initial_state)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    out_dtype = v.dtype
    dtype = _compute_dtype(q.dtype)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))

    if initial_state is None:
        state = q.new_zeros(B, H, Dk, Dv)
    else:
        state = initial_state.to(dtype)
    keep = None if doc_ids is None else (~document_starts(doc_ids)).to(dtype)  # 0: a document starts
    outputs = []
    for t in range(T):
        k_t, q_t = k[:, t], q[:, t]                                      # (B, H, Dk)
        state = state * g[:, t].exp()[..., None, None]                   # S' = alpha S
        if keep is not None:
            state = state * keep[:, t, None, None, None]
        stored = torch.einsum("bhkv,bhk->bhv", state, k_t)               # S'^T k
        correction = beta[:, t, :, None] * (v[:, t] - stored)            # u
        state = state + k_t[..., :, None] * correction[..., None, :]     # S' + k u^T
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q_t) * scale)
    o = torch.stack(outputs, dim=1) if T > 0 else v.new_zeros(B, 0, H, Dv)
    return o.to(out_dtype), state


# Copied from megaloop/ops/gated_delta.py:gated_delta_rule_chunked
def gated_delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                             initial_state: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                             chunk_size: int = 64, doc_ids: Optional[torch.Tensor] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel gated delta rule, numerically equal to `gated_delta_rule_recurrent`.

    Inside a chunk of C tokens, with S_0 the state entering the chunk and G_i = g_1 + ... + g_i
    (cumulative log-decay from the chunk start), the corrections u_i of the delta form satisfy

        u_i = beta_i (v_i - e^{G_i} S_0^T k_i - sum_{j<i} e^{G_i - G_j} (k_i . k_j) u_j)

    i.e. the lower-triangular system (I + A) U = diag(beta) V - diag(beta e^G) K S_0 with
    A_ij = beta_i e^{G_i - G_j} (k_i . k_j) for j < i. Solving it once per chunk (the UT transform)
    gives U = U_v - W S_0 with U_v = (I + A)^-1 diag(beta) V and W = (I + A)^-1 diag(beta e^G) K;
    both depend only on the chunk's own inputs, so they are computed for all chunks in parallel.
    After that the chunk is plain decayed linear attention with u in place of v:

        o_i      = scale * (e^{G_i} S_0^T q_i + sum_{j<=i} e^{G_i - G_j} (q_i . k_j) u_j)
        S_C      = e^{G_C} S_0 + sum_j e^{G_C - G_j} k_j u_j^T

    Only the state hand-off between chunks is sequential (a Python loop over T / C chunks).
    Cost per head: O(T C (Dk + Dv) + T Dk Dv) time; O(T C) memory for the intra-chunk matrices
    plus the T / C chunk-boundary states (Dk x Dv each) that autograd keeps for backward.

    T need not be a multiple of chunk_size: the tail is padded with k = v = q = 0, g = 0, beta = 0,
    which leaves the state untouched (alpha = 1, nothing written).

    doc_ids: with n_i the number of document starts in the chunk up to i, e^{G_i - G_j} is kept only
    where n_i = n_j, e^{G_i} (from S_0) only where n_i = 0, e^{G_C - G_j} only where n_C = n_j.
    """
    _check_shapes(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    out_dtype = v.dtype
    dtype = _compute_dtype(q.dtype)
    state = q.new_zeros(B, H, Dk, Dv, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), state

    C = chunk_size
    N = (T + C - 1) // C
    pad = N * C - T

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # (B, T, H, ...) -> (B, H, N, C, ...), zero-padded along T.
        x = x.to(dtype).transpose(1, 2)
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], pad, *x.shape[3:])], dim=2)
        return x.reshape(B, H, N, C, *x.shape[3:])

    q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))
    same_doc = from_start = to_end = None
    if doc_ids is not None:  # documents started in the chunk up to i, (B, 1, N, C) (heads broadcast)
        starts = document_starts(doc_ids).to(dtype)
        n = F.pad(starts, (0, pad)).view(B, 1, N, C).cumsum(-1)
        same_doc = (n[..., :, None] == n[..., None, :]).to(dtype)             # (B, 1, N, C, C)
        from_start = (n == 0).to(dtype)                                       # no start in [0, i]
        to_end = (n == n[..., -1:]).to(dtype)                                 # no start in (j, C)

    # --- everything below, up to the chunk loop, is parallel over (B, H, N) ---
    log_decay = g.cumsum(dim=-1)                                             # G_i   (B, H, N, C)
    # e^{G_i - G_j} for j <= i. Mask *before* exp: G_i - G_j > 0 above the diagonal could overflow.
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    pair_log_decay = log_decay[..., :, None] - log_decay[..., None, :]
    decay_mask = pair_log_decay.masked_fill(~causal, 0.0).exp() * causal    # (B, H, N, C, C)
    decay = log_decay.exp()                                                 # e^{G_i}
    if same_doc is not None:
        decay_mask = decay_mask * same_doc
        decay = decay * from_start

    # UT transform: solve (I + A) X = [diag(beta) V | diag(beta e^G) K] with A strictly lower.
    k_beta = k * beta[..., None]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    A = (k_beta @ k.transpose(-1, -2)) * decay_mask * strictly_lower
    eye = torch.eye(C, dtype=dtype, device=q.device)
    rhs = torch.cat([v * beta[..., None], k_beta * decay[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    u_from_values, w = solved[..., :Dv], solved[..., Dv:]                   # U = U_v - W S_0

    # Intra-chunk attention (decayed, causal incl. the diagonal) and the inter-chunk read-out terms.
    intra_attention = (q @ k.transpose(-1, -2)) * decay_mask * scale        # (B, H, N, C, C)
    q_decayed = q * (decay[..., None] * scale)                              # e^{G_i} q_i
    chunk_log_decay = log_decay[..., -1:]                                   # G_C   (B, H, N, 1)
    to_chunk_end = (chunk_log_decay - log_decay).exp()                      # e^{G_C - G_j}
    chunk_decay = decay[..., -1:, None]                                     # e^{G_C} (B, H, N, 1, 1)
    if to_end is not None:
        to_chunk_end = to_chunk_end * to_end
    k_to_chunk_end = k * to_chunk_end[..., None]

    # --- sequential hand-off of the state between chunks ---
    outputs = []
    for n in range(N):
        u = u_from_values[:, :, n] - w[:, :, n] @ state                      # (B, H, C, Dv)
        outputs.append(q_decayed[:, :, n] @ state + intra_attention[:, :, n] @ u)
        state = chunk_decay[:, :, n] * state + k_to_chunk_end[:, :, n].transpose(-1, -2) @ u

    o = torch.stack(outputs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), state


class MegaloopGatedDeltaNet(nn.Module):
    """"gdn", Gated DeltaNet (LT2's linear-time mixer):

        q, k, v = SiLU(short_conv(W_q x)), SiLU(short_conv(W_k x)), SiLU(short_conv(W_v x)); q, k L2-normed
        g = -exp(A_log) softplus(W_a x + dt_bias), beta = sigmoid(W_b x)
        o = gated delta rule(q, k, v, g, beta);  y = W_o(RMSNorm_head(o) * out_norm_weight * SiLU(W_gate x))

    Each loop runs its scan from a zero state over that loop's stream, so with a cache every (loop, layer)
    slot keeps its own recurrent state "state" (B, H, Dk, Dv) and the short-conv states "conv_q",
    "conv_k", "conv_v" (B, C, W-1): the last W-1 conv inputs. With FLT's attention injection the query
    stream is W_q(q_input), whose conv has its own state. Prefill uses the chunked form, decode steps
    the recurrent update. Left padding: padded tokens enter the conv as zeros and do not touch the state.
    """

    state_names = ("state", "conv_q", "conv_k", "conv_v")

    def __init__(self, config: MegaloopConfig, layer_idx: int = 0):
        super().__init__()
        d, H = config.d_model, config.n_heads
        self.head_k_dim = config.head_dim
        self.head_v_dim = int(config.head_dim * config.gdn_expand_v)
        self.chunk_size = int(config.gdn_chunk_size)
        self.eps = config.norm_eps
        self.wq = nn.Linear(d, H * self.head_k_dim, bias=False)
        self.wk = nn.Linear(d, H * self.head_k_dim, bias=False)
        self.wv = nn.Linear(d, H * self.head_v_dim, bias=False)
        self.w_a = nn.Linear(d, H, bias=False)
        self.w_b = nn.Linear(d, H, bias=False)
        self.w_gate = nn.Linear(d, H * self.head_v_dim, bias=False)
        self.wo = nn.Linear(H * self.head_v_dim, d, bias=False)
        W = int(config.conv_size)
        self.q_conv = nn.Parameter(torch.zeros(H * self.head_k_dim, W))
        self.k_conv = nn.Parameter(torch.zeros(H * self.head_k_dim, W))
        self.v_conv = nn.Parameter(torch.zeros(H * self.head_v_dim, W))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.out_norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """megaloop's init of the non-Linear parameters (conv like nn.Conv1d, Mamba-2 decay)."""
        bound = 1.0 / math.sqrt(self.q_conv.shape[1])
        for p in (self.q_conv, self.k_conv, self.v_conv):
            p.uniform_(-bound, bound)
        H = self.A_log.shape[0]
        self.A_log.copy_(torch.log(torch.empty(H).uniform_(1, 16)))
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1))).clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.out_norm_weight.fill_(1.0)

    def forward(self, x, ctx: AttnContext, q_input=None, slot: Optional[dict] = None):
        B, T, _ = x.shape
        dk, dv = self.head_k_dim, self.head_v_dim
        prev = slot if slot is not None else {}
        valid = ctx.token_valid(T)
        streams = [self.wq(x if q_input is None else q_input), self.wk(x), self.wv(x)]
        if valid is not None:  # padding enters the conv as zeros: the conv then starts as if from scratch
            streams = [torch.where(valid[..., None], s, torch.zeros_like(s)) for s in streams]
        (q, cq), (k, ck), (v, cv) = (causal_depthwise_conv1d(s, w, initial_state=prev.get(name)) for s, w, name in
                                     zip(streams, (self.q_conv, self.k_conv, self.v_conv),
                                         ("conv_q", "conv_k", "conv_v")))
        q = F.normalize(F.silu(q).view(B, T, -1, dk), dim=-1)
        k = F.normalize(F.silu(k).view(B, T, -1, dk), dim=-1)
        v = F.silu(v).view(B, T, -1, dv)
        g = -torch.exp(self.A_log.float()) * F.softplus(self.w_a(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.w_b(x).float())
        if valid is not None:  # alpha = 1, nothing written: padding leaves the state untouched
            g = g.masked_fill(~valid[..., None], 0.0)
            beta = beta.masked_fill(~valid[..., None], 0.0)
        state0 = prev.get("state")
        scale = 1.0 / math.sqrt(dk)
        if state0 is not None and T == 1:
            o, state = gated_delta_rule_recurrent(q, k, v, g.to(q.dtype), beta.to(q.dtype), state0, scale)
        else:
            o, state = gated_delta_rule_chunked(q, k, v, g.to(q.dtype), beta.to(q.dtype), state0, scale,
                                                self.chunk_size)
        if slot is not None:
            slot.update(state=state, conv_q=cq, conv_k=ck, conv_v=cv)
        o = rms_norm(o, self.eps) * self.out_norm_weight
        o = o * F.silu(self.w_gate(x).view(B, T, -1, dv))
        return self.wo(o.reshape(B, T, -1))

    def extend_slot(self, dst: dict, src: dict, n_new: int):
        """exit_kv='copy': a skipped loop continues from the last computed loop's recurrent and conv states."""
        for name in self.state_names:
            dst[name] = src[name]


# Token mixers by name (megaloop/model/mixers.py). A mixer is built as Mixer(config, layer_idx), called as
# mixer(x, ctx, q_input=None, slot=None), keeps its per-(loop, layer) state in `slot`, and implements
# extend_slot(dst, src, n_new) for exit_kv='copy'.
MIXERS = {"attn": MegaloopAttention, "gdn": MegaloopGatedDeltaNet, "swa": MegaloopSlidingWindowAttention,
          "dsa": MegaloopSparseAttention}


def mixer_pattern(spec: str, n_layers: int, linear_mixer: str = "gdn") -> List[str]:
    """Mixer of each looped layer: one name, a comma list tiling the layers, or "N:M" (N linear, M attn)."""
    spec = str(spec)
    if ":" in spec:
        try:
            n_lin, n_attn = (int(v) for v in spec.split(":"))
        except ValueError:
            raise ValueError(f"MegaloopConfig.mixer ratio {spec!r} must look like 'N:M'") from None
        spec = ",".join([linear_mixer] * n_lin + ["attn"] * n_attn)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names or n_layers % len(names):
        raise ValueError(f"MegaloopConfig.mixer={spec!r} does not tile the {n_layers} looped layers")
    for n in names:
        if n not in MIXERS:
            raise ValueError(
                f"MegaloopConfig.mixer={spec!r} names the token mixer {n!r}, which this exported "
                f"modeling_megaloop.py does not implement (it has: {sorted(MIXERS)}). Re-export the "
                f"checkpoint with a megaloop version whose exporter supports {n!r}.")
    return names * (n_layers // len(names))


class MLP(nn.Module):
    def __init__(self, config: MegaloopConfig):
        super().__init__()
        d, f = config.d_model, config.ffn_hidden
        self.kind = config.mlp
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False) if config.mlp == "swiglu" else None
        self.w2 = nn.Linear(f, d, bias=False)

    # Copied from megaloop/model/layers.py:MLP.forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.w1(x)) * self.w3(x)
        else:
            h = F.relu(self.w1(x)).square()
        return self.w2(h)


class MegaloopLayer(nn.Module):
    def __init__(self, config: MegaloopConfig, layer_idx: int = 0, mixer: str = "attn"):
        super().__init__()
        eps, scale = config.norm_eps, config.norm_scale
        self.attn_norm = RMSNorm(config.d_model, eps, scale)
        self.mixer = MIXERS[mixer](config, layer_idx)
        self.mlp_norm = RMSNorm(config.d_model, eps, scale)
        self.mlp = MLP(config)
        self.sandwich = config.norm_style == "sandwich"
        self.huginn = config.norm_style == "huginn"  # x = N'(x + f(N x)): the stream itself is normalised
        if self.sandwich or self.huginn:
            self.attn_post_norm = RMSNorm(config.d_model, eps, scale)
            self.mlp_post_norm = RMSNorm(config.d_model, eps, scale)

    def forward(self, x, ctx, q_source=None, recall=None, recall_site="pre_mlp", slot=None):
        if recall is not None and recall_site == "pre_attn":
            x = x + recall
        h = self.attn_norm(x)
        q_in = self.attn_norm(q_source) if q_source is not None else None
        a = self.mixer(h, ctx, q_input=q_in, slot=slot)
        if self.sandwich:
            a = self.attn_post_norm(a)
        x = x + a
        if self.huginn:
            x = self.attn_post_norm(x)
        if recall is not None and recall_site == "pre_mlp":
            x = x + recall
        m = self.mlp(self.mlp_norm(x))
        if self.sandwich:
            m = self.mlp_post_norm(m)
        x = x + m
        return self.mlp_post_norm(x) if self.huginn else x


# ------------------------------------------------------------------------------------------------
# Injection (megaloop/model/injection.py)


# Copied from megaloop/model/injection.py:AddInjection
class AddInjection(nn.Module):
    def forward(self, s, e):
        return s + e


# Copied from megaloop/model/injection.py:ConcatAdapterInjection
class ConcatAdapterInjection(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.adapter = nn.Linear(2 * d, d, bias=False)

    def forward(self, s, e):
        return self.adapter(torch.cat([s, e], dim=-1))


class ParcaeInjection(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.zeros(d))
        self.B = nn.Parameter(torch.eye(d))

    # Copied from megaloop/model/injection.py:ParcaeInjection.coefficients
    def coefficients(self):
        delta = F.softplus(self.dt_bias.float())
        # Mathematically 0 < Abar < 1 for any parameters; in fp32, exp(-x) rounds to exactly 1 once
        # x < 6e-8. The floor keeps the guarantee numerically true: max|Abar| <= exp(-1e-6).
        a_bar = torch.exp(-(delta * torch.exp(self.A_log.float())).clamp_min(1e-6))
        return a_bar, delta

    # Copied from megaloop/model/injection.py:ParcaeInjection.forward
    def forward(self, s, e):
        a_bar, delta = self.coefficients()
        with torch.autocast(s.device.type, enabled=False):
            u = a_bar * s.float() + delta * F.linear(e.float(), self.B.float())
        return u.to(s.dtype)


class LoopedBlock(nn.Module):
    """Parameters of the shared looped layers and of how loops connect (names as in megaloop)."""

    def __init__(self, config: MegaloopConfig):
        super().__init__()
        names = mixer_pattern(config.mixer, config.n_loop, config.linear_mixer)
        self.layers = nn.ModuleList(MegaloopLayer(config, i, n) for i, n in enumerate(names))
        self.injection = None
        if config.arch == "recurrent":
            if config.injection == "add":
                self.injection = AddInjection()
            elif config.injection == "concat_adapter":
                self.injection = ConcatAdapterInjection(config.d_model)
            elif config.injection == "parcae":
                self.injection = ParcaeInjection(config.d_model)
        self.outer_norm = (RMSNorm(config.d_model, config.norm_eps, config.norm_scale)
                           if config.normalization == "outer" else None)
        self.rho = nn.Parameter(torch.zeros(config.max_loops, config.d_model)) if config.loop_residual_gate else None
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False) if config.injection == "parcae" else None


# ------------------------------------------------------------------------------------------------
# Cache


class MegaloopCache:
    """Keys/values per (segment, loop, layer): a dict slot each, filled by the mixers.

    Duck-types the bits of transformers' Cache interface that generate() reads."""

    is_compileable = False
    is_croppable = False

    def __init__(self):
        self.slots: Dict[Tuple, dict] = {}
        self.seq_len = 0
        self.num_loops: Optional[int] = None
        self.exit_mode: Optional[Tuple] = None

    # transformers' Cache API subset
    @property
    def is_linear(self):
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def get_max_cache_shape(self, layer_idx: int = 0):
        return -1

    def __len__(self):
        return len(self.slots)

    def slot(self, key: Tuple) -> dict:
        return self.slots.setdefault(key, {})

    def _map(self, fn):
        for slot in self.slots.values():
            for name, value in list(slot.items()):
                if torch.is_tensor(value):
                    slot[name] = fn(value)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda t: t[indices])


if _TF_MAJOR >= 5:  # transformers 5 names the cache output `cache` (and refuses `past_key_values` beside it)
    @dataclass
    class MegaloopCausalLMOutput(ModelOutput):
        loss: Optional[torch.FloatTensor] = None
        logits: Optional[torch.FloatTensor] = None
        cache: Optional[MegaloopCache] = None
        hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
        exit_loops: Optional[torch.LongTensor] = None  # (B, T), 1-based loop each token's logits come from
        loops_computed: Optional[int] = None  # iterations actually run in this call
        per_loop_logits: Optional[Tuple[torch.FloatTensor, ...]] = None
else:  # pragma: no cover - transformers 4.x reads `past_key_values`
    @dataclass
    class MegaloopCausalLMOutput(ModelOutput):
        loss: Optional[torch.FloatTensor] = None
        logits: Optional[torch.FloatTensor] = None
        past_key_values: Optional[MegaloopCache] = None
        hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
        exit_loops: Optional[torch.LongTensor] = None
        loops_computed: Optional[int] = None
        per_loop_logits: Optional[Tuple[torch.FloatTensor, ...]] = None

_CACHE_FIELD = "cache" if _TF_MAJOR >= 5 else "past_key_values"


# ------------------------------------------------------------------------------------------------
# The model


class MegaloopPreTrainedModel(PreTrainedModel):
    config_class = MegaloopConfig
    base_model_prefix = "megaloop"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MegaloopLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, MegaloopGatedDeltaNet):
            module.reset_parameters()
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own MegaloopCache


class MegaloopForCausalLM(MegaloopPreTrainedModel, GenerationMixin):
    if _TF_MAJOR >= 5:
        _tied_weights_keys = {"head.weight": "embedding.weight"}
    else:  # pragma: no cover
        _tied_weights_keys = ["head.weight"]

    def __init__(self, config: MegaloopConfig):
        super().__init__(config)
        config.check()
        d = config.d_model
        self.embedding = nn.Embedding(config.padded_vocab_size, d)
        self.embed_norm = RMSNorm(d, config.norm_eps, config.norm_scale) if config.embed_norm else None
        self.prelude = nn.ModuleList(MegaloopLayer(config, i) for i in range(config.n_prelude))
        self.prelude_norm = RMSNorm(d, config.norm_eps, config.norm_scale) if config.prelude_norm else None
        self.block = LoopedBlock(config)
        self.coda_norm = RMSNorm(d, config.norm_eps, config.norm_scale) if config.coda_norm else None
        self.coda = nn.ModuleList(MegaloopLayer(config, i) for i in range(config.n_coda))
        if getattr(config, "value_embeddings", False):
            attach_value_embeddings(self.prelude, self.block.layers, self.coda, config)
        self.final_norm = RMSNorm(d, config.norm_eps, config.norm_scale)
        self.head = nn.Linear(d, config.padded_vocab_size, bias=False)
        self.exit_gate = nn.Linear(d, 1) if config.exit_gate else None
        self._noise_table: Optional[torch.Tensor] = None
        self.post_init()
        if config.tie_word_embeddings:
            self.head.weight = self.embedding.weight

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    # --- pieces ---------------------------------------------------------------------------------
    def noise_for_positions(self, positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """noise_init='seeded': a truncated-normal row per position (std state_init_std, else init_std; cut at 3 std),
        drawn in 64-row chunks from generators seeded by (noise_seed, chunk): deterministic and the
        same whatever the sequence length, batch size or cache use."""
        cfg = self.config
        need = int(positions.max()) + 1 if positions.numel() else 1
        table = self._noise_table
        if table is None or table.shape[0] < need:
            rows = 64 * math.ceil(max(need, cfg.max_seq_len) / 64)
            chunks = []
            std = self._noise_std()
            for c in range(rows // 64):
                g = torch.Generator().manual_seed(int(cfg.noise_seed) * 1_000_003 + c)
                chunk = torch.empty(64, cfg.d_model)
                nn.init.trunc_normal_(chunk, std=std, a=-3 * std, b=3 * std,
                                      generator=g)
                chunks.append(chunk)
            table = self._noise_table = torch.cat(chunks)
        return table.to(like.device)[positions].to(like.dtype)

    def _noise_std(self) -> float:
        return getattr(self.config, "state_init_std", None) or self.config.init_std

    def _initial_state(self, e, positions):
        cfg = self.config
        if cfg.state_init == "embed":
            return e
        if cfg.state_init == "zeros" or cfg.noise_init == "zeros":
            return torch.zeros_like(e)
        if cfg.noise_init == "global_rng":  # exactly megaloop's draw
            std = self._noise_std()
            return nn.init.trunc_normal_(torch.empty_like(e), std=std, a=-3 * std, b=3 * std)
        return self.noise_for_positions(positions, e)

    def _run_loop_layers(self, t, x, ctx, cache, h_prev=None, recall=None):
        cfg, blk = self.config, self.block
        for i, layer in enumerate(blk.layers):
            q_src = None
            if h_prev is not None:
                if cfg.arch == "flt" or (cfg.arch == "lt_ia" and i == 0):
                    q_src = h_prev
                elif cfg.arch == "flt_res":
                    x = rms_norm(x + h_prev, cfg.norm_eps)
            rec = recall if (recall is not None and (i == 0 or cfg.internal_recall_layers == "all")) else None
            slot = cache.slot(("loop", t, i)) if cache is not None else None
            x = layer(x, ctx, q_source=q_src, recall=rec, recall_site=cfg.internal_recall_site, slot=slot)
        return x

    def _step(self, t, s, e, ctx, cache):
        """One loop iteration from state s = h(t-1): the raw output x(t) (megaloop's LoopedBlock.step)."""
        cfg, blk = self.config, self.block
        if cfg.arch == "recurrent":
            internal = cfg.recall == "internal"
            recall = e if internal else None
            u = s if (blk.injection is None or internal) else blk.injection(s, e)
            x = self._run_loop_layers(t, u, ctx, cache, recall=recall)
        else:
            h_prev = s if t > 0 else None
            x0 = e
            if cfg.arch == "lt_i" and h_prev is not None:
                x0 = rms_norm(e + h_prev, cfg.norm_eps)
            x = self._run_loop_layers(t, x0, ctx, cache, h_prev=h_prev)
        if blk.rho is not None and (cfg.arch == "recurrent" or t > 0):  # FLT family: h(0) = none
            x = x + blk.rho[min(t, blk.rho.shape[0] - 1)].type_as(x) * s
        return x

    def _carry(self, x):
        if self.block.outer_norm is None and not self.config.share_outer_final_norm:
            return x
        return self.final_norm(x) if self.config.share_outer_final_norm else self.block.outer_norm(x)

    def _head(self, x, ctx, cache, t):
        """Loop output (after out_proj) -> logits over the real vocabulary."""
        if self.coda_norm is not None:
            x = self.coda_norm(x)
        for i, layer in enumerate(self.coda):
            x = layer(x, ctx, slot=cache.slot(("coda", t, i)) if cache is not None else None)
        if not self.config.share_outer_final_norm:
            x = self.final_norm(x)
        logits = self.head(x)
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits[..., : self.config.vocab_size]

    def _context(self, input_ids, attention_mask, position_ids, past: int) -> AttnContext:
        B, T = input_ids.shape
        device = input_ids.device
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
        cos, sin = rope_for_positions(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = None
        if padded or (past > 0 and T > 1):
            q_pos = torch.arange(past, past + T, device=device)[:, None]
            k_pos = torch.arange(past + T, device=device)[None, :]
            allowed = (k_pos <= q_pos)[None, None].expand(B, 1, T, past + T)
            if padded:
                keys = attention_mask[:, -(past + T):].bool()[:, None, None, :]
                # a (padding) query always sees itself, so no row is empty
                allowed = (allowed & keys) | (k_pos == q_pos)[None, None]
            mask = allowed
        key_valid = attention_mask[:, -(past + T):].bool() if padded else None
        return AttnContext(cos, sin, mask, causal=(past == 0 and not padded), past=past,
                           key_valid=key_valid, positions=position_ids, tokens=input_ids), position_ids

    # --- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[MegaloopCache] = None,
        past_key_values: Optional[MegaloopCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        num_loops: Optional[int] = None,
        exit_strategy: Optional[str] = None,
        exit_threshold: Optional[float] = None,
        exit_kv: Optional[str] = None,
        output_per_loop_logits: bool = False,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> MegaloopCausalLMOutput:
        """input_ids (B, T). num_loops: R for this call (default config.num_loops).
        exit_strategy: None | "q_exit" | "kl" (default config.exit_strategy), exit_threshold likewise.
        labels: Hugging Face convention (shifted inside; -100 ignored)."""
        cfg = self.config
        if input_ids is None:
            raise ValueError("MegaloopForCausalLM needs input_ids (inputs_embeds are not supported)")
        R = int(cfg.num_loops if num_loops is None else num_loops)
        if R < 1:
            raise ValueError(f"num_loops must be >= 1, got {R}")
        strategy = cfg.exit_strategy if exit_strategy is None else exit_strategy
        if strategy in ("none", ""):
            strategy = None
        if strategy not in (None, "q_exit", "kl"):
            raise ValueError(f"unknown exit_strategy {strategy!r}; use None, 'q_exit' or 'kl'")
        if strategy == "q_exit" and self.exit_gate is None:
            raise ValueError("exit_strategy='q_exit' needs the exit gate (config.exit_gate=True)")
        threshold = cfg.exit_threshold if exit_threshold is None else exit_threshold
        if threshold is None:
            threshold = 0.5 if strategy == "q_exit" else 1e-3
        kv_mode = cfg.exit_kv if exit_kv is None else exit_kv
        if kv_mode not in ("copy", "compute"):
            raise ValueError(f"exit_kv must be 'copy' or 'compute', got {kv_mode!r}")

        cache = cache if cache is not None else past_key_values
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = MegaloopCache()
        if not use_cache:
            cache = None
        past = cache.seq_len if cache is not None else 0
        if cache is not None:
            mode = (strategy, kv_mode if strategy else None)
            if cache.num_loops is None:
                cache.num_loops, cache.exit_mode = R, mode
            elif cache.num_loops != R or cache.exit_mode != mode:
                raise ValueError(
                    f"this cache was filled with num_loops={cache.num_loops}, exit={cache.exit_mode}; it cannot "
                    f"continue with num_loops={R}, exit={mode} (its deeper loops have no keys/values). "
                    f"Start a new cache (generate() does) or keep the loop count fixed.")

        ctx, positions = self._context(input_ids, attention_mask, position_ids, past)
        B, T = input_ids.shape

        # embedding + prelude (+ prelude norm) -> e
        e = self.embedding(input_ids)
        if cfg.embed_scale != 1:  # Huginn: sqrt(d_model)
            e = e * cfg.embed_scale
        if self.embed_norm is not None:
            e = self.embed_norm(e)
        for i, layer in enumerate(self.prelude):
            e = layer(e, ctx, slot=cache.slot(("prelude", i)) if cache is not None else None)
        if self.prelude_norm is not None:
            e = self.prelude_norm(e)

        s = self._initial_state(e, positions) if cfg.arch == "recurrent" else e
        out_proj = self.block.out_proj
        per_loop_logits: List[torch.Tensor] = []
        hidden = [e] if output_hidden_states else None

        exit_loops = None
        cum_p = survive = prev_logp = None
        reached_at = None  # (B, T) 1-based exit loop, 0 = not yet
        computed = R
        for t in range(R):
            x = self._step(t, s, e, ctx, cache)
            last = t == R - 1
            s = self._carry(x) if (not last or cfg.share_outer_final_norm) else x
            if hidden is not None:
                hidden.append(s)
            if strategy is None and not output_per_loop_logits:
                continue
            y = s if cfg.share_outer_final_norm else x
            if out_proj is not None:
                y = out_proj(y)
            logits_t = self._head(y, ctx, cache, t)
            per_loop_logits.append(logits_t)
            if strategy is None:
                continue
            if strategy == "q_exit":
                lam = torch.sigmoid(self.exit_gate(y).squeeze(-1).float())
                if survive is None:
                    p, survive_before = lam, torch.ones_like(lam)
                else:
                    survive_before = survive
                    p = lam * survive_before
                survive = survive_before * (1 - lam)
                if last:
                    p = survive_before  # the last loop takes the remainder
                cum_p = p if cum_p is None else cum_p + p
                reached = cum_p >= threshold
            else:
                logp = F.log_softmax(logits_t.float(), dim=-1)
                if prev_logp is None:
                    reached = torch.zeros(B, T, dtype=torch.bool, device=logp.device)
                else:
                    kl = (logp.exp() * (logp - prev_logp)).sum(-1)
                    reached = kl < threshold
                prev_logp = logp
            if last:
                reached = torch.ones_like(reached)
            if reached_at is None:
                reached_at = torch.zeros(B, T, dtype=torch.long, device=reached.device)
            reached_at = torch.where((reached_at == 0) & reached, torch.full_like(reached_at, t + 1), reached_at)
            if kv_mode == "copy" and not last and bool((reached_at > 0).all()):
                computed = t + 1
                if cache is not None:
                    self._fill_skipped_loops(cache, t, R, T)
                break

        if strategy is not None:
            stacked = torch.stack(per_loop_logits)  # (computed, B, T, V)
            exit_loops = reached_at
            idx = (exit_loops - 1)[None, ..., None].expand(1, B, T, stacked.shape[-1])
            logits = torch.gather(stacked, 0, idx).squeeze(0)
        elif output_per_loop_logits:
            logits = per_loop_logits[-1]
        else:
            y = s
            if out_proj is not None:
                y = out_proj(y)
            logits = self._head(y, ctx, cache, R - 1)
        if strategy is None:
            exit_loops = torch.full((B, T), R, dtype=torch.long, device=input_ids.device)

        if cache is not None:
            cache.seq_len = past + T

        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100)
        return MegaloopCausalLMOutput(
            loss=loss, logits=logits, **{_CACHE_FIELD: cache},
            hidden_states=tuple(hidden) if hidden is not None else None, exit_loops=exit_loops,
            loops_computed=computed,
            per_loop_logits=tuple(per_loop_logits) if output_per_loop_logits else None)

    def _fill_skipped_loops(self, cache: MegaloopCache, t: int, R: int, n_new: int):
        """exit_kv='copy': loops t+1..R-1 were not run for these positions; their slots get loop t's
        newest keys/values (Huginn-style cache sharing across depth)."""
        for t2 in range(t + 1, R):
            for i, layer in enumerate(self.block.layers):
                src = cache.slot(("loop", t, i))
                layer.mixer.extend_slot(cache.slot(("loop", t2, i)), src, n_new)
            for i, layer in enumerate(self.coda):
                src = cache.slot(("coda", t, i))
                layer.mixer.extend_slot(cache.slot(("coda", t2, i)), src, n_new)

    # --- generation -----------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.seq_len > 0:
            input_ids = input_ids[:, cache.seq_len:]
        inputs = {"input_ids": input_ids, "past_key_values": cache, "attention_mask": attention_mask,
                  "use_cache": use_cache}
        for key in ("num_loops", "exit_strategy", "exit_threshold", "exit_kv"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def _reorder_cache(self, cache, beam_idx):  # transformers 4.x beam search
        cache.reorder_cache(beam_idx)
        return cache


__all__ = ["MegaloopForCausalLM", "MegaloopPreTrainedModel", "MegaloopCache", "MegaloopCausalLMOutput",
           "MIXERS"]
