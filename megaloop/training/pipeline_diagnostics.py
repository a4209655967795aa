"""The training diagnostics (train.diag_interval, megaloop/training/diagnostics.py) under pipeline parallelism.

No stage holds the whole model: the looped block is one pipeline layer held by one stage (the "looped
stage"), the embedding before it and the loss after it may live on other stages. On a diagnostic step,
before the pipeline engine trains the step, every stage of data-parallel replica 0 (all its TP ranks)
processes the step's first micro-batch once, by hand, outside DeepSpeed's schedule:

  1. stages before the looped stage run their pipeline layers without gradients and send the result on
     (point-to-point over the global ranks of the pipeline group, device tensors, a shape/dtype header
     first);
  2. the looped stage runs its layers before the block (if any), then, from the block's input (the
     injected signal e and the loop counts), the spectral norm and input dependence on the block alone
     (fixed_point.block_spectral_norm / block_input_dependence, with the stage's rope and, for Ouro,
     the shared final norm);
  3. per-loop gradients: the looped stage runs the block with one copy of the shared parameters per loop
     (fixed_point.per_loop_copies) and its later layers, and sends the output on; the later stages run
     their layers and the last one the pipeline's own loss function (LoopLoss) and send d loss / d their
     input back, each with torch.autograd.grad w.r.t. their received input only (no `.grad` is touched);
     the looped stage backpropagates the received gradient into the per-loop copies;
  4. the looped stage's TP rank 0 sends the result (a small dict) to the logging rank (the last stage's
     DP 0 / TP 0) unless it is that rank.

All stages run in eval mode (no dropout) and draw nothing from the run's RNG (the random initial state
comes from the seeded generator, as with PP = 1): a run with diagnostics trains exactly like one without.
The numbers equal PP = 1's (same layers, same arithmetic; float rounding aside).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from megaloop.model.fixed_point import block_input_dependence, block_spectral_norm, per_loop_copies
from megaloop.model.loop_schedule import unpack_loops

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool]
_MAX_DIMS = 6


def send_tensors(tensors: List[torch.Tensor], dst: int, device) -> None:
    """Send a list of tensors to global rank `dst`: their count, then per tensor a header (dtype, ndim,
    shape) and the data. The receiver needs to know nothing (recv_tensors)."""
    dist.send(torch.tensor([len(tensors)], dtype=torch.long, device=device), dst)
    for t in tensors:
        head = [_DTYPES.index(t.dtype), t.dim(), *t.shape] + [0] * (_MAX_DIMS - t.dim())
        dist.send(torch.tensor(head, dtype=torch.long, device=device), dst)
        dist.send(t.detach().contiguous(), dst)


def recv_tensors(src: int, device) -> List[torch.Tensor]:
    n = torch.zeros(1, dtype=torch.long, device=device)
    dist.recv(n, src)
    out = []
    for _ in range(int(n.item())):
        head = torch.zeros(2 + _MAX_DIMS, dtype=torch.long, device=device)
        dist.recv(head, src)
        head = head.tolist()
        t = torch.empty(head[2:2 + head[1]], dtype=_DTYPES[head[0]], device=device)
        dist.recv(t, src)
        out.append(t)
    return out


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _unwrap(xs):
    return xs[0] if len(xs) == 1 else tuple(xs)


def first_depth_rows(tokens, loops, labels):
    """Per-sequence loop counts (loops (B, 2)): the rows sharing the first row's (R, R_grad), with the
    counts as one [R, R_grad] pair (what TrainingDiagnostics.run does with PP = 1). tokens / labels may be
    None (a stage that does not read them)."""
    if loops.dim() == 1:
        return tokens, loops, labels
    rows = ((loops[:, 0] == loops[0, 0]) & (loops[:, 1] == loops[0, 1])).nonzero().flatten()
    pick = (lambda x: None if x is None else x.index_select(0, rows.to(x.device)))
    return pick(tokens), loops[0].clone(), pick(labels)


class PipelineDiagnostics:
    """One stage's part (see the module docstring). module: this stage's PipelineModule."""

    def __init__(self, cfg, state, module):
        from megaloop.parallel.device import accelerator_device
        from megaloop.parallel.pipeline import LoopedBlockPipe, layer_names
        self.module, self.state = module, state
        self.device = accelerator_device()
        loop_index = layer_names(cfg.model).index("loop")
        parts = module.parts
        self.loop_stage = next(s for s in range(state.pp_size) if parts[s] <= loop_index < parts[s + 1])
        self.funcs = list(module.forward_funcs)
        self.loop_local = next((i for i, f in enumerate(self.funcs) if isinstance(f, LoopedBlockPipe)), None)
        self.layer = self.funcs[self.loop_local] if self.loop_local is not None else None
        s, ranks = state.pp_rank, state.pp_ranks
        self.prev = ranks[s - 1] if s > 0 else None
        self.next = ranks[s + 1] if s < state.pp_size - 1 else None
        self.log_rank = ranks[-1]  # the last stage of this pipeline (same DP and TP rank)
        # The first stage reads the tokens and loop counts, the last the labels (as the engine does).
        self.reads_batch = state.is_first_stage or state.is_last_stage

    @staticmethod
    def meta_model(cfg):
        """The full LoopedLM on the meta device (no memory): what every stage can ask about the model
        (e.g. whether the looped block has DSA layers) without holding it."""
        from megaloop.model.looped_lm import LoopedLM
        with torch.device("meta"):
            return LoopedLM(cfg.model)

    # ------------------------------------------------------------------------------------------
    def run(self, batch, seed: int, spectral: bool, comm=None, seq_comm=None, tp_rank: int = 0) -> Optional[dict]:
        """This stage's part; returns the diagnostics on the looped stage's ranks, else None."""
        from megaloop.training.diagnostics import LANCZOS_STEPS, diagnostics_result, grad_stats, spectral_or_skipped
        st, dev = self.state, self.device
        tokens = loops = labels = None
        if batch is not None:
            (tokens, loops), labels = batch
            tokens, loops, labels = first_depth_rows(tokens, loops, labels)
            tokens, loops, labels = tokens.to(dev), loops.to(dev), labels.to(dev)
        s, L = st.pp_rank, self.loop_stage
        was_training = self.module.training
        self.module.eval()

        def gen():
            return torch.Generator(device=dev).manual_seed(seed)

        def stage_input():
            return (tokens, loops) if s == 0 else _unwrap(recv_tensors(self.prev, dev))
        try:
            if s < L:  # before the looped stage: forward only
                with torch.no_grad():
                    x = stage_input()
                    for f in self.funcs:
                        x = f(x)
                send_tensors(list(_as_tuple(x)), self.next, dev)
                return None
            if s > L:  # after it: forward, then d loss / d input back
                self._backward_stage(labels)
                return None
            x = stage_input()
            with torch.no_grad():
                for f in self.funcs[:self.loop_local]:
                    x = f(x)
            e, loop_counts = x[0], x[1]  # (and with packed documents their ids, last)
            R, R_grad = unpack_loops(loop_counts)
            layer = self.layer
            block, rope, final_norm = layer.block, layer._rope(e, layer.doc_ids_of(x)), layer.final_norm
            sn, skipped = spectral_or_skipped(lambda: block_spectral_norm(
                block, e, rope, R, final_norm, iters=LANCZOS_STEPS, seed=seed, generator=gen(),
                seq_comm=seq_comm), spectral)
            dep = block_input_dependence(block, e, rope, R, final_norm, seed=seed, generator=gen(),
                                         seq_comm=seq_comm)
            with per_loop_copies(block, R) as copies:
                layer.noise_generator = gen()
                try:
                    y = layer(x)
                finally:
                    layer.noise_generator = None
            for f in self.funcs[self.loop_local + 1:]:
                y = f(y)
            if self.next is None:
                grads = copies.grads(self.module.loss_fn(y, labels))
            else:
                ys = list(_as_tuple(y))
                send_tensors(ys, self.next, dev)
                g = recv_tensors(self.next, dev)
                outs = [t for t in ys if t.is_floating_point()]
                pairs = [(o, gi) for o, gi in zip(outs, g) if o.requires_grad]
                grads = copies.grads([o for o, _ in pairs], [gi for _, gi in pairs])
            del y
            norm, cos = grad_stats(block, grads, copies.groups, comm, tp_rank)
            del grads
            return diagnostics_result(R, sn, skipped, dep, copies.groups, norm, cos)
        finally:
            self.module.train(was_training)

    def _backward_stage(self, labels) -> None:
        """A stage after the looped one: its layers with gradients w.r.t. the received input, the loss on
        the last stage (the pipeline's own loss_fn), the input's gradient sent back."""
        dev = self.device
        xs = recv_tensors(self.prev, dev)
        for t in xs:
            if t.is_floating_point():
                t.requires_grad_(True)
        x = _unwrap(xs)
        for f in self.funcs:
            x = f(x)
        if self.next is None:
            outputs, grad_outputs = [self.module.loss_fn(x, labels)], None
        else:
            ys = list(_as_tuple(x))
            send_tensors(ys, self.next, dev)
            g = recv_tensors(self.next, dev)
            pairs = [(o, gi) for o, gi in zip([t for t in ys if t.is_floating_point()], g) if o.requires_grad]
            outputs, grad_outputs = [o for o, _ in pairs], [gi for _, gi in pairs]
        inputs = [t for t in xs if t.is_floating_point()]
        got = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
        send_tensors([torch.zeros_like(t) if gi is None else gi for t, gi in zip(inputs, got)], self.prev, dev)

    def to_logging_rank(self, result: Optional[dict]) -> Optional[dict]:
        """The looped stage's TP rank 0 sends `result` to the logging rank; returns it there (None elsewhere
        off the looped stage; the looped stage keeps its own)."""
        st = self.state
        if self.loop_stage == st.pp_size - 1:
            return result
        if st.pp_rank == self.loop_stage and st.tp_rank == 0:
            dist.send_object_list([result], dst=self.log_rank, device=self.device)
            return None
        if st.pp_rank == st.pp_size - 1 and st.tp_rank == 0:
            box = [None]
            dist.recv_object_list(box, src=self.state.pp_ranks[self.loop_stage], device=self.device)
            return box[0]
        return None
