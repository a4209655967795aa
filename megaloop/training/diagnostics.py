"""Fixed-point and per-loop gradient diagnostics of the looped block during training (issue 13), every
`train.diag_interval` steps; off (0, the default) nothing here is built or called.

On a diagnostic step (steps N, 2N, ...; 1-based, as logged) the trainer hands over the step's FIRST
micro-batch before training on it, so the numbers are taken at the weights the step's gradient is computed
at, on data the run trains on (a fixed held-out batch would compare steps better but needs its own data
path; the micro-batch's own loop count R is used; with per-sequence counts, loop.granularity=sequence,
the rows sharing the first row's R and gradient loops). They are computed on the bare model (outside the
DeepSpeed engine: no autocast, in the weights' dtype), in eval mode (no dropout), with a random initial
state (state_init=noise) drawn from a generator seeded by (train.seed, step): the run's own random streams
and its `.grad` are untouched, so a run with diagnostics trains exactly like one without.

  loop_map_spectral_norm  sigma_max of the loop map's Jacobian d h(R+1)/d h(R) at the last iterate
                          (8 Lanczos steps on J^T J; megaloop.model.fixed_point). Skipped, with one
                          warning at start-up, for models with DSA layers (its sparse-attention kernel has
                          no forward-mode AD), and from the first failure on, with one warning, when
                          another kernel lacks forward-mode AD (NotImplementedError; e.g. an external
                          GPU kernel).
  input_dependence        ||h(R)(e + eps u) - h(R)(e)|| / eps for a random unit direction u of the
                          injected signal e.
  per-loop gradients      for every loop t and every group of the shared block's parameters (layer i of
                          the looped block, the injection): the norm of loop t's contribution to the
                          group's gradient (the R contributions sum to the gradient of the loss on this
                          micro-batch) and its cosine with loop t-1's contribution.

Cost of one diagnostic step, in loop-step evaluations of the micro-batch (one loop step = one pass
through the n_loop looped layers; B x T = the micro-batch):
  spectral norm    R (no grad) + 1 (graph kept) + 8 forward-mode JVPs (~1 loop step forward each) + 8
                   VJPs (~1 loop step backward each); memory: one loop step's activations (attention on
                   SDPA's math kernel: (T x T) scores per head) + 9 float32 vectors of B x T x d_model.
  input dependence 2 R loop steps without grad (+ two embeddings); no extra memory to speak of.
  per-loop grads   one forward + backward of the micro-batch (about one more micro-batch of training);
                   memory: 2 R copies of the shared block's parameters (per-loop copies and their
                   gradients) + that micro-batch's activations.
Measured (benchmarks/bench_diagnostics.py, CPU, fp32, tiny lt config, micro-batch 4 x 64): with d_model 64,
R 4 the spectral norm costs 6.8x the micro-batch's forward + backward, the input dependence 0.6x, the
per-loop gradients 1.1x (all 8.5x); with d_model 128, R 8: 2.7x, 0.6x, 1.1x (4.4x). Forward-mode AD is
the dear part; its share shrinks as R grows. One host read of the results per diagnostic step.

Layouts: pipeline_parallel 1 (PP > 1, ZeRO-3, train.compile and model.value_embeddings are refused by
config validation), any
tensor parallelism (with or without sequence parallelism), any data parallelism. Only data-parallel
rank 0's TP group computes (on its micro-batch); its TP ranks run the diagnostics together (the model's
TP collectives, plus: under sequence parallelism the state's dot products summed over TP; the per-loop
gradients reduced like `.grad` (megaloop.parallel.apply_tp.tp_grad_reduction) and their squared norms and
dot products summed over TP counting each distinct element once, megaloop.parallel.grad_norm's rule).
The logging rank (DP 0, TP 0) writes a row {"step", "diagnostics": {...}} to metrics.jsonl and
TensorBoard scalars diag/loop_map_spectral_norm, diag/input_dependence,
diag/grad_norm/<group>/loopNN, diag/grad_cosine/<group>/loopNN (from loop 2).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from megaloop.model.fixed_point import (contribution_stats, input_dependence, loop_map_spectral_norm,
                                        per_loop_grads)

LANCZOS_STEPS = 8


def has_dsa(model) -> bool:
    from megaloop.model.sparse_attention import DeepSeekSparseAttention
    return any(isinstance(m, DeepSeekSparseAttention) for m in model.block.modules())


def diag_due(step: int, interval: int) -> bool:
    """Whether 1-based step `step` is a diagnostic step."""
    return interval > 0 and step % interval == 0


class TrainingDiagnostics:
    """Built by the trainer only when train.diag_interval > 0. `run` is called on every rank of the
    looped stage with the step's first micro-batch on diagnostic steps; it returns the numbers (on the
    ranks that computed them) and logs them on the logging rank."""

    def __init__(self, cfg, state, model, logger, console: Callable[[str], None]):
        self.interval, self.seed = int(cfg.train.diag_interval), int(cfg.train.seed)
        self.model, self.logger = model, logger
        self.active = state.dp_rank == 0  # DP rank 0's TP group computes; the other replicas skip
        comm = getattr(model, "tp_comm", None)
        self.comm = comm if (comm is not None and comm.size > 1) else None
        self.seq_comm = self.comm if (self.comm is not None and state.sequence_parallel) else None
        self.tp_rank = state.tp_rank
        self.spectral = not has_dsa(model)
        if not self.spectral:
            console("warning: train.diag_interval: the loop map's spectral norm is skipped for this model "
                    "(DSA's sparse attention has no forward-mode AD); the other diagnostics are logged")

    def due(self, step: int) -> bool:
        return diag_due(step, self.interval)

    def run(self, step: int, tokens: torch.Tensor, labels: torch.Tensor, loops, grad_loops=None) -> Optional[dict]:
        """loops, grad_loops: ints, or (B,) per-row counts (loop.granularity=sequence): then the rows that
        share the first row's (R, R_grad) are the batch (each row trains as if run alone)."""
        if not self.active:
            return None
        if torch.is_tensor(loops) and loops.dim() > 0:
            total, grad = loops.cpu(), grad_loops.cpu()
            rows = ((total == total[0]) & (grad == grad[0])).nonzero().flatten().to(tokens.device)
            tokens, labels = tokens.index_select(0, rows), labels.index_select(0, rows)
            loops, grad_loops = int(total[0]), int(grad[0])
        result = compute_diagnostics(self.model, tokens, labels, loops, grad_loops, seed=self.seed + step,
                                     spectral=self.spectral, comm=self.comm, seq_comm=self.seq_comm,
                                     tp_rank=self.tp_rank)
        if "spectral_norm_skipped" in result:  # (every TP rank runs the same kernels: all skip alike)
            self.spectral = False
            if self.logger is not None:
                self.logger.console(f"warning: train.diag_interval: the loop map's spectral norm is skipped from now on "
                                    f"(a kernel without forward-mode AD: {result['spectral_norm_skipped']})")
        log_diagnostics(self.logger, step, result)
        return result


def compute_diagnostics(model, tokens: torch.Tensor, labels: torch.Tensor, loops: int,
                        grad_loops: Optional[int] = None, seed: int = 0, spectral: bool = True,
                        comm=None, seq_comm=None, tp_rank: int = 0) -> dict:
    """The diagnostics of one micro-batch (see the module docstring), as plain Python numbers:
    {"loops", "loop_map_spectral_norm" (None when skipped), "input_dependence", "groups",
    "grad_norm" [loop][group], "grad_cosine" [loop][group] (None for loop 1 and where a norm is 0)}.
    comm: the model's TP group (None: one process); seq_comm: the same under sequence parallelism."""
    was_training = model.training
    model.eval()
    device = tokens.device

    def gen():
        return torch.Generator(device=device).manual_seed(seed)
    try:
        sn, skipped = None, None
        if spectral:
            try:
                sn = loop_map_spectral_norm(model, tokens, loops, iters=LANCZOS_STEPS, seed=seed, generator=gen(),
                                            seq_comm=seq_comm)
            except NotImplementedError as exc:  # a kernel without forward-mode AD (custom autograd.Function)
                skipped = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        dep = input_dependence(model, tokens, loops, seed=seed, generator=gen(), seq_comm=seq_comm)
        _, groups, grads = per_loop_grads(model, tokens, labels, loops, grad_loops, noise_generator=gen())
        counted, sum_over_ranks = None, None
        if comm is not None:
            grads, counted, sum_over_ranks = _tp_reductions(model, grads, comm, tp_rank)
        norm, cos = contribution_stats(grads, groups, counted, sum_over_ranks)
        del grads
    finally:
        model.train(was_training)
    scalars = torch.stack([dep.float()] + ([sn.float()] if sn is not None else [])).tolist()  # (one read)
    out = {"loops": int(loops), "loop_map_spectral_norm": scalars[1] if sn is not None else None,
           "input_dependence": scalars[0], "groups": groups,
           "grad_norm": norm.tolist(), "grad_cosine": [[_finite_or_none(c) for c in row] for row in cos.tolist()]}
    if skipped:
        out["spectral_norm_skipped"] = skipped
    return out


def _tp_reductions(model, grads: dict, comm, tp_rank: int):
    """Per-loop gradients made what `.grad` would hold on this TP rank (the TP grad hooks' reduction), the
    grad-norm counting rule, and the sum over the TP group (on the accelerator's device)."""
    from megaloop.parallel.apply_tp import tp_grad_reduction
    from megaloop.parallel.grad_norm import counts_toward_grad_norm
    params = dict(model.block.named_parameters())
    reduced = {}
    for name, g in grads.items():
        reduce = tp_grad_reduction(params[name], comm)
        reduced[name] = g if reduce is None else reduce(g)

    def counted(name: str) -> bool:
        return counts_toward_grad_norm(params[name], tp_rank)

    def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(t)  # (t lives where the gradients do: the accelerator's device)
    return reduced, counted, sum_over_ranks


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


def log_diagnostics(logger, step: int, d: dict) -> None:
    """metrics.jsonl row and TensorBoard scalars (a no-op off the logging rank)."""
    if logger is None or not logger.active:
        return
    scalars = {"loop_map_spectral_norm": d["loop_map_spectral_norm"], "input_dependence": d["input_dependence"]}
    for t, (norms, coss) in enumerate(zip(d["grad_norm"], d["grad_cosine"])):
        for g, n, c in zip(d["groups"], norms, coss):
            scalars[f"grad_norm/{g}/loop{t + 1:02d}"] = n
            if c is not None:
                scalars[f"grad_cosine/{g}/loop{t + 1:02d}"] = c
    logger.scalars(step, scalars, prefix="diag/")
    logger.record({"step": step, "diagnostics": d})
