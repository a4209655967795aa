"""Vocab-parallel cross-entropy (Megatron's), and the other full-vocabulary reductions the looped
model needs under TP (successive-loop KL for Huginn's convergence exit), without any rank ever holding
full-vocabulary logits.

Each rank holds logits for its vocabulary slice [vocab_start, vocab_start + V/tp) of the padded
vocabulary. Padded columns (ids >= the real vocab size) are masked to the dtype's lowest value by the
TP model's `real_vocab_logits`, so they carry zero probability, exactly like the slice a one-process
model takes. Communication per call: one all-reduce (max) of B*T fp32 values and one all-reduce of
2*B*T fp32 values (target logit and sum of exponentials, fused), forward only; backward is local.
"""
from __future__ import annotations

import torch

from megaloop.parallel.comm import TPComm


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, comm: TPComm):
        x = logits.float()
        gmax = x.max(dim=-1).values
        comm.all_reduce(gmax, op="max", phase="forward")
        x = x - gmax.unsqueeze(-1)
        v_local = x.shape[-1]
        in_range = (labels >= vocab_start) & (labels < vocab_start + v_local)
        local_label = (labels - vocab_start).masked_fill(~in_range, 0)
        target = x.gather(-1, local_label.unsqueeze(-1)).squeeze(-1) * in_range
        exp = x.exp_()
        sum_exp = exp.sum(dim=-1)
        target, sum_exp = comm.all_reduce_many([target, sum_exp], phase="forward")
        valid = labels >= 0
        loss = (torch.log(sum_exp) - target) * valid
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, in_range, local_label, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, in_range, local_label, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_label.unsqueeze(-1), -in_range.unsqueeze(-1).to(grad.dtype))
        grad.mul_((grad_loss.float() * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, comm: TPComm,
                                 vocab_start: int = 0) -> torch.Tensor:
    """(B, T, V/tp) local logits, (B, T) global label ids -> per-token loss (B, T) in fp32, 0 where the
    label is negative (ignored). Equals `loop_losses.token_cross_entropy` on the gathered logits."""
    if comm.size == 1:
        from megaloop.model.loop_losses import token_cross_entropy
        return token_cross_entropy(logits, labels)
    return _VocabParallelCE.apply(logits, labels, int(vocab_start), comm)


class VocabParallelCrossEntropy:
    """`model.token_loss_fn` under TP: fn(local_logits, labels) -> (B, T)."""

    def __init__(self, comm: TPComm, vocab_start: int):
        self.comm, self.vocab_start = comm, int(vocab_start)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.comm, self.vocab_start)

    def __repr__(self) -> str:
        return f"VocabParallelCrossEntropy(tp={self.comm.size}, vocab_start={self.vocab_start})"


def vocab_parallel_log_softmax(logits: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """log_softmax over the full vocabulary of local shards (no grad; two all-reduces of B*T values).
    Returns this rank's slice of the log-probabilities."""
    with torch.no_grad():
        x = logits.float()
        gmax = comm.all_reduce(x.max(dim=-1, keepdim=True).values, op="max")
        x = x - gmax
        sum_exp = comm.all_reduce(x.exp().sum(dim=-1, keepdim=True))
        return x - torch.log(sum_exp)


class VocabParallelSuccessiveKL:
    """KL(p_t || p_{t-1}) over the full vocabulary for stacked per-loop local logits (R, B, T, V/tp)
    -> (R-1, B, T); the TP form of `loop_losses.successive_kl` (Huginn's convergence exit)."""

    def __init__(self, comm: TPComm):
        self.comm = comm

    def __call__(self, stacked: torch.Tensor) -> torch.Tensor:
        logp = vocab_parallel_log_softmax(stacked, self.comm)
        partial = (logp[1:].exp() * (logp[1:] - logp[:-1])).sum(-1)
        return self.comm.all_reduce(partial.contiguous())


def gather_vocab_logits(logits: torch.Tensor, comm: TPComm, vocab_size: int) -> torch.Tensor:
    """All-gather local vocab shards into (..., vocab_size) logits over the real vocabulary. For tests
    and evaluation only (it materialises the full-vocabulary logits)."""
    full = comm.all_gather(logits.detach(), dim=-1)
    return full[..., :vocab_size]
