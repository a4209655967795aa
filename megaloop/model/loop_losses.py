"""Losses over loop iterations, and exits at inference.

Per-token losses come from a `token_loss_fn(logits, labels) -> (B, T)` so tensor parallelism can swap
in its vocab-parallel cross-entropy. Labels < 0 are ignored.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> per-token loss (B, T) in fp32, 0 where the label is ignored."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().clamp_min(0), reduction="none")
    return loss.view_as(labels) * (labels >= 0)


def mean_token_loss(token_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_loss.sum() / (labels >= 0).sum().clamp_min(1)


def exit_distribution(lambdas: torch.Tensor) -> torch.Tensor:
    """Ouro: p(t) = lambda(t) * prod_{j<t} (1 - lambda(j)); the last loop takes the remainder.

    lambdas: (R, B, T) in (0, 1). Returns (R, B, T), summing to 1 over R."""
    survive = torch.cumprod(1 - lambdas, dim=0)
    survive_before = torch.cat([torch.ones_like(survive[:1]), survive[:-1]], dim=0)
    p = lambdas * survive_before
    return torch.cat([p[:-1], survive_before[-1:]], dim=0)


def loop_loss(mode: str, per_loop_logits: List[torch.Tensor], labels: torch.Tensor, token_loss_fn,
              exit_probs: Optional[torch.Tensor] = None, entropy_weight: float = 0.0) -> torch.Tensor:
    """mode: last | mean (all loops with outputs) | last_third | exit_weighted (Ouro stage I:
    sum_t p(t) * loss(t) - beta * H(p), per token)."""
    R = len(per_loop_logits)
    if mode == "last":
        chosen = per_loop_logits[-1:]
    elif mode == "mean":
        chosen = per_loop_logits
    elif mode == "last_third":
        chosen = per_loop_logits[R - max(1, math.ceil(R / 3)):]
    elif mode == "exit_weighted":
        if exit_probs is None:
            raise ValueError("loop loss 'exit_weighted' needs the exit gate (model.exit_gate=true)")
        token_losses = torch.stack([token_loss_fn(lg, labels) for lg in per_loop_logits])  # (R, B, T)
        expected = (exit_probs * token_losses).sum(0)
        entropy = -(exit_probs * torch.log(exit_probs.clamp_min(1e-12))).sum(0)
        mask = labels >= 0
        return ((expected - entropy_weight * entropy) * mask).sum() / mask.sum().clamp_min(1)
    else:
        raise ValueError(f"unknown loop loss {mode!r}")
    losses = [mean_token_loss(token_loss_fn(lg, labels), labels) for lg in chosen]
    return torch.stack(losses).mean()


def successive_kl(stacked: torch.Tensor) -> torch.Tensor:
    """(R, B, T, V) per-loop logits -> (R-1, B, T) KL(p_t || p_{t-1}) of the next-token distributions."""
    logp = F.log_softmax(stacked.float(), dim=-1)
    return (logp[1:].exp() * (logp[1:] - logp[:-1])).sum(-1)


def select_exit(per_loop_logits: List[torch.Tensor], strategy: str, threshold: Optional[float],
                exit_probs: Optional[torch.Tensor] = None, kl_fn=successive_kl):
    """Per token, pick the loop at which it exits and return (logits, exit_loop (1-based, (B, T))).

    q_exit: first t whose cumulative exit probability reaches `threshold` (Ouro's Q-exit).
    kl:     first t whose next-token distribution is within `threshold` KL of loop t-1's (Huginn);
            loop 1 never exits by this rule. Tokens that never meet the rule use the last loop.
    This evaluates exits on a full forward (for quality vs. average depth); the exported HF model
    stops computing early at generation time.
    """
    stacked = torch.stack(per_loop_logits)  # (R, B, T, V)
    if strategy not in ("q_exit", "kl"):
        raise ValueError(f"unknown exit strategy {strategy!r}; use 'q_exit' or 'kl'")
    if len(per_loop_logits) == 1:
        return per_loop_logits[0], torch.ones(stacked.shape[1:3], dtype=torch.long, device=stacked.device)
    if strategy == "q_exit":
        if exit_probs is None:
            raise ValueError("exit 'q_exit' needs the exit gate (model.exit_gate=true)")
        q = 0.5 if threshold is None else threshold
        reached = torch.cumsum(exit_probs, dim=0) >= q
    elif strategy == "kl":
        eps = 1e-3 if threshold is None else threshold
        kl = kl_fn(stacked)  # KL(p_t || p_{t-1}), (R-1, B, T); vocab-parallel under TP
        reached = torch.cat([torch.zeros_like(kl[:1], dtype=torch.bool), kl < eps], dim=0)
    reached[-1] = True
    exit_idx = reached.float().argmax(dim=0)  # first True, (B, T)
    logits = torch.gather(stacked, 0, exit_idx[None, ..., None].expand(1, *stacked.shape[1:])).squeeze(0)
    return logits, exit_idx + 1
