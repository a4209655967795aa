"""Gated DeltaNet token mixer (Yang et al. 2024; LT2's linear-time mixer, looped_models.md section 6).

    q, k, v = SiLU(short_conv(W_q x)), SiLU(short_conv(W_k x)), SiLU(short_conv(W_v x))   per head
    q, k    = L2-normalised per head
    g       = -exp(A_log) * softplus(W_a x + dt_bias)        (log-decay, alpha = exp(g))
    beta    = sigmoid(W_b x)
    o       = gated delta rule(q, k, v, g, beta)              (megaloop.ops.gated_delta)
    y       = W_o( RMSNorm_head(o) * SiLU(W_gate x) )         (gated output norm)

Projections keep the names the tensor-parallel step knows (wq/wk/wv/wo) plus w_a, w_b, w_gate: the
per-head quantities (W_a, W_b, A_log, dt_bias, the conv channels) are split with the heads. Head
counts are read from tensor shapes, so the module runs unchanged on a TP shard.

Across loops, each loop runs the scan from a zero state over the updated hidden states (as LT2 does).
Carrying the final state of loop k into loop k+1 would let position 0 of loop k+1 see every token of
the sequence, which breaks causality in training; a causal carry is an open design question.
With FLT's attention injection (q_input), queries come from the previous loop's stream.
Packed documents (data.reset_attention_mask; the ids ride in `rope`, megaloop/model/documents.py): the
short convolutions do not reach across a document start and the scan restarts from a zero state there.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaloop.config import ModelConfig
from megaloop.model.documents import doc_ids_of
from megaloop.model.layers import rms_norm
from megaloop.ops import causal_depthwise_conv1d, gated_delta_rule


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        self.head_k_dim = cfg.attn_head_dim
        self.head_v_dim = int(cfg.attn_head_dim * cfg.gdn_expand_v)
        self.chunk_size = cfg.gdn_chunk_size
        # Scan kernel (megaloop.ops.gated_delta.select_gdn_kernel). "auto" is the dispatcher's own
        # default and is not passed, so `gated_delta_rule` may be swapped for a plain function.
        self.kernel = getattr(cfg, "gdn_kernel", "auto")
        self._kernel_kwargs = {} if self.kernel == "auto" else {"kernel": self.kernel}
        self.eps = cfg.norm_eps
        self.wq = nn.Linear(d, H * self.head_k_dim, bias=False)
        self.wk = nn.Linear(d, H * self.head_k_dim, bias=False)
        self.wv = nn.Linear(d, H * self.head_v_dim, bias=False)
        self.w_a = nn.Linear(d, H, bias=False)  # decay input
        self.w_b = nn.Linear(d, H, bias=False)  # write strength beta
        self.w_gate = nn.Linear(d, H * self.head_v_dim, bias=False)
        self.wo = nn.Linear(H * self.head_v_dim, d, bias=False)
        self.wo.is_output_projection = True
        W = cfg.conv_size
        # Depthwise conv weights (channels, width), one per stream; values: init_parameter.
        self.q_conv = nn.Parameter(torch.empty(H * self.head_k_dim, W))
        self.k_conv = nn.Parameter(torch.empty(H * self.head_k_dim, W))
        self.v_conv = nn.Parameter(torch.empty(H * self.head_v_dim, W))
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.out_norm_weight = nn.Parameter(torch.empty(self.head_v_dim))
        for p in (self.A_log, self.dt_bias, self.out_norm_weight):
            p.no_weight_decay = True

    def init_parameter(self, name: str, shape, generator) -> torch.Tensor:
        """Initial values (megaloop/model/initial_values.py): the convs like nn.Conv1d's default; Mamba-2 /
        GDN's decay init, A in [1, 16] and dt in [1e-3, 1e-1] (log-uniform), dt_bias = softplus^-1(dt)."""
        if name.endswith("_conv"):
            bound = 1.0 / math.sqrt(shape[-1])
            return torch.empty(shape).uniform_(-bound, bound, generator=generator)
        if name == "A_log":
            return torch.empty(shape).uniform_(1, 16, generator=generator).log()
        if name == "dt_bias":
            dt = torch.exp(torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=generator))
            dt = dt.clamp_min(1e-4)
            return dt + torch.log(-torch.expm1(-dt))
        return torch.ones(shape)  # out_norm_weight

    def forward(self, x: torch.Tensor, rope=None, q_input: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        dk, dv = self.head_k_dim, self.head_v_dim
        doc_ids = doc_ids_of(rope)
        q, _ = causal_depthwise_conv1d(self.wq(x if q_input is None else q_input), self.q_conv, doc_ids=doc_ids)
        k, _ = causal_depthwise_conv1d(self.wk(x), self.k_conv, doc_ids=doc_ids)
        v, _ = causal_depthwise_conv1d(self.wv(x), self.v_conv, doc_ids=doc_ids)
        q = F.normalize(F.silu(q).view(B, T, -1, dk), dim=-1)
        k = F.normalize(F.silu(k).view(B, T, -1, dk), dim=-1)
        v = F.silu(v).view(B, T, -1, dv)
        g = -torch.exp(self.A_log.float()) * F.softplus(self.w_a(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.w_b(x).float())
        kwargs = self._kernel_kwargs if doc_ids is None else {**self._kernel_kwargs, "doc_ids": doc_ids}
        o, _ = gated_delta_rule(q, k, v, g.to(q.dtype), beta.to(q.dtype), scale=1.0 / math.sqrt(dk),
                                chunk_size=self.chunk_size, **kwargs)
        o = rms_norm(o, self.eps) * self.out_norm_weight
        o = o * F.silu(self.w_gate(x).view(B, T, -1, dv))
        return self.wo(o.reshape(B, T, -1))
