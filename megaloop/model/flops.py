"""FLOP accounting for a looped LM: per-token forward cost of each piece, used for the achieved FLOP/s
(model FLOPs: recomputation from activation checkpointing is not counted) and to weigh pipeline stages.
Mixers other than softmax attention are costed like attention (an approximation; the projections
dominate at the sizes we train)."""
from __future__ import annotations

from megaloop.config import Config, ModelConfig


def layer_params(m: ModelConfig) -> int:
    hd = m.attn_head_dim
    attn = m.d_model * m.n_heads * hd * 2 + m.d_model * m.kv_heads * hd * 2
    mlp = (3 if m.mlp == "swiglu" else 2) * m.d_model * m.ffn_dim
    return attn + mlp


def layer_forward_flops(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one transformer layer: 2 x matmul params + causal attention scores
    (QK^T and AV over on average seq_len/2 keys: 2 * 2 * (T/2) * heads * head_dim; all seq_len keys
    with model.causal=false)."""
    score_len = seq_len if getattr(m, "causal", True) else 2 * seq_len
    return 2.0 * layer_params(m) + 2.0 * score_len * m.n_heads * m.attn_head_dim


def head_forward_flops(m: ModelConfig) -> float:
    return 2.0 * m.d_model * m.padded_vocab_size


def train_flops_per_token(cfg: Config, loops_total: float, loops_grad: float, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward for the parts that carry
    gradients, 1x for loops run under no_grad)."""
    m = cfg.model
    lf = layer_forward_flops(m, seq_len)
    outside = (m.n_prelude + m.n_coda) * lf + head_forward_flops(m)
    loop_grad = m.n_loop * lf * loops_grad
    loop_nograd = m.n_loop * lf * (loops_total - loops_grad)
    return 3.0 * (outside + loop_grad) + loop_nograd


def pipeline_layer_weights(cfg: Config, names, expected_total: float, expected_grad: float) -> list:
    """Relative cost (forward+backward+recompute) of each pipeline layer, by name.

    The looped block is one layer but costs n_loop x R layers: weighing by parameters would give it the
    weight of n_loop layers, and put the (parameter-heavy, compute-light) embedding alone on a stage."""
    m = cfg.model
    lf = layer_forward_flops(m, cfg.data.seq_len)
    recompute = 1.0 if cfg.train.activation_checkpointing != "none" else 0.0
    eps = 1e-3 * lf
    weights = []
    for name in names:
        if name == "loop":
            w = m.n_loop * lf * ((expected_total - expected_grad) + (3.0 + recompute) * expected_grad)
        elif name in ("prelude", "coda"):
            w = 3.0 * lf
        elif name == "head":
            w = 3.0 * head_forward_flops(m)
        else:  # embedding lookup, norms
            w = eps
        weights.append(w)
    return weights
