"""Distillation from a frozen teacher (train.distill; LT2 / RADLADS: a per-loop KL warm-up, then the final loop).

    train:
      distill: {teacher: runs/teacher, schedule: per_loop_kl_then_last, kl_weight: 1.0, ce_weight: 0.0,
                temperature: 1.0, warmup_steps: 100}
      trainable: converted     # optional: only the converted mixers change during the warm-up

The teacher is read with megaloop.checkpoint.load_model from train.distill.teacher (any TP x PP x ZeRO layout or
a plain checkpoint), put on the rank's device, in eval mode, without gradients, in the run's precision (bf16 /
fp16 weights for DeepSpeed's bf16 / fp16 engines; fp32 weights under torch.autocast for the bf16 autocast
recipe). It is never part of the student's engine: not in its checkpoints, not in its optimizer. Its path is in
the run's config; a resumed run loads it again, so a resume is exact.

Each micro-batch, the teacher runs on the student's tokens with the student's loop count R and the same
truncated-backprop split (grad_loops), so loop t of the student is matched with loop t of the teacher for every
loop carrying gradients (whatever R the teacher was trained with: a looped model runs any R).
  warm-up (step < warmup_steps):  loss = kl_weight * mean_t KL_T(teacher(t) || student(t))
  afterwards:                     loss = kl_weight * KL_T(teacher(R) || student(R)) + ce_weight * CE
KL_T is the KL between softmax(z / T) of both, times T^2 (so gradients keep their scale across T), averaged over
the tokens with a label (labels < 0 are ignored); CE is the run's loop.loss cross-entropy.

Tensor parallelism: the teacher is replicated on every rank (not sharded; its memory is the price), gives full
vocabulary logits, and each rank takes the columns of its own vocabulary shard. The KL is vocab-parallel: the
student's log-normaliser over the shards is one differentiable all-reduce pair (max, sum), the cross term is
summed over the shards, so each rank's gradient w.r.t. its logit shard is exactly the one-process gradient's
slice. Pipeline parallelism is refused at config validation (the teacher would have to follow the student's
per-loop states through the stages).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from megaloop.config import Config, ConfigError


class _ShardedLogSumExp(torch.autograd.Function):
    """logsumexp over the full vocabulary of vocab-sharded logits (B, T, V/tp) -> (B, T); backward: the local
    softmax slice (the gradient of the full logsumexp w.r.t. this rank's logits)."""

    @staticmethod
    def forward(ctx, x, comm):
        x = x.float()
        m = x.max(dim=-1, keepdim=True).values
        if comm is not None:
            m = comm.all_reduce(m, op="max")
        s = (x - m).exp().sum(dim=-1, keepdim=True)
        if comm is not None:
            s = comm.all_reduce(s)
        lse = m + s.log()
        ctx.save_for_backward(x, lse)
        return lse.squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        x, lse = ctx.saved_tensors
        return grad.unsqueeze(-1) * (x - lse).exp(), None


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
               comm=None, vocab_start: int = 0) -> torch.Tensor:
    """T^2 * mean over labelled tokens of KL(softmax(teacher / T) || softmax(student / T)).

    student: (B, T, V_local) logits, this rank's vocabulary shard [vocab_start, vocab_start + V_local) under TP
    (padded columns at the dtype's lowest value), or all real columns; teacher: (B, T, V) over the full real
    vocabulary (no gradient). comm: the TP group (None: one process)."""
    T = float(temperature)
    with torch.no_grad():
        logp_t = F.log_softmax(teacher.float() / T, dim=-1)
        neg_entropy = (logp_t.exp() * logp_t).sum(-1)  # sum_v p log p, full vocabulary, no communication
        width = student.shape[-1]
        p_local = logp_t.exp()[..., vocab_start:vocab_start + width]
        if p_local.shape[-1] < width:  # padded vocabulary columns: probability 0
            p_local = F.pad(p_local, (0, width - p_local.shape[-1]))
    z = student.float() / T
    cross = (p_local * torch.where(p_local > 0, z, torch.zeros_like(z))).sum(-1)  # this shard's sum_v p z
    if comm is not None and comm.size > 1:
        total = comm.all_reduce(cross.detach().clone())
        cross = cross + (total - cross.detach())  # the full value; gradient through this shard's terms only
        lse = _ShardedLogSumExp.apply(z, comm)
    else:
        lse = torch.logsumexp(z, dim=-1)
    kl = neg_entropy - cross + lse
    mask = labels >= 0
    return (T * T) * (kl * mask).sum() / mask.sum().clamp_min(1)


class Distiller:
    """The frozen teacher of a run and the distillation loss of each student micro-batch."""

    def __init__(self, cfg: Config, module, device, console=print, rank: int = 0, world: int = 1):
        from megaloop.checkpoint import CheckpointError, load_model
        from megaloop.checkpoint.integrity import verified_by_rank0
        dc, t = cfg.train.distill, cfg.train
        self.cfg, self.dc = cfg, dc
        try:  # (collective: every rank reads the teacher, rank 0 alone checks its checksums)
            verify = verified_by_rank0(dc.teacher, verify=t.verify_checkpoints, rank=rank, world=world)
            teacher, tcfg = load_model(dc.teacher, verify=verify)
        except (CheckpointError, FileNotFoundError, OSError) as exc:
            raise ConfigError(f"train.distill.teacher={dc.teacher!r}: {exc}") from exc
        if tcfg.model.vocab_size != cfg.model.vocab_size:
            raise ConfigError(f"train.distill.teacher={dc.teacher!r} has model.vocab_size={tcfg.model.vocab_size}, "
                              f"the student {cfg.model.vocab_size}: teacher and student must share the tokenizer")
        if cfg.data.seq_len > tcfg.model.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the teacher's model.max_seq_len="
                              f"{tcfg.model.max_seq_len} (train.distill.teacher={dc.teacher!r})")
        self.autocast = t.precision == "bf16" and t.bf16_impl == "autocast"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
        teacher = teacher.to(device=device, dtype=torch.float32 if self.autocast else dtype).eval()
        teacher.requires_grad_(False)
        teacher.packing = getattr(module, "packing", None)  # packed documents: the student's boundaries
        self.teacher, self.device_type = teacher, torch.device(device).type
        self.comm = getattr(module, "tp_comm", None)
        self.vocab_start = int(getattr(module.embedding, "vocab_start", 0))
        n = sum(p.numel() for p in teacher.parameters())
        console(f"distillation teacher {dc.teacher}: {n / 1e6:.2f}M parameters, replicated on every rank, "
                f"{str(dtype).replace('torch.', '')}{' under autocast' if self.autocast else ''}")

    def teacher_logits(self, tokens, loops: int, grad_loops: Optional[int], per_loop: bool) -> List[torch.Tensor]:
        """The teacher's logits for the loops the student's loss sees (all loops carrying gradients, or the last)."""
        ctx = torch.autocast(self.device_type, torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            out = self.teacher(tokens, loops=loops, grad_loops=grad_loops, return_per_loop=per_loop)
        return out.per_loop_logits if per_loop else [out.logits]

    def kl(self, student, teacher, labels) -> torch.Tensor:
        return distill_kl(student, teacher, labels, self.dc.temperature, self.comm, self.vocab_start)

    def in_warmup(self, step: int) -> bool:
        return step < self.dc.warmup_steps

    def loss(self, engine, tokens, labels, loops: int, grad_loops: Optional[int], step: int,
             diagnostics: bool = False) -> Tuple[torch.Tensor, object, torch.Tensor]:
        """(loss to backpropagate, the student's LMOutput, detached [final-loop KL, per-loop KL ...]) of one
        micro-batch at optimizer step `step` (0-based). The per-loop KLs are there during the warm-up only."""
        warm = self.in_warmup(step)
        out = engine(tokens, labels=labels, loops=loops, grad_loops=grad_loops, return_diagnostics=diagnostics,
                     return_per_loop=warm)
        teacher = self.teacher_logits(tokens, loops, grad_loops, per_loop=warm)
        student = out.per_loop_logits if warm else [out.logits]
        kls = torch.stack([self.kl(s, t, labels) for s, t in zip(student, teacher)])
        if warm:
            loss = self.dc.kl_weight * kls.mean()
        else:
            loss = self.dc.kl_weight * kls[-1] + (self.dc.ce_weight * out.loss if self.dc.ce_weight else 0.0)
        logged = torch.cat([kls[-1:], kls if warm else kls[:0]]).detach()
        return loss, out, logged

    def valid_kl(self, engine, tokens, labels, loops: int) -> torch.Tensor:
        """The final loop's KL_T(teacher || student) of a validation micro-batch (no gradients)."""
        with torch.no_grad():
            out = engine(tokens, labels=labels, loops=loops)
            return self.kl(out.logits, self.teacher_logits(tokens, loops, None, per_loop=False)[0], labels)


def converted_mixer_parameter_names(module, cfg: Config) -> set:
    """train.trainable=converted: the parameters of the looped layers' token mixers that are not softmax
    attention (the converted ones, when the source was all attention)."""
    from megaloop.config import mixer_pattern
    m = cfg.model
    names = mixer_pattern(m.mixer, m.n_loop, m.linear_mixer)
    prefixes = tuple(f"block.layers.{i}.mixer." for i, n in enumerate(names) if n != "attn")
    return {name for name, _ in module.named_parameters() if name.startswith(prefixes)}
