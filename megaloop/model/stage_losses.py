"""The losses of the training stages after pretraining (`train.stage`), computed by `LoopedLM.forward`
when megaloop.training.stages has set the model's `train_stage` (and frozen all but what the stage trains).

dsa_warmup (DeepSeek-V3.2's dense warm-up): every DSA layer attends densely over all causal keys and its
    indexer is trained on KL(p_t || softmax(I(t, .))) over those keys, p_t the head-averaged dense
    attention distribution (detached); the loss is the mean of that KL over the DSA layers and loops.
    The LM's own loss plays no part (the main model is frozen and runs without a graph).
exit_gate (Ouro's stage II, "focused adaptive gate training"): the LM runs without gradients; per loop t
    its per-token loss L(t) (the stop-gradient loss), the loss improvement I(t) = max(0, L(t-1) - L(t)),
    the continuation target w(t) = sigmoid(k (I(t) - gamma)) (Ouro: k = 50, gamma = 0.005; config
    `train.exit_gate_slope`, `train.exit_gate_margin`), and the exit gate lambda(t) = sigmoid(gate(h(t)))
    trained with the binary cross-entropy -[w(t) log(1 - lambda(t)) + (1 - w(t)) log lambda(t)], averaged
    over the real tokens and the loops t = 2..R (loop 1 has no improvement to measure). So the gate
    learns to exit (lambda -> 1) where the loop it just ran improved the token loss by less than gamma.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def exit_gate_targets(token_losses: torch.Tensor, slope: float, margin: float) -> torch.Tensor:
    """(R, B, T) per-loop token losses -> (R-1, B, T) continuation targets w(t) for loops t = 2..R."""
    improvement = (token_losses[:-1] - token_losses[1:]).clamp_min(0.0)
    return torch.sigmoid(slope * (improvement - margin))


def exit_gate_bce(gate_logits: torch.Tensor, token_losses: torch.Tensor, labels: torch.Tensor,
                  slope: float, margin: float) -> torch.Tensor:
    """Ouro's stage-II loss. gate_logits (R, B, T): the exit gate's pre-sigmoid outputs (lambda =
    sigmoid), token_losses (R, B, T) without gradients, labels (B, T) (< 0 ignored). With R = 1 there is
    nothing to supervise: 0 (still attached to the gate's graph)."""
    R = gate_logits.shape[0]
    if R < 2:
        return gate_logits.sum() * 0.0
    w = exit_gate_targets(token_losses.detach().float(), slope, margin)
    # the exit probability's target is 1 - w: BCE(lambda, 1 - w) = -[(1 - w) log lambda + w log(1 - lambda)]
    bce = F.binary_cross_entropy_with_logits(gate_logits[1:].float(), 1.0 - w, reduction="none")
    mask = (labels >= 0).to(bce.dtype)
    return (bce * mask).sum() / (mask.sum() * (R - 1)).clamp_min(1.0)


def _dsa_layers(model):
    from megaloop.model.sparse_attention import DeepSeekSparseAttention
    return [m for m in model.modules() if isinstance(m, DeepSeekSparseAttention)]


def stage_forward(model, stage: str, tokens: torch.Tensor, labels: torch.Tensor, loops: int,
                  noise_generator: Optional[torch.Generator] = None):
    """LMOutput of one stage micro-batch: `.loss` the stage's loss, `.logits` the last loop's."""
    from megaloop.model.looped_lm import LMOutput
    rope = model.rope(tokens.shape[1], tokens.device, tokens)
    ve = tokens if model.cfg.value_embeddings else None  # the token ids, for value embeddings
    if stage == "dsa_warmup":
        layers = _dsa_layers(model)
        for m in layers:
            m.warmup_losses = []
        e = model.embed(tokens, rope)
        block_out = model.block(e, rope, loops, loops, final_norm=model.final_norm, generator=noise_generator,
                                tokens=ve)
        losses = [loss for m in layers for loss in m.warmup_losses]
        for m in layers:
            m.warmup_losses = []
        with torch.no_grad():
            logits = model.head_logits(block_out.out, rope, ve)
        return LMOutput(logits=logits, loss=torch.stack(losses).mean(), loops=loops)
    if stage == "exit_gate":
        slope, margin = model.stage_params["exit_gate_slope"], model.stage_params["exit_gate_margin"]
        with torch.no_grad():
            e = model.embed(tokens, rope)
            states = model.block(e, rope, loops, collect=True, final_norm=model.final_norm,
                                 generator=noise_generator, tokens=ve).per_loop
            token_losses, logits = [], None
            for s in states:
                logits = model.head_logits(s, rope, ve)
                token_losses.append(model.token_loss_fn(logits, labels))
        gate_logits = torch.stack([model.exit_gate(s.detach()).squeeze(-1) for s in states])
        loss = exit_gate_bce(gate_logits, torch.stack(token_losses), labels, slope, margin)
        return LMOutput(logits=logits, loss=loss, loops=loops)
    raise ValueError(f"unknown training stage {stage!r}")
