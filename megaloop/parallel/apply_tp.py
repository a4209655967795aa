"""The "parallelize" step: turn an initialised one-process LoopedLM into this rank's TP shard, in place.

    model = build_model(cfg)                      # same seed on every rank: same full weights
    state = build_parallel_state(cfg.parallel)
    apply_tensor_parallel(model, state)           # swaps modules, keeps this rank's shard
    ...
    loss.backward()                               # partial gradients are summed by the TP grad hooks

Nothing in the model code is rewritten: its linear maps are swapped for column/row-parallel ones,
the embedding and LM head for vocab-parallel ones, and Megatron's `f` operator is attached as a
forward pre-hook at the entry of each sharded sub-layer (torchtitan's "PrepareModuleInput"; the
per-module plans are in megaloop/parallel/tp_plans.py), so that one `f` serves every projection that reads the same input. Per transformer layer and per loop
iteration this gives exactly Megatron's communication: forward one all-reduce after the attention
output projection and one after the MLP down projection (`g`), backward one all-reduce of the
attention input gradient and one of the MLP input gradient (`f`). The loop adds nothing: everything
between layers (injection, outer norm, gates, exit gate) is replicated and computed identically on
every TP rank. FLT's attention injection feeds the previous loop's stream to the same column-parallel
wq; its `f` is fused with the key/value stream's into the same single backward all-reduce.

PARTITION CONVENTION (also `tp_partition_info(model)`, `partition_info_for(cfg, tp)`,
`merge_tp_shards`, `shard_state_dict`). Names are those of the one-process model's state_dict; rank
r of tp holds the r-th contiguous block along `dim`:

  dim 0, column-parallel (output features, by whole heads):
      *.mixer.wq.weight, *.mixer.gate.weight (attention output gate)       heads  H/tp per rank
      *.mixer.wk.weight, *.mixer.wv.weight                                 kv heads KV/tp per rank, or,
            when KV < tp, kv-replicated: rank r holds kv head r // (tp/KV) (the kv head its q heads
            use); Partition.replicas = tp/KV and merging takes ranks 0, tp/KV, 2*tp/KV, ...
      *.mlp.w1.weight, *.mlp.w3.weight                                     ffn/tp per rank
      GDN (mixer "gdn"): wq, wk, wv, w_gate, w_a, w_b (.weight), q_conv, k_conv, v_conv, A_log, dt_bias
  dim 1, row-parallel (input features):
      *.mixer.wo.weight, *.mlp.w2.weight
  dim 0, vocab-parallel (rows of the padded vocabulary, padded_vocab/tp per rank):
      embedding.weight, head.weight (the same tensor when tied)
  replicated (identical on every rank; take rank 0): everything else -- norms, QK-norm and GDN's
      out_norm_weight (their gradients are partial sums, summed by the TP grad hooks, install_tp_grad_hooks), block.rho,
      block.out_proj (Parcae W_C), block.injection.* (A_log, dt_bias, B, concat adapter), exit_gate,
      DSA's indexer (wq_index, wk_index, k_index_norm, w_index).
The vocabulary padding (model.pad_vocab_multiple) does not depend on tp, so full tensors have the same
shape whatever TP degree wrote them.

SEQUENCE PARALLELISM (`sequence_parallel=True`, config `parallel.sequence_parallel`; Megatron's SP).
Between the sharded sub-layers every activation lives as a sequence shard (B, T/tp, d): rank r holds
tokens [r*T/tp, (r+1)*T/tp). Per sub-layer (mixer, MLP) and loop iteration, `f` becomes one all-gather
of the sequence at the entry (backward: one reduce-scatter) and `g` one reduce-scatter at the row-
parallel output (backward: one all-gather) -- the same bytes as the two all-reduces, and the norms,
residual stream, dropout and all loop state take 1/tp of the memory and compute. Specifics:
  - mixers (attention, SWA, GDN, DSA) see the gathered sequence, so RoPE uses the full (global)
    positions and DSA's replicated indexer scores all keys; FLT's previous-loop h (query stream) is
    gathered in the SAME all-gather as the layer input (concatenated along the features);
  - the loop state, the injected signal e, injection (add, concat adapter, Parcae's diagonal), rho, the
    outer norm and Parcae's W_C act on the shards without communication; the random initial state is
    drawn for the whole sequence (the one-process draw) and chunked;
  - the vocab-parallel embedding reduce-scatters (instead of its all-reduce); the LM head all-gathers
    the sequence (backward reduce-scatter), so logits and the vocab-parallel loss cover all tokens;
    Ouro's exit gate output is all-gathered (backward: own chunk);
  - every replicated parameter applied to shards gets a gradient over this rank's tokens only: it is
    tagged `replicated_partial_grad` (and `param.sequence_parallel = True`), summed by
    the TP grad hooks (`install_tp_grad_hooks`); DSA's indexer keeps complete gradients;
  - the block's diagnostic norms (means over tokens) are all-reduced to means over the sequence;
  - the sequence length must be divisible by tp (refused, naming the numbers); pipeline parallelism
    and KV-cache generation are not supported with SP.

Why the concat adapter is replicated, not sharded: W [s; e] maps the replicated state to the
replicated state between loop iterations. Sharding it (column or row) would need its own all-gather
or all-reduce every loop iteration, i.e. communication added by the loop; replicated, it costs 2d^2
parameters per rank and no communication. Parcae's B and W_C (d x d) likewise.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from megaloop.config import tensor_parallel_problems
from megaloop.model import LoopedLM
from megaloop.model.layers import TransformerLayer
from megaloop.parallel.comm import TPComm, gather_from_tp
from megaloop.parallel.cross_entropy import (VocabParallelCrossEntropy, VocabParallelSuccessiveKL,
                                             gather_vocab_logits)
from megaloop.parallel.grad_norm import tag_for_deepspeed_norm
from megaloop.parallel.random import RNGTracker
from megaloop.parallel.tensor_parallel import (REPLICATED, ColumnParallelLinear, Partition, VocabParallelEmbedding,
                                               partition_of, shard_of, tag)
from megaloop.parallel.tp_plans import TensorParallelError, fork_rng, plan_for


# ---------------------------------------------------------------------------------------------
# Validation


def validate_tensor_parallel(cfg, tp: int, seq_len: Optional[int] = None, sequence_parallel: bool = False) -> None:
    """Refuse a TP degree that does not divide what it must, naming the numbers: the same check as
    `megaloop.config.validate` (`tensor_parallel_problems`), for models built in code."""
    problems = tensor_parallel_problems(cfg, tp, seq_len if sequence_parallel else None)
    if problems:
        raise TensorParallelError("cannot apply tensor parallelism: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Sequence parallelism: the model-level hooks (the sub-layer entries are in tp_plans)


class _SequenceLengthCheck:
    """LoopedLM forward pre-hook under SP: the sequence must split evenly over the TP ranks."""

    def __init__(self, tp: int):
        self.tp = tp

    def __call__(self, mod, args, kwargs):
        tokens = args[0] if args else kwargs.get("tokens")
        if torch.is_tensor(tokens) and tokens.dim() >= 2 and tokens.shape[1] % self.tp:
            raise TensorParallelError(f"sequence length {tokens.shape[1]} is not divisible by tensor_parallel="
                                      f"{self.tp} (sequence parallel)")
        return None


def _sp_gather_output(comm: TPComm):
    """Forward hook: a replicated module run on a sequence shard whose output the (replicated) loss needs
    over the whole sequence (Ouro's exit gate): all-gather forward, own chunk backward (the gradient
    arriving from the replicated loss is already complete on every rank)."""
    def hook(mod, args, output):
        return gather_from_tp(comm, output, dim=1)
    return hook


def _sp_diagnostics(comm: TPComm):
    """LoopedBlock forward hook: the per-loop diagnostic norms are means over this rank's tokens; one
    all-reduce makes them means over the whole sequence (equal shards: mean of the shard means)."""
    def hook(mod, args, output):
        diag = getattr(output, "diagnostics", None)
        if not diag:
            return output
        keys = [k for k in ("residual_norm", "state_norm", "state_delta", "relative_residual") if k in diag]
        vals = comm.all_reduce_many([diag[k].detach().float() for k in keys], phase="other")
        for k, v in zip(keys, vals):
            diag[k] = (v / comm.size).to(diag[k].dtype)
        return output
    return hook


def _mark_sp_partial_grads(model: nn.Module, full_sequence: set) -> int:
    """Under SP every replicated parameter applied to sequence shards (norms, injection, gates, rho,
    Parcae's W_C, the exit gate) gets a gradient over this rank's tokens only: tag it
    `replicated_partial_grad` (summed over TP by the TP grad hooks)
    and set Megatron's `sequence_parallel` attribute. Replicated parameters that see the gathered
    sequence (DSA's indexer, `full_sequence`) keep complete, identical gradients."""
    n = 0
    for p in model.parameters():
        if partition_of(p).kind == "replicated" and id(p) not in full_sequence:
            tag(p, Partition(None, "replicated_partial_grad"))
            p.sequence_parallel = True
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# The model-level step


class MaskPaddedVocab:
    """`model.real_vocab_logits` under TP: the padded vocabulary columns of this rank's shard get the
    dtype's lowest value (zero probability), instead of being sliced off (shards stay equal-sized)."""

    def __init__(self, vocab_start: int, vocab_size: int):
        self.vocab_start, self.vocab_size = int(vocab_start), int(vocab_size)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        end = self.vocab_start + logits.shape[-1]
        if end <= self.vocab_size:
            return logits
        cols = torch.arange(self.vocab_start, end, device=logits.device) >= self.vocab_size
        return logits.masked_fill(cols, torch.finfo(logits.dtype).min)


class _BroadcastInitialState:
    """block.initial_state under TP.

    broadcast: the random draw is broadcast from TP rank 0 (robust even if the TP ranks' generators
               were seeded differently; one broadcast of B*T*d values per forward, outside the loop).
    sequence_parallel: e is a sequence shard (B, T/tp, d); the noise is drawn for the whole sequence
               (B, T, d), exactly the one-process draw, and this rank keeps its chunk."""

    def __init__(self, block: nn.Module, comm: TPComm, broadcast: bool = True, sequence_parallel: bool = False):
        self.orig = type(block).initial_state.__get__(block)
        self.comm, self.broadcast, self.sp = comm, broadcast, sequence_parallel

    def __call__(self, e: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.comm.size == 1:
            return self.orig(e, generator)
        full = e
        if self.sp:
            shape = list(e.shape)
            shape[1] *= self.comm.size
            full = e.new_empty(shape)
        s = self.orig(full, generator)
        if s is full:  # state_init=embed
            return e
        if self.broadcast:
            with torch.no_grad():
                s = self.comm.broadcast(s.contiguous(), 0)
        return self.comm.chunk(s, dim=1) if self.sp else s


def _transformer_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, TransformerLayer)]


def _replicated_checksum(model: nn.Module) -> torch.Tensor:
    vals = [p.detach().double().sum() + (p.detach().double() * 1.000001).abs().sum() * 1e-3
            for p in model.parameters() if not partition_of(p).sharded]
    device = next(model.parameters()).device  # (the accelerator's: this goes into an all-gather)
    return torch.stack(vals) if vals else torch.zeros(1, dtype=torch.float64, device=device)


def apply_tensor_parallel(model: nn.Module, state_or_group, *, sequence_parallel: Optional[bool] = None,
                          initial_state_sync: str = "rng", check_replicas: bool = True,
                          force: bool = False) -> nn.Module:
    """Shard `model` (a LoopedLM built identically on every rank) over the TP group, in place; returns it.

    state_or_group:     a ParallelState, a torch ProcessGroup, a TPComm, or None (one process).
    sequence_parallel:  Megatron sequence parallelism (default: the state's flag); see "SEQUENCE
                        PARALLELISM" in the module docstring. The input sequence length must be divisible
                        by the TP degree; pipeline parallelism is not supported with it.
    initial_state_sync: "rng" (default): the Parcae/Huginn noise start is drawn from the default
                        generator, which stays in step on all TP ranks (dropout inside sharded heads runs
                        on a forked stream); equals the one-process draw. "broadcast": draw on TP rank
                        0 and broadcast (one extra collective per forward; robust to mis-seeding).
    check_replicas:     verify (one tiny all-gather) that the replicated parameters agree on all TP ranks.
    force:              shard even when tp == 1 (a no-communication run through the same code).
    """
    comm = TPComm.coerce(state_or_group)
    sp = bool(getattr(state_or_group, "sequence_parallel", False)) if sequence_parallel is None else sequence_parallel
    if comm.size == 1 and not force:
        model.tp_comm = comm
        return model
    if getattr(model, "tp_comm", None) is not None and getattr(model.tp_comm, "size", 1) > 1:
        raise TensorParallelError("apply_tensor_parallel was already applied to this model")
    cfg = model.cfg
    validate_tensor_parallel(cfg, comm.size, sequence_parallel=sp)
    if initial_state_sync not in ("rng", "broadcast"):
        raise ValueError(f"initial_state_sync must be 'rng' or 'broadcast', got {initial_state_sync!r}")
    tracker = RNGTracker(tp_rank=comm.rank)
    ctx = {"sp": sp, "tracker": tracker, "full_sequence": set()}

    # 1. Layers: mixer + MLP of every transformer layer (prelude, looped block, coda).
    for layer in _transformer_layers(model):
        for name in ("mixer", "mlp"):
            sub = getattr(layer, name)
            plan = plan_for(sub)
            if plan is None:
                raise TensorParallelError(
                    f"{type(sub).__name__} (layer {layer.layer_idx} {name}) has no tensor-parallel plan; "
                    f"register one with megaloop.parallel.tp_plans.register_tp_plan({type(sub).__name__})")
            plan(sub, comm, cfg, ctx)
        if sp and isinstance(layer.dropout, nn.Dropout):
            fork_rng(layer.dropout, tracker)  # residual dropout on sequence shards: one mask per shard

    # 2. Vocabulary: embedding rows, LM head rows (tied: the same tensor), loss and exits.
    tied = model.head.weight is model.embedding.weight
    model.embedding = VocabParallelEmbedding.from_embedding(model.embedding, comm, sequence_parallel=sp)
    start, end = model.embedding.vocab_start, model.embedding.vocab_end
    if tied:
        head = ColumnParallelLinear(model.head.in_features, end - start, comm, copy_input=True,
                                    sequence_parallel=sp, weight=model.embedding.weight,
                                    partition=Partition(0, "vocab", cfg.padded_vocab_size))
    else:
        head = ColumnParallelLinear.from_linear(model.head, comm, slice(start, end), copy_input=True,
                                                sequence_parallel=sp, partition=Partition(0, "vocab", cfg.padded_vocab_size))
    model.head = head
    model.real_vocab_logits = MaskPaddedVocab(start, cfg.vocab_size)
    model.token_loss_fn = VocabParallelCrossEntropy(comm, start)
    model.successive_kl_fn = VocabParallelSuccessiveKL(comm)

    # 3. The loop: nothing to shard; the random initial state must agree on the TP ranks.
    if initial_state_sync == "broadcast" or sp:
        model.block.initial_state = _BroadcastInitialState(model.block, comm, broadcast=initial_state_sync == "broadcast",
                                                           sequence_parallel=sp)

    # 4. Sequence parallelism: everything between the sharded sub-layers (residual stream, norms,
    # injection, loop state, gates) runs on sequence shards; the LM head all-gathers the sequence.
    if sp:
        if model.exit_gate is not None:
            model.exit_gate.register_forward_hook(_sp_gather_output(comm))
        model.block.register_forward_hook(_sp_diagnostics(comm))
        model.register_forward_pre_hook(_SequenceLengthCheck(comm.size), with_kwargs=True)
        _mark_sp_partial_grads(model, ctx["full_sequence"])

    model.tp_comm = comm
    # 5. Gradients: partial per-rank gradients summed as they are produced; each distinct shard counted
    # once by DeepSpeed's grad-norm de-duplication.
    install_tp_grad_hooks(model)
    tag_for_deepspeed_norm(model, comm.rank)
    if check_replicas and _dist_ready() and not any(p.is_meta for p in model.parameters()):
        check_replicated_parameters(model)  # (a meta-device build checks after megaloop.parallel.materialize)
    return model


def _dist_ready() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def check_replicated_parameters(model: nn.Module, comm: Optional[TPComm] = None) -> None:
    """Raise if a replicated parameter differs across TP ranks (the ranks did not build the model from
    the same seed, or a replicated gradient was not synchronised). model: a tensor-parallel LoopedLM, or
    (comm given) one pipeline stage of it."""
    comm = comm or model.tp_comm
    if comm.size == 1:
        return
    mine = _replicated_checksum(model)
    every = comm.all_gather(mine[None], dim=0)
    if not torch.equal(every.min(0).values, every.max(0).values):
        names = [n for n, p in model.named_parameters() if not partition_of(p).sharded]
        bad = [names[i] for i in torch.nonzero(every.min(0).values != every.max(0).values).flatten().tolist()]
        raise TensorParallelError(f"replicated parameters differ across the {comm.size} tensor-parallel ranks: "
                                  f"{bad[:8]}{' ...' if len(bad) > 8 else ''}; build the model with the same seed "
                                  f"on every rank before apply_tensor_parallel")


# ---------------------------------------------------------------------------------------------
# Gradients


def install_tp_grad_hooks(model: nn.Module) -> int:
    """The one TP gradient reduction: sum, over the TP ranks, the gradients that are partial per rank, as
    autograd produces them (a tensor hook per parameter, so it happens before DeepSpeed's ZeRO hooks
    move gradients into their flat partitions; linear, so per backward == once per step).
    `apply_tensor_parallel` installs it; returns the number of parameters hooked.

    - replicated parameters used inside sharded heads (QK-norm, GDN's output norm): each rank's
      gradient covers its own heads only -> summed over the TP group; under sequence parallelism also
      every replicated parameter applied to sequence shards (its gradient covers this rank's tokens);
    - kv-replicated wk/wv (n_kv_heads < tp): the ranks sharing a kv head each hold the gradient from
      their own q heads -> summed over those ranks (each rank contributes to a slot per kv head).
    Every other replicated parameter gets identical, complete gradients on every rank already.
    """
    comm: Optional[TPComm] = getattr(model, "tp_comm", None)
    if comm is None or comm.size == 1:
        return 0
    n = 0
    for p in model.parameters():
        reduce = tp_grad_reduction(p, comm)
        if reduce is None:
            continue
        p.register_hook(reduce)
        n += 1
    return n


def tp_grad_reduction(p: torch.Tensor, comm: Optional[TPComm]):
    """The reduction `install_tp_grad_hooks` applies to the gradient of `p` (a function of the gradient,
    returning the reduced one), or None when the gradient is complete on its own. Linear, and shape-
    agnostic over leading dimensions for the all-reduce kinds, so it also reduces gradients computed
    outside `.grad` (the per-loop contributions of megaloop/training/diagnostics.py)."""
    if comm is None or comm.size == 1:
        return None
    part = partition_of(p)
    if part.kind == "replicated_partial_grad":
        return lambda g, comm=comm: comm.all_reduce(g.clone())
    if part.kind == "kv_replicated":
        slot, slots = comm.rank // part.replicas, comm.size // part.replicas

        def hook(g, comm=comm, slot=slot, slots=slots):
            buf = torch.zeros((slots,) + tuple(g.shape), dtype=g.dtype, device=g.device)
            buf[slot] = g
            return comm.all_reduce(buf)[slot].clone()
        return hook
    return None


# ---------------------------------------------------------------------------------------------
# Gathering and merging shards


def tp_partition_info(model: nn.Module) -> Dict[str, Partition]:
    """state_dict name -> Partition, for every tensor of the model's state_dict (tied names included)."""
    return {name: partition_of(t) for name, t in model.state_dict(keep_vars=True).items()}


def _gather(t: torch.Tensor, part: Partition, comm: TPComm) -> torch.Tensor:
    if not part.sharded or comm.size == 1:
        return t.detach().clone()
    shards = comm.all_gather(t.detach().contiguous()[None], dim=0)  # (tp, ...)
    keep = shards[:: part.replicas]
    return torch.cat(list(keep), dim=part.dim)


def gather_full_state_dict(model: nn.Module, comm: Optional[TPComm] = None) -> Dict[str, torch.Tensor]:
    """The one-process model's state_dict (same names and shapes), gathered from the TP shards.
    Collective: call on every TP rank."""
    comm = comm or getattr(model, "tp_comm", None) or TPComm(None, 0, 1)
    return {name: _gather(t, partition_of(t), comm) for name, t in model.state_dict(keep_vars=True).items()}


def gather_full_grads(model: nn.Module, comm: Optional[TPComm] = None) -> Dict[str, Optional[torch.Tensor]]:
    """name -> full gradient (as named_parameters of the one-process model). Collective."""
    comm = comm or getattr(model, "tp_comm", None) or TPComm(None, 0, 1)
    out = {}
    for name, p in model.named_parameters():
        out[name] = None if p.grad is None else _gather(p.grad, partition_of(p), comm)
    return out


def gather_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Local vocab-shard logits -> (..., vocab_size) over the real vocabulary (tests, evaluation)."""
    comm = getattr(model, "tp_comm", None)
    if comm is None or comm.size == 1:
        return logits[..., : model.cfg.vocab_size]
    return gather_vocab_logits(logits, comm, model.cfg.vocab_size)


def partition_info_for(cfg, tp: int) -> Dict[str, Partition]:
    """The partition map of a config at a TP degree, with no process group and no memory (meta
    tensors): what an offline checkpoint converter needs."""
    with torch.device("meta"):
        model = LoopedLM(cfg)
    apply_tensor_parallel(model, TPComm(None, 0, tp), check_replicas=False, force=True)
    return tp_partition_info(model)


def merge_tp_shards(shards: List[Dict[str, torch.Tensor]], info: Dict[str, Partition]) -> Dict[str, torch.Tensor]:
    """Merge per-TP-rank state dicts (rank order) into the one-process state_dict (offline, no
    communication). `info` from `partition_info_for(cfg, tp)` or `tp_partition_info(model)`."""
    out = {}
    for name, t0 in shards[0].items():
        part = info.get(name, REPLICATED)
        if not part.sharded:
            out[name] = t0.clone()
        else:
            out[name] = torch.cat([shards[r][name] for r in range(0, len(shards), part.replicas)], dim=part.dim)
    return out


def shard_state_dict(full: Dict[str, torch.Tensor], info: Dict[str, Partition], tp_rank: int, tp: int
                     ) -> Dict[str, torch.Tensor]:
    """The inverse of merge_tp_shards: rank tp_rank's state dict from a one-process state dict."""
    return {name: shard_of(t, info.get(name, REPLICATED), tp_rank, tp).clone() for name, t in full.items()}
