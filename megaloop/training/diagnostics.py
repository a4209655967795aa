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

Layouts: any tensor parallelism (with or without sequence parallelism), any data parallelism, any
pipeline parallelism (ZeRO-3, train.compile and model.value_embeddings are refused by config validation).
Only data-parallel rank 0's model replica computes (on its micro-batch); its TP ranks run the diagnostics
together (the model's TP collectives, plus: under sequence parallelism the state's dot products summed
over TP; the per-loop gradients reduced like `.grad` (megaloop.parallel.apply_tp.tp_grad_reduction) and
their squared norms and dot products summed over TP counting each distinct element once,
megaloop.parallel.grad_norm's rule). Under pipeline parallelism (megaloop/training/pipeline_diagnostics.py)
all stages of that replica pass the micro-batch through by hand before the pipeline engine's step: the
stages before the looped block forward it without gradients, the looped stage computes the spectral norm
and input dependence from the block's input (fixed_point.block_spectral_norm / block_input_dependence)
and the per-loop gradients from the gradient the later stages (layers + the pipeline's loss) send back;
its TP rank 0 sends the numbers to the logging rank. Same numbers as one stage; extra cost under PP: the
stages run one after the other once (no overlap), one point-to-point transfer per stage boundary
(two after the looped block: its output and that output's gradient back) and the result to the logging rank.
The logging rank (last stage, DP 0, TP 0) writes a row {"step", "diagnostics": {...}} to metrics.jsonl and
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
    """Whether the looped block of `model` (a LoopedLM or the pipeline's LoopedBlockPipe) has DSA layers."""
    from megaloop.model.sparse_attention import DeepSeekSparseAttention
    return any(isinstance(m, DeepSeekSparseAttention) for m in model.block.modules())


def diag_due(step: int, interval: int) -> bool:
    """Whether 1-based step `step` is a diagnostic step."""
    return interval > 0 and step % interval == 0


class TrainingDiagnostics:
    """Built by the trainer only when train.diag_interval > 0. On diagnostic steps, with one stage `run`
    is called on every rank with the step's first micro-batch; it returns the numbers (on the ranks that
    computed them) and logs them on the logging rank. Under pipeline parallelism `run_pipeline` is
    called on every rank instead (before the pipeline engine's step)."""

    def __init__(self, cfg, state, model, logger, console: Callable[[str], None]):
        self.interval, self.seed = int(cfg.train.diag_interval), int(cfg.train.seed)
        self.model, self.logger = model, logger
        self.active = state.dp_rank == 0  # DP rank 0's TP group computes; the other replicas skip
        self.pipe = None
        if getattr(state, "pp_size", 1) > 1:  # every stage of DP replica 0 takes part (megaloop/training/pipeline_diagnostics.py)
            from megaloop.parallel.comm import TPComm
            from megaloop.training.pipeline_diagnostics import PipelineDiagnostics
            self.pipe = PipelineDiagnostics(cfg, state, model)
            comm = TPComm.from_state(state)
        else:
            comm = getattr(model, "tp_comm", None)
        self.comm = comm if (comm is not None and comm.size > 1) else None
        self.seq_comm = self.comm if (self.comm is not None and state.sequence_parallel) else None
        self.tp_rank = state.tp_rank
        self.spectral = not has_dsa(model if self.pipe is None else self.pipe.meta_model(cfg))
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

    def run_pipeline(self, step: int, batches):
        """PP > 1, called on every rank before the pipeline engine trains step `step`: DP replica 0's
        stages compute the diagnostics of the step's first micro-batch together (outside DeepSpeed's
        schedule) and the logging rank logs them. Returns the iterator the engine reads this step's
        micro-batches from (the first and last stages peek at the first micro-batch and put it back)."""
        import itertools
        batch = None
        if self.pipe.reads_batch:
            batch = next(batches)
            batches = itertools.chain([batch], batches)
        if not self.active:
            return batches
        result = self.pipe.run(batch, seed=self.seed + step, spectral=self.spectral, comm=self.comm,
                               seq_comm=self.seq_comm, tp_rank=self.tp_rank)
        if result is not None and "spectral_norm_skipped" in result:
            self.spectral = False
        result = self.pipe.to_logging_rank(result)
        if result is not None and "spectral_norm_skipped" in result and self.logger is not None:
            self.logger.console(f"warning: train.diag_interval: the loop map's spectral norm is skipped from now on "
                                f"(a kernel without forward-mode AD: {result['spectral_norm_skipped']})")
        if result is not None:
            log_diagnostics(self.logger, step, result)
        return batches


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
        sn, skipped = spectral_or_skipped(lambda: loop_map_spectral_norm(
            model, tokens, loops, iters=LANCZOS_STEPS, seed=seed, generator=gen(), seq_comm=seq_comm), spectral)
        dep = input_dependence(model, tokens, loops, seed=seed, generator=gen(), seq_comm=seq_comm)
        _, groups, grads = per_loop_grads(model, tokens, labels, loops, grad_loops, noise_generator=gen())
        norm, cos = grad_stats(model.block, grads, groups, comm, tp_rank)
        del grads
    finally:
        model.train(was_training)
    return diagnostics_result(loops, sn, skipped, dep, groups, norm, cos)


def spectral_or_skipped(fn, spectral: bool):
    """(fn() or None, None or why it was skipped): a kernel without forward-mode AD skips it."""
    if not spectral:
        return None, None
    try:
        return fn(), None
    except NotImplementedError as exc:  # a kernel without forward-mode AD (custom autograd.Function)
        return None, (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def grad_stats(block, grads: dict, groups, comm=None, tp_rank: int = 0):
    """contribution_stats of the per-loop gradients, with the TP reductions when comm is given."""
    counted, sum_over_ranks = None, None
    if comm is not None:
        grads, counted, sum_over_ranks = _tp_reductions(block, grads, comm, tp_rank)
    return contribution_stats(grads, groups, counted, sum_over_ranks)


def diagnostics_result(loops, sn, skipped, dep, groups, norm, cos) -> dict:
    """The numbers as plain Python values (the format compute_diagnostics documents); one host read."""
    scalars = torch.stack([dep.float()] + ([sn.float()] if sn is not None else [])).tolist()  # (one read)
    out = {"loops": int(loops), "loop_map_spectral_norm": scalars[1] if sn is not None else None,
           "input_dependence": scalars[0], "groups": groups,
           "grad_norm": norm.tolist(), "grad_cosine": [[_finite_or_none(c) for c in row] for row in cos.tolist()]}
    if skipped:
        out["spectral_norm_skipped"] = skipped
    return out


def _tp_reductions(block, grads: dict, comm, tp_rank: int):
    """Per-loop gradients made what `.grad` would hold on this TP rank (the TP grad hooks' reduction), the
    grad-norm counting rule, and the sum over the TP group (on the accelerator's device)."""
    from megaloop.parallel.apply_tp import tp_grad_reduction
    from megaloop.parallel.grad_norm import counts_toward_grad_norm
    params = dict(block.named_parameters())
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
