"""The building blocks every architecture shares: RMSNorm, RoPE, the MLPs and the transformer layer.

All linear maps are plain `nn.Linear` with conventional names (wq/wk/wv/wo, w1/w2/w3). Tensor
parallelism is applied afterwards by `megaloop.parallel` swapping these modules for column/row
parallel ones; the code here derives head counts from tensor shapes, so it runs unchanged on a
shard.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaloop.config import ModelConfig
from megaloop.model.documents import docs_of
from megaloop.ops.fused import rms_norm_affine


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMSNorm, computed in fp32 for stability."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """rms_norm(x) * weight; the kernel (Apex's fused one on CUDA when importable, else torch's) is
    picked once per device/dtype by megaloop.ops.fused, which documents the numerics."""

    def __init__(self, dim: int, eps: float = 1e-6, scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None

    def init_parameter(self, name: str, shape, generator) -> torch.Tensor:
        return torch.ones(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_affine(x, self.weight, self.eps)


def rope_for_positions(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin of shape (..., head_dim/2) for integer positions of any shape (...)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None, offset: int = 0):
    """cos/sin of shape (seq_len, head_dim/2) for positions offset..offset+seq_len-1."""
    return rope_for_positions(torch.arange(offset, offset + seq_len, device=device), head_dim, theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by position, halves layout (as Llama's HF port); cos/sin (T, D/2) or (B, T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over the heads
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query softmax attention, the default token mixer; bidirectional (every query
    sees every key) with model.causal=false.

    `q_input` lets the query come from another stream than keys/values: the Fully Looped
    Transformer's attention injection (Q from the previous loop's output, K/V from the current
    stream). Causality is unchanged: query t still only sees keys <= t (all keys when not causal).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        d, hd = cfg.d_model, cfg.attn_head_dim
        self.head_dim = hd
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.wo.is_output_projection = True  # zero-init target; see init_weights
        self.q_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_scale) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_scale) if cfg.qk_norm else None
        # LT2's zero-init sigmoid output gate (gate = 0.5 at init, learned per channel).
        self.gate = nn.Linear(d, cfg.n_heads * hd, bias=False) if cfg.attn_output_gate else None
        if self.gate is not None:
            self.gate.zero_init = True
        self.dropout = cfg.dropout
        self.causal = getattr(cfg, "causal", True)
        self.value_embed = None  # model.value_embeddings: set on the chosen layers (megaloop/model/value_embeddings.py)

    def forward(self, x: torch.Tensor, rope, q_input: Optional[torch.Tensor] = None, tokens=None):
        """rope: (cos, sin), or a RopeCache that also carries packed documents (megaloop/model/documents.py)."""
        q, k, v = self.project(x, q_input, rope[0], rope[1])
        if self.value_embed is not None:
            v = self.value_embed(v, x, tokens)
        docs = docs_of(rope)
        if docs is not None:  # (a plain call otherwise: subclasses' attend need not know docs)
            return self.output(self.attend(q, k, v, x=x, q_input=q_input, docs=docs), x)
        return self.output(self.attend(q, k, v, x=x, q_input=q_input), x)

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

    def output(self, y, x):
        """Attention output (B, H, T, D) -> (B, T, d): heads merged, LT2's output gate, W_o."""
        B, H, T, D = y.shape
        y = y.transpose(1, 2).reshape(B, T, H * D)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return self.wo(y)

    def attend(self, q, k, v, x=None, q_input=None, docs=None):
        """(B, H, T, D) queries, (B, Hkv, T, D) keys/values -> (B, H, T, D). Sparse variants override
        this; x and q_input are the (normalised) streams, for mixers that score keys themselves.
        docs: packed documents (data.reset_attention_mask): a query sees the earlier keys of its own
        document only, through SDPA's boolean mask built once per micro-batch (`Documents.attn_mask`)."""
        dropout = self.dropout if self.training else 0.0
        if docs is not None and docs.attn_mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.attn_mask, dropout_p=dropout,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, enable_gqa=q.shape[1] != k.shape[1], dropout_p=dropout)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.d_model, cfg.ffn_dim
        self.kind = cfg.mlp
        self.w1 = nn.Linear(d, f, bias=False)  # gate (swiglu) or the only up-projection (relu2)
        self.w3 = nn.Linear(d, f, bias=False) if cfg.mlp == "swiglu" else None  # up
        self.w2 = nn.Linear(f, d, bias=False)  # down
        self.w2.is_output_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.w1(x)) * self.w3(x)
        else:  # ReLU^2 (Parcae, modded-nanoGPT)
            h = F.relu(self.w1(x)).square()
        return self.w2(h)


class TransformerLayer(nn.Module):
    """Residual layer in one of three norm styles (model.norm_style), N = attn_norm / mlp_norm, N' = the post norms:
      pre       x = x + mixer(N x);      x = x + mlp(N x)
      sandwich  x = x + N'(mixer(N x));  x = x + N'(mlp(N x))       (Ouro)
      huginn    x = N'(x + mixer(N x));  x = N'(x + mlp(N x))       (Huginn's block: the stream itself is normalised)

    Hooks for the looped architectures, all optional:
      q_source  - stream the attention query comes from (FLT attention injection); it is
                  normalised with this layer's own attention norm, like the keys.
      recall    - the input embedding added into the residual stream before the attention or
                  the MLP (internal recall).
      tokens    - the token ids, for an attention with a value embedding (model.value_embeddings).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, mixer: Optional[nn.Module] = None):
        super().__init__()
        eps, scale = cfg.norm_eps, cfg.norm_scale
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.d_model, eps, scale)
        self.mixer = mixer if mixer is not None else Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, eps, scale)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.norm_style == "sandwich"
        self.huginn = cfg.norm_style == "huginn"
        if self.sandwich or self.huginn:
            self.attn_post_norm = RMSNorm(cfg.d_model, eps, scale)
            self.mlp_post_norm = RMSNorm(cfg.d_model, eps, scale)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, rope, q_source=None, recall=None, recall_site="pre_mlp", tokens=None):
        if recall is not None and recall_site == "pre_attn":
            x = x + recall
        h = self.attn_norm(x)
        q_in = self.attn_norm(q_source) if q_source is not None else None
        if getattr(self.mixer, "value_embed", None) is not None:  # model.value_embeddings: the token ids too
            a = self.mixer(h, rope, q_input=q_in, tokens=tokens)
        else:
            a = self.mixer(h, rope, q_input=q_in)
        if self.sandwich:
            a = self.attn_post_norm(a)
        x = x + self.dropout(a)
        if self.huginn:
            x = self.attn_post_norm(x)
        if recall is not None and recall_site == "pre_mlp":
            x = x + recall
        m = self.mlp(self.mlp_norm(x))
        if self.sandwich:
            m = self.mlp_post_norm(m)
        x = x + self.dropout(m)
        return self.mlp_post_norm(x) if self.huginn else x
