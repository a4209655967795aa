"""Pipeline split of a LoopedLM into a `deepspeed.pipe.PipelineModule`.

Pipeline layers, in order (each stage holds a contiguous run of them):

    [tied] embedding            (tokens, loops) -> (emb, loops)
    embedding norm              (emb, loops)    -> (e, loops)
    prelude layer i ...         (e, loops)      -> (e, loops)
    LOOPED BLOCK                (e, loops)      -> x            one indivisible layer: all R loops run
                                                                inside the stage that holds it
    coda layer j ...            x -> x
    final norm                  x -> x
    [tied] head                 x -> logits                     the embedding weight via TiedLayerSpec
    loss_fn(logits, labels)

What crosses a stage boundary: before the looped block, the injected signal e (every loop needs it: add
/ concat / Parcae injection, FLT's restart from norm(e)) and the micro-batch's loop count [R, R_grad] as
a long tensor (no gradient; DeepSpeed skips non-float tensors in the backward send). After the block,
the last loop's output x; with a per-loop loss (mean / last_third / exit_weighted) the outputs of every
gradient-carrying loop stacked on the batch axis, plus Ouro's exit-gate probabilities.

Every stage builds its pieces from one full LoopedLM created with the run's seed, so PP = N starts from
exactly the weights of PP = 1 (the full model exists only while the PipelineModule is being built).

Stage balance ("loop_weighted"): each layer is weighted by its FLOPs (forward+backward, + recompute), the
looped block by n_loop x E[R]. DeepSpeed's "parameters" method is wrong for a looped block: it weighs the
block like n_loop layers although it runs n_loop x R of them, and it weighs the embedding / head by
their (large) parameter count although the lookup costs nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megaloop.config import Config
from megaloop.model import loop_losses
from megaloop.model.loop_schedule import expected_loops


class _Source:
    """Holds the full model while the pipeline is built; each layer takes its submodules from it."""

    def __init__(self, build_fn):
        self._build_fn = build_fn
        self._lm = None

    @property
    def lm(self):
        if self._lm is None:
            self._lm = self._build_fn()
        return self._lm

    def release(self):
        self._lm = None


class _RopeMixin:
    def _rope(self, x):
        T = x.shape[-2]
        key = (T, x.device)
        if getattr(self, "_rope_key", None) != key:
            self._rope_cache = self._rope_fn(T, x.device)
            self._rope_key = key
        return self._rope_cache


def _real_vocab_fn(lm):
    """Tensor parallelism replaces `lm.real_vocab_logits` per instance (masking the padded columns of
    this rank's vocab shard); otherwise the padded columns are sliced off here. (The bound method is
    not kept: it would keep the whole full-size model alive.)"""
    return lm.__dict__.get("real_vocab_logits")


class EmbeddingPipe(nn.Module):
    """The tied module: holds `embedding` and the `head` that shares its weight (state-dict keys as in
    LoopedLM). Its forward is the embedding lookup; the last stage calls `head_forward`."""

    def __init__(self, source: _Source, with_head: bool = True):
        super().__init__()
        lm = source.lm
        self.embedding = lm.embedding
        self.head = lm.head if with_head else None
        self.softcap = lm.cfg.logit_softcap
        self.vocab_size = lm.cfg.vocab_size
        self.real_vocab = _real_vocab_fn(lm)

    def forward(self, inputs):
        tokens, loops = inputs
        return self.embedding(tokens), loops


def head_forward(module: nn.Module, x):
    """Logits over the real vocabulary (softcap as in LoopedLM.head_logits)."""
    aux = None
    if isinstance(x, tuple):
        x, aux = x[0], x[1:]
    logits = module.head(x)
    cap = module.softcap
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    logits = module.real_vocab(logits) if module.real_vocab is not None else logits[..., : module.vocab_size]
    return (logits, *aux) if aux else logits


class HeadPipe(nn.Module):
    """Untied head."""

    def __init__(self, source: _Source):
        super().__init__()
        lm = source.lm
        self.head = lm.head
        self.softcap = lm.cfg.logit_softcap
        self.vocab_size = lm.cfg.vocab_size
        self.real_vocab = _real_vocab_fn(lm)

    def forward(self, x):
        return head_forward(self, x)


class EmbedNormPipe(nn.Module):
    def __init__(self, source: _Source):
        super().__init__()
        self.embed_norm = source.lm.embed_norm

    def forward(self, inputs):
        e, loops = inputs
        if self.embed_norm is not None:
            e = self.embed_norm(e)
        return e, loops


class PreludeLayerPipe(_RopeMixin, nn.Module):
    def __init__(self, source: _Source, index: int):
        super().__init__()
        self.prelude = nn.ModuleDict({str(index): source.lm.prelude[index]})
        self._key = str(index)
        self._rope_fn = source.lm.rope

    @property
    def layer(self):
        return self.prelude[self._key]

    def forward(self, inputs):
        e, loops = inputs
        return self.layer(e, self._rope(e)), loops


class LoopedBlockPipe(_RopeMixin, nn.Module):
    """The whole LoopedBlock as one pipeline layer: R = loops[0] iterations, gradients through the
    last loops[1]. Per-loop activation checkpointing is the block's own (`block.activation_checkpointing`).

    With `collect` (per-loop losses) it returns the gradient-carrying loops' outputs concatenated on
    the batch axis ((R_grad * B, T, d)), plus Ouro's exit probabilities when the exit gate exists."""

    def __init__(self, source: _Source, collect: bool):
        super().__init__()
        lm = source.lm
        self.block = lm.block
        # Ouro shares the LM's final norm with the loop; then it lives here (the head stage skips it).
        self.final_norm = lm.final_norm if lm.block.outer_is_final else None
        self.exit_gate = lm.exit_gate
        self.collect = collect
        self._rope_fn = lm.rope
        self.want_diagnostics = False
        self.last_diagnostics = None
        self.last_loops = None

    def forward(self, inputs):
        e, loops = inputs
        total, grad = int(loops[0]), int(loops[1])
        out = self.block(e, self._rope(e), total, grad, collect=self.collect,
                         diagnostics=self.want_diagnostics, final_norm=self.final_norm)
        self.last_loops = (total, grad)
        if self.want_diagnostics and out.diagnostics is not None:
            self.last_diagnostics = {k: v.detach() for k, v in out.diagnostics.items()}
        if not self.collect:
            return out.out
        per_loop = out.per_loop
        stacked = torch.cat(per_loop, dim=0)
        if self.exit_gate is None:
            return stacked
        lambdas = torch.stack([torch.sigmoid(self.exit_gate(x).squeeze(-1).float()) for x in per_loop])
        return stacked, loop_losses.exit_distribution(lambdas)


class CodaLayerPipe(_RopeMixin, nn.Module):
    def __init__(self, source: _Source, index: int):
        super().__init__()
        self.coda = nn.ModuleDict({str(index): source.lm.coda[index]})
        self._key = str(index)
        self._rope_fn = source.lm.rope

    @property
    def layer(self):
        return self.coda[self._key]

    def forward(self, x):
        if isinstance(x, tuple):
            return (self.layer(x[0], self._rope(x[0])), *x[1:])
        return self.layer(x, self._rope(x))


class FinalNormPipe(nn.Module):
    def __init__(self, source: _Source):
        super().__init__()
        lm = source.lm
        self.final_norm = None if lm.block.outer_is_final else lm.final_norm

    def forward(self, x):
        if self.final_norm is None:
            return x
        if isinstance(x, tuple):
            return (self.final_norm(x[0]), *x[1:])
        return self.final_norm(x)


class LoopLoss:
    """loss_fn(outputs, labels) of the PipelineModule: LoopedLM's loss on the last stage."""

    def __init__(self, mode: str, token_loss_fn, entropy_weight: float, collect: bool):
        self.mode, self.token_loss_fn, self.entropy_weight, self.collect = mode, token_loss_fn, entropy_weight, collect
        self.__name__ = f"loop_loss[{mode}]"

    def __call__(self, outputs, labels):
        if not self.collect:
            return loop_losses.mean_token_loss(self.token_loss_fn(outputs, labels), labels)
        exit_probs = None
        if isinstance(outputs, tuple):
            outputs, exit_probs = outputs
        per_loop = list(outputs.split(labels.shape[0], dim=0))
        return loop_losses.loop_loss(self.mode, per_loop, labels, self.token_loss_fn, exit_probs,
                                     self.entropy_weight)


def layer_names(model_cfg) -> list:
    return (["embedding", "embed_norm"] + ["prelude"] * model_cfg.n_prelude + ["loop"]
            + ["coda"] * model_cfg.n_coda + ["final_norm", "head"])


def balanced_partition(weights, num_parts: int) -> list:
    """Contiguous split of `weights` into num_parts non-empty parts minimising the heaviest part
    (ties: the lighter first parts, i.e. put work late, where the loss is). Returns DeepSpeed's
    `parts` (num_parts + 1 boundaries)."""
    n = len(weights)
    if num_parts > n:
        raise ValueError(f"cannot split {n} pipeline layers into {num_parts} stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    INF = float("inf")
    best = [[INF] * (num_parts + 1) for _ in range(n + 1)]
    cut = [[0] * (num_parts + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, num_parts) + 1):
            for k in range(j - 1, i):
                cost = max(best[k][j - 1], prefix[i] - prefix[k])
                if cost < best[i][j] - 1e-12 * max(1.0, cost):
                    best[i][j], cut[i][j] = cost, k
    parts, i = [n], n
    for j in range(num_parts, 0, -1):
        i = cut[i][j]
        parts.append(i)
    return parts[::-1]


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class LoopedPipelineModule(PipelineModule):
        """PipelineModule with the loop-weighted partition (DeepSpeed has no explicit-weights method)."""

        def __init__(self, layers, layer_weights, partition_method, **kwargs):
            object.__setattr__(self, "_megaloop_weights", list(layer_weights))
            super().__init__(layers, partition_method=partition_method, **kwargs)

        def _partition_layers(self, method="uniform"):
            if method != "loop_weighted":
                return super()._partition_layers(method=method)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self.parts = balanced_partition(self._megaloop_weights, self.num_stages)
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return LoopedPipelineModule


def stage_plan(cfg: Config, num_stages: int, method: Optional[str] = None) -> list:
    """Which layer names each stage holds under the loop-weighted partition (for logs and tests)."""
    names = layer_names(cfg.model)
    mean = expected_loops(cfg.loop, cfg.train.seed, n=512)
    grad_mean = mean if cfg.loop.backprop_loops is None else min(mean, cfg.loop.backprop_loops)
    from megaloop.model.flops import pipeline_layer_weights
    parts = balanced_partition(pipeline_layer_weights(cfg, names, mean, grad_mean), num_stages)
    return [names[parts[s]:parts[s + 1]] for s in range(num_stages)]


def build_pipeline_module(cfg: Config, build_lm, topology, activation_checkpointing: str = "none",
                          prepare_lm=None):
    """cfg: the run config; build_lm(): a full LoopedLM with the run's initial weights (called once, on
    every rank); topology: DeepSpeed's PipeModelDataParallelTopology; prepare_lm(lm): optional hook run
    on the full model before it is split (e.g. tensor parallelism)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    from megaloop.model.flops import pipeline_layer_weights

    m = cfg.model
    collect = cfg.loop.loss != "last"

    def _build():
        lm = build_lm()
        lm.block.activation_checkpointing = activation_checkpointing
        if prepare_lm is not None:
            prepare_lm(lm)
        return lm

    source = _Source(_build)
    tied = m.tie_embeddings
    specs = []
    if tied:
        specs.append(TiedLayerSpec("embed", EmbeddingPipe, source, tied_weight_attr=["embedding.weight"]))
    else:
        specs.append(LayerSpec(EmbeddingPipe, source, False))
    specs.append(LayerSpec(EmbedNormPipe, source))
    specs += [LayerSpec(PreludeLayerPipe, source, i) for i in range(m.n_prelude)]
    specs.append(LayerSpec(LoopedBlockPipe, source, collect))
    specs += [LayerSpec(CodaLayerPipe, source, j) for j in range(m.n_coda)]
    specs.append(LayerSpec(FinalNormPipe, source))
    if tied:
        specs.append(TiedLayerSpec("embed", EmbeddingPipe, source, forward_fn=head_forward,
                                   tied_weight_attr=["embedding.weight"]))
    else:
        specs.append(LayerSpec(HeadPipe, source))

    mean = expected_loops(cfg.loop, cfg.train.seed, n=512)
    grad_mean = mean if cfg.loop.backprop_loops is None else min(mean, cfg.loop.backprop_loops)
    weights = pipeline_layer_weights(cfg, layer_names(m), mean, grad_mean)
    # Token loss: the LM's (tensor parallelism may have swapped in the vocab-parallel one).
    loss_fn = LoopLoss(cfg.loop.loss, source.lm.token_loss_fn, cfg.loop.exit_entropy_weight, collect)
    dynamic = collect  # the stacked per-loop outputs change shape with R (sampled, or eval's R)
    cls = _pipeline_module_class()
    module = cls(specs, weights, cfg.parallel.pipeline_partition, topology=topology, loss_fn=loss_fn,
                 activation_checkpoint_interval=0, dynamic_shape=dynamic, base_seed=cfg.train.seed)
    source.release()  # only this stage's layers stay alive
    return module


def looped_layer(module) -> Optional[LoopedBlockPipe]:
    """The stage's LoopedBlockPipe, if this stage holds the looped block."""
    for f in getattr(module, "forward_funcs", []):
        if isinstance(f, LoopedBlockPipe):
            return f
    return None


def full_state_dict_of_stage(module) -> dict:
    """This stage's parameters under LoopedLM's state-dict names (the layer classes keep them)."""
    sd = {}
    for f in module.forward_funcs:
        if isinstance(f, nn.Module):
            sd.update(f.state_dict())
    for tied in module.tied_modules.values():
        for k, v in tied.state_dict().items():
            sd[k] = v
    return sd
