"""Pipeline split of a LoopedLM into a `deepspeed.pipe.PipelineModule`.

Pipeline layers, in order (each stage holds a contiguous run of them; `pipeline_layers` is the one
list the PipelineModule specs, the layer names and the checkpoint reader's per-layer keys come from):

    [tied] embedding            (tokens, loops) -> (emb, loops)
    embedding norm              (emb, loops)    -> (e, loops)   with model.embed_scale first
    prelude layer i ...         (e, loops)      -> (e, loops)   the last one (or, without prelude layers,
                                                                the embedding norm) also applies the
                                                                prelude norm (model.prelude_norm)
    LOOPED BLOCK                (e, loops)      -> x            one indivisible layer: all R loops run
                                                                inside the stage that holds it
    coda layer j ...            x -> x                          the first one (or the final norm) first
                                                                applies the coda norm (model.coda_norm)
    final norm                  x -> x
    [tied] head                 x -> logits                     the embedding weight via TiedLayerSpec
    loss_fn(logits, labels)

What crosses a stage boundary: before the looped block, the injected signal e (every loop needs it: add
/ concat / Parcae injection, FLT's restart from norm(e)) and the micro-batch's loop count [R, R_grad] as
a long tensor (no gradient; DeepSpeed skips non-float tensors in the backward send): [R, R_grad], or under
loop.granularity='sequence' one such pair per row, shape (B, 2). After the block,
the last loop's output x; with a per-loop loss (mean / last_third / exit_weighted) the outputs of every
gradient-carrying loop stacked on the batch axis, plus Ouro's exit-gate probabilities.
Packed documents (LoopedLM.packing): the embedding layer adds the (B, T) document ids of the tokens as the
tuple's LAST entry (a long tensor, like the loop counts), dropped by the last layer that needs them (the last
coda layer, else the looped block); each stage derives RoPE and masks from them (megaloop/model/documents.py).

Every stage takes its pieces from one LoopedLM built with the run's seed (on the meta device in training:
only the stage's own layers get their values, megaloop/parallel/materialize.py), so PP = N starts from
exactly the weights of PP = 1. The
head, the exit gate and the loss run LoopedLM's own methods (output_logits, exit_distribution, loss),
borrowed by the layer classes that hold those parts.

Stage balance ("loop_weighted"): megaloop/parallel/stage_split.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from megaloop.config import Config
from megaloop.model.documents import document_ids, packed_rope, repeat_rows
from megaloop.model.loop_schedule import unpack_loops
from megaloop.model.looped_lm import LoopedLM


class LayerSource:
    """Holds the full model while the pipeline is built; each layer takes its submodules from it.
    materializer(lm): where lm was built on the meta device, a megaloop.parallel.materialize.Materializer
    that gives each layer's parameters their values as DeepSpeed builds this stage's layers."""

    def __init__(self, build_fn, materializer=None):
        self._build_fn = build_fn
        self._materializer_fn = materializer
        self._lm = self.materializer = None

    @property
    def lm(self):
        if self._lm is None:
            self._lm = self._build_fn()
            if self._materializer_fn is not None:
                self.materializer = self._materializer_fn(self._lm)
        return self._lm

    def built(self, module: nn.Module) -> nn.Module:
        if self.materializer is not None:
            self.materializer.materialize_module(module)
        return module

    def release(self):
        self._lm = self.materializer = None


class _RopeMixin:
    def _init_packing(self, lm):
        """Packed documents (lm.packing): the settings only, no reference to the full LM."""
        self._packing, self._head_dim, self._theta = lm.packing, lm.cfg.attn_head_dim, lm.cfg.rope_theta

    def _rope(self, x, doc_ids=None):
        if doc_ids is not None:  # per micro-batch; repeated for the per-loop outputs stacked on the batch axis
            return repeat_rows(packed_rope(self._packing, doc_ids, self._head_dim, self._theta), x.shape[0])
        T = x.shape[-2]
        key = (T, x.device)
        if getattr(self, "_rope_key", None) != key:
            self._rope_cache = self._rope_fn(T, x.device)
            self._rope_key = key
        return self._rope_cache


def _take_real_vocab(module: nn.Module, lm) -> None:
    """Tensor parallelism replaces `lm.real_vocab_logits` per instance (masking the padded columns of
    this rank's vocab shard); the stage takes that replacement, else it keeps LoopedLM's method. (The
    LM's bound method is never taken: it would keep the whole full-size model alive.)"""
    tp = lm.__dict__.get("real_vocab_logits")
    if tp is not None:
        module.real_vocab_logits = tp


class EmbeddingPipe(nn.Module):
    """The tied module: holds `embedding` and the `head` that shares its weight (state-dict keys as in
    LoopedLM). Its forward is the embedding lookup; the last stage calls `head_forward`."""

    output_logits = LoopedLM.output_logits
    real_vocab_logits = LoopedLM.real_vocab_logits

    def __init__(self, source: LayerSource, with_head: bool = True):
        super().__init__()
        lm = source.lm
        self.cfg = lm.cfg
        self.embedding = lm.embedding
        self.head = lm.head if with_head else None
        self.packing = lm.packing
        _take_real_vocab(self, lm)

    def forward(self, inputs):
        tokens, loops = inputs
        if self.packing is not None:  # the document ids travel on with the activations (see the module doc)
            return self.embedding(tokens), loops, document_ids(tokens, self.packing.eod_id)
        return self.embedding(tokens), loops


def head_forward(module: nn.Module, x):
    """Logits over the real vocabulary (LoopedLM.output_logits); the per-loop aux outputs pass through."""
    aux = None
    if isinstance(x, tuple):
        x, aux = x[0], x[1:]
    logits = module.output_logits(x)
    return (logits, *aux) if aux else logits


class HeadPipe(nn.Module):
    """Untied head."""

    output_logits = LoopedLM.output_logits
    real_vocab_logits = LoopedLM.real_vocab_logits

    def __init__(self, source: LayerSource):
        super().__init__()
        lm = source.lm
        self.cfg = lm.cfg
        self.head = lm.head
        _take_real_vocab(self, lm)

    def forward(self, x):
        return head_forward(self, x)


def _prelude_norm_if_last(lm, last: bool) -> Optional[nn.Module]:
    """The LM's norm after the prelude (model.prelude_norm), held by the layer that ends the prelude
    path: the last prelude layer, or the embedding norm when there is no prelude."""
    return lm.prelude_norm if last else None


def _coda_norm_if_first(lm, first: bool) -> Optional[nn.Module]:
    """The LM's loop-to-coda norm (model.coda_norm), held by the first coda layer, else the final norm layer."""
    return lm.coda_norm if first else None


class EmbedNormPipe(nn.Module):
    """The embedding scale and norm; without prelude layers also the prelude norm that follows them."""

    def __init__(self, source: LayerSource):
        super().__init__()
        lm = source.lm
        self.embed_scale = lm.cfg.embed_scale
        self.embed_norm = lm.embed_norm
        self.prelude_norm = _prelude_norm_if_last(lm, len(lm.prelude) == 0)

    def forward(self, inputs):
        e, *rest = inputs  # (loops, and with packed documents their ids)
        if self.embed_scale != 1:
            e = e * self.embed_scale
        if self.embed_norm is not None:
            e = self.embed_norm(e)
        if self.prelude_norm is not None:
            e = self.prelude_norm(e)
        return (e, *rest)


class StackLayerPipe(_RopeMixin, nn.Module):
    """One prelude or coda layer (`stack` = "prelude" | "coda"), registered under the LM's own name so
    the stage's state-dict keys are the LoopedLM's (prelude.<i>. ..., coda.<j>. ...). Takes the
    activation or a tuple whose first entry is it (the loop counts or per-loop outputs ride along).
    The last prelude layer also holds the prelude norm (prelude_norm.weight), applied after it."""

    def __init__(self, source: LayerSource, stack: str, index: int):
        super().__init__()
        lm = source.lm
        setattr(self, stack, nn.ModuleDict({str(index): getattr(lm, stack)[index]}))
        self._stack, self._key = stack, str(index)
        self._rope_fn = lm.rope
        self._init_packing(lm)
        # Packed documents: the last coda layer is the last one that needs the document ids.
        self._drops_docs = lm.packing is not None and stack == "coda" and index == len(lm.coda) - 1
        self.prelude_norm = _prelude_norm_if_last(lm, stack == "prelude" and index == len(lm.prelude) - 1)
        self.coda_norm = _coda_norm_if_first(lm, stack == "coda" and index == 0)

    @property
    def layer(self):
        return getattr(self, self._stack)[self._key]

    def _run(self, x, doc_ids=None):
        if self.coda_norm is not None:
            x = self.coda_norm(x)
        x = self.layer(x, self._rope(x, doc_ids))
        return x if self.prelude_norm is None else self.prelude_norm(x)

    def forward(self, x):
        if not isinstance(x, tuple):
            return self._run(x)
        out = (self._run(x[0], x[-1] if self._packing is not None else None), *x[1:])
        if self._drops_docs:
            out = out[:-1]
        return out[0] if len(out) == 1 else out


class LoopedBlockPipe(_RopeMixin, nn.Module):
    """The whole LoopedBlock as one pipeline layer: R = loops[0] iterations, gradients through the
    last loops[1]. Per-loop activation checkpointing is the block's own (`block.activation_checkpointing`).

    With `collect` (per-loop losses) it returns the gradient-carrying loops' outputs concatenated on
    the batch axis ((R_grad * B, T, d)), plus Ouro's exit probabilities when the exit gate exists."""

    exit_distribution = LoopedLM.exit_distribution

    def __init__(self, source: LayerSource, collect: bool):
        super().__init__()
        lm = source.lm
        self.block = lm.block
        # Ouro shares the LM's final norm with the loop; then it lives here (the head stage skips it).
        self.final_norm = lm.final_norm if lm.block.outer_is_final else None
        self.exit_gate = lm.exit_gate
        self.collect = collect
        self._rope_fn = lm.rope
        self._init_packing(lm)
        self._passes_docs = lm.packing is not None and len(lm.coda) > 0  # the coda layers need them too
        self.want_diagnostics = False
        self.last_diagnostics = None
        self.last_loops = None
        self.noise_generator = None  # RNG of a random initial state; None: torch's (the training diagnostics set one)

    def doc_ids_of(self, inputs):
        """The document ids in this layer's input tuple (None without packed documents)."""
        return inputs[2] if self._packing is not None else None

    def forward(self, inputs):
        out = self._forward(inputs)
        if self._passes_docs:
            return (*out, inputs[2]) if isinstance(out, tuple) else (out, inputs[2])
        return out

    def _forward(self, inputs):
        e, loops = inputs[0], inputs[1]
        total, grad = unpack_loops(loops)  # per-row (B,) tensors under loop.granularity=sequence
        out = self.block(e, self._rope(e, self.doc_ids_of(inputs)), total, grad, collect=self.collect,
                         diagnostics=self.want_diagnostics, final_norm=self.final_norm,
                         generator=self.noise_generator)
        self.last_loops = (total, grad)
        if self.want_diagnostics and out.diagnostics is not None:
            self.last_diagnostics = {k: v.detach() for k, v in out.diagnostics.items()}
        if not self.collect:
            return out.out
        per_loop = out.per_loop
        stacked = torch.cat(per_loop, dim=0)
        if self.exit_gate is None:
            return stacked
        return stacked, self.exit_distribution(per_loop)


class FinalNormPipe(nn.Module):
    def __init__(self, source: LayerSource):
        super().__init__()
        lm = source.lm
        self.final_norm = None if lm.block.outer_is_final else lm.final_norm
        self.coda_norm = _coda_norm_if_first(lm, len(lm.coda) == 0)

    def _run(self, x):
        if self.coda_norm is not None:
            x = self.coda_norm(x)
        return x if self.final_norm is None else self.final_norm(x)

    def forward(self, x):
        if isinstance(x, tuple):
            return (self._run(x[0]), *x[1:])
        return self._run(x)


class LoopLoss:
    """loss_fn(outputs, labels) of the PipelineModule: LoopedLM's loss on the last stage."""

    loss = LoopedLM.loss

    def __init__(self, mode: str, token_loss_fn, entropy_weight: float, collect: bool):
        self.loss_mode, self.token_loss_fn, self.exit_entropy_weight = mode, token_loss_fn, entropy_weight
        self.collect = collect
        self.__name__ = f"loop_loss[{mode}]"
        # eval_hook(final logits, labels): set by the trainer's validation (exact-match accuracy on tasks).
        self.eval_hook = None

    def __call__(self, outputs, labels):
        if not self.collect:
            if self.eval_hook is not None:
                self.eval_hook(outputs, labels)
            return self.loss(outputs, labels)
        exit_probs = None
        if isinstance(outputs, tuple):
            outputs, exit_probs = outputs
        per_loop = list(outputs.split(labels.shape[0], dim=0))
        if self.eval_hook is not None:
            self.eval_hook(per_loop[-1], labels)
        return self.loss(per_loop, labels, exit_probs)


# ------------------------------------------------------------------------------------------------
# The layer list: the one definition the PipelineModule specs, the layer names (stage plans, FLOP
# weights) and the checkpoint reader's per-layer keys (megaloop/checkpoint/reader.py) derive from.


@dataclass(frozen=True)
class PipelineLayer:
    name: str  # embedding | embed_norm | prelude | loop | coda | final_norm | head
    cls: type  # built as cls(source, *args) from the full LoopedLM
    args: tuple = ()
    tie_key: Optional[str] = None  # layers with one key share one module (DeepSpeed's TiedLayerSpec)
    forward_fn: Optional[Callable] = None  # run as forward_fn(shared module, x) instead of module(x)

    def spec(self, source: LayerSource):
        from deepspeed.pipe import LayerSpec, TiedLayerSpec

        # DeepSpeed builds only this stage's layers: their parameters are materialised as they are built.
        class Spec(LayerSpec):
            def build(self, log=False):
                return source.built(super().build(log))

        class TiedSpec(TiedLayerSpec):
            def build(self, log=False):
                return source.built(super().build(log))

        if self.tie_key is None:
            return Spec(self.cls, source, *self.args)
        return TiedSpec(self.tie_key, self.cls, source, *self.args, forward_fn=self.forward_fn,
                        tied_weight_attr=["embedding.weight"])


def pipeline_layers(model_cfg, collect: bool = False) -> List[PipelineLayer]:
    """The pipeline layers of a LoopedLM, in order. collect: the looped block returns every
    gradient-carrying loop's output (a per-loop loss, i.e. loop.loss != "last")."""
    m = model_cfg
    tied = m.tie_embeddings
    layers = [PipelineLayer("embedding", EmbeddingPipe, tie_key="embed") if tied
              else PipelineLayer("embedding", EmbeddingPipe, (False,)),
              PipelineLayer("embed_norm", EmbedNormPipe)]
    layers += [PipelineLayer("prelude", StackLayerPipe, ("prelude", i)) for i in range(m.n_prelude)]
    layers.append(PipelineLayer("loop", LoopedBlockPipe, (collect,)))
    layers += [PipelineLayer("coda", StackLayerPipe, ("coda", j)) for j in range(m.n_coda)]
    layers.append(PipelineLayer("final_norm", FinalNormPipe))
    layers.append(PipelineLayer("head", EmbeddingPipe, tie_key="embed", forward_fn=head_forward) if tied
                  else PipelineLayer("head", HeadPipe))
    return layers


def layer_names(model_cfg) -> list:
    return [layer.name for layer in pipeline_layers(model_cfg)]


def build_layers(layers: List[PipelineLayer], source: LayerSource) -> List[Tuple[PipelineLayer, Optional[nn.Module],
                                                                            Callable]]:
    """(layer, the module it creates or None when it reuses a tied one, its forward) for each layer, built
    in one process the way DeepSpeed builds the layers of a stage."""
    tied, out = {}, []
    for layer in layers:
        created = None
        if layer.tie_key is not None and layer.tie_key in tied:
            module = tied[layer.tie_key]
        else:
            module = created = layer.cls(source, *layer.args)
            if layer.tie_key is not None:
                tied[layer.tie_key] = module
        fwd = module if layer.forward_fn is None else functools.partial(layer.forward_fn, module)
        out.append((layer, created, fwd))
    return out


def local_layers(lm, collect: bool = False) -> list:
    """The pipeline layers of `lm` as one-process callables (sharing lm's modules): running them in
    sequence is what the stages of a PipelineModule compute (tests)."""
    return [fwd for _, _, fwd in build_layers(pipeline_layers(lm.cfg, collect), LayerSource(lambda: lm))]


def layer_state_keys(model_cfg) -> List[Tuple[str, Optional[List[str]]]]:
    """Per DeepSpeed pipeline layer index: (layer name, the LoopedLM state-dict keys its checkpoint file
    holds), or (name, None) for a layer that reuses a tied module (the tied head: DeepSpeed writes no
    file for it). Built on a meta-device LoopedLM (no memory)."""
    with torch.device("meta"):
        lm = LoopedLM(model_cfg)
    return [(layer.name, None if created is None else list(created.state_dict().keys()))
            for layer, created, _ in build_layers(pipeline_layers(model_cfg), LayerSource(lambda: lm))]


def build_pipeline_module(cfg: Config, build_lm, topology, activation_checkpointing: str = "none",
                          prepare_lm=None, device=None, initial_state=None):
    """cfg: the run config; build_lm(): a full LoopedLM (called once, on every rank), with its weights or
    on the meta device; topology: DeepSpeed's PipeModelDataParallelTopology; prepare_lm(lm): optional hook
    run on the full model before it is split (e.g. tensor parallelism). Meta parameters of the stage's
    layers are materialised on `device` (initial values, or `initial_state`: init.from's full state dict)."""
    from megaloop.parallel.materialize import Materializer
    collect = cfg.loop.loss != "last"

    def _build():
        lm = build_lm()
        lm.block.activation_checkpointing = activation_checkpointing
        if prepare_lm is not None:
            prepare_lm(lm)
        return lm

    source = LayerSource(_build, lambda lm: Materializer(lm, device or "cpu", initial_state))
    layers = pipeline_layers(cfg.model, collect)
    specs = [layer.spec(source) for layer in layers]
    from megaloop.parallel.stage_split import layer_flop_weights, looped_pipeline_module_class
    weights = layer_flop_weights(cfg, [layer.name for layer in layers])
    # Token loss: the LM's (tensor parallelism may have swapped in the vocab-parallel one).
    loss_fn = LoopLoss(cfg.loop.loss, source.lm.token_loss_fn, cfg.loop.exit_entropy_weight, collect)
    dynamic = collect  # the stacked per-loop outputs change shape with R (sampled, or eval's R)
    cls = looped_pipeline_module_class()
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
