"""Value embeddings (model.value_embeddings; Parcae's reference, which takes them from karpathy/nanochat).

Every other layer of the stack prelude -> looped block -> coda, counted once (not unrolled) and always
including the last one, owns a token embedding table of the attention's key/value width. Its lookup is
gated into the attention's values, per kv head:

    v <- v + 2 * sigmoid(W_g x[..., :32]) * VE(tokens),   W_g: min(32, d) -> n_kv_heads, no bias

with x the layer's normalised input. W_g starts at zero, so the gate starts at exactly 1. A looped layer's
table is shared by all its loops (the token ids do not change between loops).
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn as nn

from megaloop.config import ModelConfig

GATE_CHANNELS = 32  # the gate reads the first min(32, d) channels of the layer's input


def has_value_embedding(layer: int, n_layers: int) -> bool:
    """Layer `layer` (0-based over the n_layers of the stack) has a table: alternate layers, the last always."""
    return layer % 2 == (n_layers - 1) % 2


def value_embedding_layers(cfg: ModelConfig) -> Iterator[Tuple[str, int]]:
    """(stack, index) of every layer with a value embedding: stack is prelude | loop | coda."""
    stacks = [("prelude", cfg.n_prelude), ("loop", cfg.n_loop), ("coda", cfg.n_coda)]
    n_layers = sum(n for _, n in stacks)
    offset = 0
    for stack, n in stacks:
        for i in range(n):
            if has_value_embedding(offset + i, n_layers):
                yield stack, i
        offset += n


class ValueEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.table = nn.Embedding(cfg.padded_vocab_size, cfg.kv_heads * cfg.attn_head_dim)
        self.gate_channels = min(GATE_CHANNELS, cfg.d_model)
        self.gate = nn.Linear(self.gate_channels, cfg.kv_heads, bias=False)
        self.gate.zero_init = True  # gate = 2 * sigmoid(0) = 1 at init

    def forward(self, v: torch.Tensor, x: torch.Tensor, tokens) -> torch.Tensor:
        """v: the values (B, Hkv, T, D); x: the layer's normalised input (B, T, d); tokens: (B, T) ids."""
        if tokens is None:
            raise ValueError("model.value_embeddings: this attention layer needs the token ids (tokens=...)")
        B, H, T, D = v.shape
        ve = self.table(tokens).view(B, T, H, D).transpose(1, 2)
        gate = 2 * torch.sigmoid(self.gate(x[..., :self.gate_channels]))  # (B, T, Hkv)
        return v + (gate.transpose(1, 2).unsqueeze(-1) * ve).to(v.dtype)


def attach_value_embeddings(prelude, block_layers, coda, cfg: ModelConfig) -> None:
    """Give each selected layer's attention its table and gate (before the model initialises its weights)."""
    stacks = {"prelude": prelude, "loop": block_layers, "coda": coda}
    for stack, i in value_embedding_layers(cfg):
        stacks[stack][i].mixer.value_embed = ValueEmbedding(cfg)
