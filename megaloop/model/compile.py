"""`train.compile`: torch.compile applied per transformer layer (torchtitan's per-block compile).

    from megaloop.model.compile import apply_compile
    apply_compile(model, cfg)        # after tensor parallelism, before DeepSpeed wraps the model

What is compiled: every `TransformerLayer` of the model (prelude, the looped block's layers, coda) on
its own, in place, with `nn.Module.compile()`. What is not: the loop. R changes per micro-batch
(sampled Poisson, eval's R, truncated backprop); a compiled loop would be unrolled and recompiled for
every R, while a compiled layer is the same graph whatever R is. The layers of one kind share their
graphs (the parameters are graph inputs), so a model compiles a handful of graphs in all, e.g. two for
FLT (the first loop has no query stream, the others have one), plus one each for eval / no-grad loops.

Why this composes with the rest of megaloop:
  * state-dict keys are unchanged: `module.compile()` keeps the module (no `OptimizedModule` wrapper,
    no `_orig_mod.` prefixes), so checkpoints, consolidation, export and generation are unaffected;
  * activation checkpointing (per loop or per layer, torch or DeepSpeed non-reentrant) stays outside
    the compiled regions and recomputes by calling the compiled layers again;
  * dropout inside a compiled layer draws its seeds from the default generator when the graph runs, so
    a checkpoint's RNG restore replays the same masks;
  * tensor parallelism is applied first (module swaps and hooks inside the layer): Dynamo traces the
    TP collectives (megaloop.parallel.comm's autograd Functions around `torch.distributed`) into the
    layer graph. The model-parallel RNG fork around dropout in sharded heads (TP with dropout > 0) is not
    traceable; Dynamo breaks the graph there and runs that piece eagerly (correct, less fused);
  * pipeline parallelism: compile runs on the full model inside `build_pipeline_module`'s `prepare`
    hook, before it is split; the stage modules hold the same (compiled) layer objects.
  * ZeRO 1/2 are unaffected (they act on gradients and optimizer state). ZeRO-3 is refused by the config:
    its parameter-gathering hooks on every sub-module are `torch.compiler.disable`d, which splits each
    layer into one graph per linear layer (correct, but slower than eager and slow to compile).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

# Distinct graphs one compiled layer type may need (query stream or not, recall or not, train / eval,
# grad / no-grad loops, one dtype switch, a dynamic sequence length for generation): more than
# Dynamo's default of 8 recompiles per code object, after which it silently falls back to eager.
_RECOMPILE_LIMIT = 64


def _layers(module: nn.Module):
    from megaloop.model.layers import TransformerLayer
    return [m for m in module.modules() if isinstance(m, TransformerLayer)]


def _raise_recompile_limit(limit: int = _RECOMPILE_LIMIT) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.7
        if hasattr(cfg, name):
            if getattr(cfg, name) < limit:
                setattr(cfg, name, limit)
            break


def compile_layers(module: nn.Module, mode: Optional[str] = "default", backend: str = "inductor",
                   dynamic: Optional[bool] = None, fullgraph: bool = False) -> int:
    """torch.compile every TransformerLayer under `module` in place (idempotent); returns how many.

    `module` is a LoopedLM, a pipeline stage, or anything that holds transformer layers."""
    if mode in (None, "default"):
        mode = None
    elif mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: use one of {COMPILE_MODES} (CUDA-graph modes replay one "
                         f"static output buffer per graph, which every loop of the looped block overwrites)")
    _raise_recompile_limit()
    layers = _layers(module)
    for layer in layers:
        if getattr(layer, "_megaloop_compiled", False):
            continue
        layer.compile(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
        layer._megaloop_compiled = True
    return len(layers)


def is_compiled(module: nn.Module) -> bool:
    """Whether apply_compile / compile_layers ran on the layers of `module`."""
    layers = _layers(module)
    return bool(layers) and all(getattr(m, "_megaloop_compiled", False) for m in layers)


def apply_compile(module: nn.Module, cfg) -> int:
    """Compile the model's transformer layers when the run's config asks for it (`train.compile`);
    returns the number of compiled layers (0 when compile is off). Apply after tensor parallelism and
    before DeepSpeed wraps the module."""
    t = cfg.train
    if not t.compile:
        return 0
    return compile_layers(module, mode=t.compile_mode)


def compile_after(prepare: Optional[Callable], cfg) -> Optional[Callable]:
    """The trainer's model-preparation hook (tensor parallelism, or None) followed by apply_compile. The
    same hook serves PP = 1 (called on the LoopedLM) and the pipeline (called on the full model before it
    is split into stages)."""
    if not cfg.train.compile:
        return prepare

    def prepare_and_compile(lm):
        if prepare is not None:
            prepare(lm)
        n = apply_compile(lm, cfg)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_rank() == 0:
            print(f"[megaloop] torch.compile: {n} transformer layers (mode {cfg.train.compile_mode}; "
                  f"the loop itself runs eagerly, so a new R never recompiles)", flush=True)
    return prepare_and_compile
