"""The shared looped block: n_loop layers whose weights are reused for R iterations.

This module is the unit that pipeline parallelism keeps whole on one stage, and the unit whose
iterations activation checkpointing recomputes one at a time. It takes the injected signal e
(embedding after the prelude) and returns the loop output plus, on request, every loop's output
and per-loop diagnostics.

Two families share the layers:
  recurrent  s(t) = Block(inject(s(t-1), e)); outer normalisation carries norm(x(t)) between loops
             (baseline LT, add / concat-adapter / Parcae injection, internal recall, Ouro).
  FLT family every loop restarts the stream from e; the previous loop's h = norm(x) reaches every
             layer (flt: as attention queries; lt_ia: queries of layer 0 only; flt_res: x = norm(x + h)
             before every layer; lt_i: the stream starts from norm(e + h)).
The raw output x(t) of the last loop leaves the block un-normalised (the LM's final norm follows), so
with R = 1 every architecture reduces to the plain transformer x -> layers -> final norm -> head.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from megaloop.config import ModelConfig
from megaloop.model.documents import select_rows
from megaloop.model.injection import ParcaeInjection, build_injection
from megaloop.model.layers import RMSNorm, TransformerLayer, rms_norm
from megaloop.config import mixer_pattern
from megaloop.model.mixers import build_mixer


def noise_generator(seed: int, step: int, index: int, device) -> torch.Generator:
    """The generator of the random initial state (state_init=noise) of micro-batch `index` in optimizer
    step `step`: a pure function of (seed, step, index), like the loop counts, so every pipeline stage,
    TP rank and resumed run draws the same noise, whatever else drew from torch's global RNG before."""
    h = hashlib.blake2b(repr(("state-noise", int(seed), int(step), int(index))).encode(), digest_size=8)
    return torch.Generator(device=device).manual_seed(int.from_bytes(h.digest(), "little") >> 1)


@dataclass
class BlockOutput:
    out: torch.Tensor  # the last loop's output, (B, T, d)
    per_loop: Optional[List[torch.Tensor]] = None  # outputs of the loops that carry gradients
    diagnostics: Optional[dict] = None  # name -> tensor of shape (R,), detached


class LoopedBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        names = mixer_pattern(cfg.mixer, cfg.n_loop, cfg.linear_mixer)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, i, build_mixer(n, cfg, i)) for i, n in enumerate(names))
        self.arch = cfg.arch
        self.injection = build_injection(cfg) if cfg.arch == "recurrent" else None
        self.internal_recall = cfg.recall == "internal"
        self.outer = cfg.normalization == "outer"
        # Ouro: the LM's final norm is applied after every loop (including the last) and fed back;
        # the LM then skips its own final norm. Otherwise the outer norm is a separate module.
        self.outer_is_final = cfg.share_outer_final_norm
        self.outer_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_scale) if self.outer else None
        # LT2's per-loop residual gate h(t) <- h(t) + rho(t) * h(t-1), zero-init.
        self.rho = nn.Parameter(torch.zeros(cfg.max_loops, cfg.d_model)) if cfg.loop_residual_gate else None
        if self.rho is not None:
            self.rho.no_weight_decay = True
        # Parcae's W_C between the loop and the coda (identity at init: the coda first sees h(T)).
        self.out_proj = None
        if cfg.injection == "parcae":
            self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
            self.out_proj.weight.no_weight_decay = True
            self.out_proj.identity_init = True  # (megaloop/model/initial_values.py)
        self.activation_checkpointing = "none"  # none | loop | layer; set by the training setup
        # checkpoint_fn(function, *tensors): recomputes `function` in backward. Called with positional
        # tensors only (everything else is bound into `function`), as DeepSpeed's
        # `non_reentrant_checkpoint` (partition_activations / cpu_checkpointing) needs; the training
        # setup swaps it in. It must be non-reentrant (the pipeline engine's partial backward).
        self.checkpoint_fn: Callable = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        self.eps = cfg.norm_eps
        # The training loop's key of this step's noise starts (`set_noise_key`): (seed, step, dp_rank,
        # dp_size); forward k of the step (micro-batch k, no explicit generator) draws from
        # noise_generator(seed, step, k * dp_size + dp_rank). None: torch's global RNG (inference).
        self.noise_key: Optional[tuple] = None
        self.noise_draws = 0

    def init_parameter(self, name: str, shape, generator) -> torch.Tensor:
        return torch.zeros(shape)  # rho: the residual gate starts closed (megaloop/model/initial_values.py)

    def set_noise_key(self, seed: int, step: int, dp_rank: int = 0, dp_size: int = 1) -> None:
        """Key the noise start of the next forwards (one per micro-batch, in order) by the optimizer step."""
        self.noise_key, self.noise_draws = (int(seed), int(step), int(dp_rank), int(dp_size)), 0

    def _keyed_generator(self, e: torch.Tensor) -> Optional[torch.Generator]:
        if self.noise_key is None or self.arch != "recurrent" or self.cfg.state_init != "noise":
            return None
        seed, step, dp_rank, dp_size = self.noise_key
        index = self.noise_draws * dp_size + dp_rank  # DP 2 draws what one rank accumulating 2 draws
        self.noise_draws += 1
        return noise_generator(seed, step, index, e.device)

    # ------------------------------------------------------------------------------------------
    def initial_state(self, e: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        init = self.cfg.state_init
        if init == "embed":
            return e
        if init == "zeros":
            return torch.zeros_like(e)
        # Huginn / Parcae: a truncated-normal random start (cut at 3 std). Under TP the model-parallel
        # RNG tracker makes this draw identical on all TP ranks; `generator` makes it reproducible.
        std = self.cfg.state_init_std or self.cfg.init_std
        return nn.init.trunc_normal_(torch.empty_like(e), std=std, a=-3 * std, b=3 * std, generator=generator)

    def _checkpointed(self, function, x: torch.Tensor) -> torch.Tensor:
        """function(x) under `checkpoint_fn`, saving only x (this loop's / layer's own input; tensors
        shared across loops such as e or rope stay bound in `function`, stored once). x goes in as a
        fresh alias: DeepSpeed's checkpoint takes over its argument's storage (`.data` is replaced by
        the partition / CPU copy), which must not empty the caller's tensor."""
        return self.checkpoint_fn(function, x.view_as(x))

    def _run_layers(self, x, rope, q_source=None, h_prev=None, recall=None, tokens=None):
        cfg = self.cfg
        per_layer_ckpt = self.activation_checkpointing == "layer" and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            q_src = None
            if h_prev is not None:
                if self.arch == "flt" or (self.arch == "lt_ia" and i == 0):
                    q_src = h_prev
                elif self.arch == "flt_res":
                    x = rms_norm(x + h_prev, self.eps)
            rec = recall if (recall is not None and (i == 0 or cfg.internal_recall_layers == "all")) else None
            if per_layer_ckpt:
                x = self._checkpointed(functools.partial(layer, rope=rope, q_source=q_src, recall=rec,
                                                         recall_site=cfg.internal_recall_site, tokens=tokens), x)
            else:
                x = layer(x, rope, q_source=q_src, recall=rec, recall_site=cfg.internal_recall_site, tokens=tokens)
        return x

    def step(self, t: int, s: torch.Tensor, e: torch.Tensor, rope, tokens=None) -> torch.Tensor:
        """One loop iteration: returns the raw (un-normalised) output x(t) from state s = h(t-1).

        For t == 0 in the FLT family there is no previous loop (h(0) = none). tokens: the token ids, for
        layers with a value embedding (model.value_embeddings)."""
        if self.arch == "recurrent":
            recall = e if self.internal_recall else None
            if self.injection is None or self.internal_recall:
                u = s
            else:
                u = self.injection(s, e)
            x = self._run_layers(u, rope, recall=recall, tokens=tokens)
        else:
            h_prev = s if t > 0 else None
            x0 = e
            if self.arch == "lt_i" and h_prev is not None:
                x0 = rms_norm(e + h_prev, self.eps)
            x = self._run_layers(x0, rope, h_prev=h_prev, tokens=tokens)
        if self.rho is not None and (self.arch == "recurrent" or t > 0):  # FLT family: h(0) = none
            x = x + self.rho[min(t, self.rho.shape[0] - 1)].type_as(x) * s
        return x

    def _step_of_state(self, t, e, rope, s, tokens=None):
        # The token ids only when a layer needs them: megaloop/model/fixed_point.py patches `step` with
        # the four-argument form.
        return self.step(t, s, e, rope) if tokens is None else self.step(t, s, e, rope, tokens)

    def carry(self, x: torch.Tensor, final_norm: Optional[nn.Module]) -> torch.Tensor:
        """The state fed to the next loop from the raw output x(t)."""
        if not self.outer:
            return x
        norm = final_norm if self.outer_is_final else self.outer_norm
        return norm(x)

    def loop_map(self, t: int, s: torch.Tensor, e: torch.Tensor, rope,
                 final_norm: Optional[nn.Module] = None) -> torch.Tensor:
        """The state map of loop t, h(t-1) -> h(t) = carry(step(t, h(t-1))), with the injected e and
        rope held fixed: exactly what `forward` computes between loops (fixed-point diagnostics
        differentiate it, megaloop/model/fixed_point.py)."""
        return self.carry(self.step(t, s, e, rope), final_norm)

    # ------------------------------------------------------------------------------------------
    def _forward_rows(self, e, rope, loops, grad_loops, collect, diagnostics, final_norm, generator,
                      tokens) -> BlockOutput:
        """Per-sequence depths (loop.granularity='sequence', Parcae's per-sequence iteration): row b runs
        R_b iterations, gradients through its last G_b = min(grad_loops_b, R_b) of them. As in the
        reference, the rows run in two aligned phases: max_b(R_b - G_b) iterations under no_grad, in
        which row b updates during its first R_b - G_b, then max_b(G_b) iterations with gradients, in
        which row b updates during its first G_b; a row keeps its state once its phase is over. So row b
        computes exactly what it computes alone at (R_b, G_b), and no iteration needs gradients for some
        rows but not others. Unlike the reference, which computes every row every iteration and discards
        the finished ones, an iteration runs the layers on the rows still updating only (index_select,
        then index_copy into the state): the work is the mean R of the rows, not their maximum."""
        if collect:
            raise ValueError("per-sequence loop counts give no common per-loop outputs (loop.loss must be 'last', "
                             "no exit gate)")
        if self.arch != "recurrent" or self.rho is not None:
            raise ValueError("per-sequence loop counts need model.arch='recurrent' without model.loop_residual_gate")
        totals = loops.long()
        grads = totals if grad_loops is None else torch.as_tensor(grad_loops, device=totals.device).long()
        grads = torch.minimum(grads.expand_as(totals), totals).clamp_min(1)
        no_grad = totals - grads
        # The phase lengths on the host (a sync only for tensors received on the accelerator, once).
        ng_host, g_host = torch.stack([no_grad, grads]).tolist()
        if min(ng_host) < 0:
            raise ValueError(f"loops must be >= 1 for every row, got {[a + b for a, b in zip(ng_host, g_host)]}")
        n_max, g_max = max(ng_host), max(g_host)
        # Which rows update in each iteration (None: all), as slices of one index tensor sent once.
        flat, spans = [], []
        for t in range(n_max + g_max):
            lengths_host, j = (g_host, t - n_max) if t >= n_max else (ng_host, t)
            rows = [b for b, n in enumerate(lengths_host) if n > j]
            spans.append(None if len(rows) == len(lengths_host) else (len(flat), len(flat) + len(rows)))
            flat += rows
        index = torch.tensor(flat, dtype=torch.long).to(e.device) if flat else None
        grads = grads.to(e.device)
        s = self.initial_state(e, generator)
        per_loop_ckpt = self.activation_checkpointing == "loop"
        diag = ({"residual_norm": [], "state_norm": [], "state_delta": [], "relative_residual": []}
                if diagnostics else None)
        for t in range(n_max + g_max):
            in_grad = t >= n_max
            sel = None if spans[t] is None else index[spans[t][0]:spans[t][1]]
            s_in = s if sel is None else s.index_select(0, sel)
            with torch.set_grad_enabled(torch.is_grad_enabled() and in_grad):
                if per_loop_ckpt and torch.is_grad_enabled():
                    x = self._checkpointed(functools.partial(self._step_rows, t, e, rope, tokens, sel), s_in)
                else:
                    x = self._step_rows(t, e, rope, tokens, sel, s_in)
                h_new = self.carry(x, final_norm)
                new = h_new
                if in_grad and self.outer and not self.outer_is_final:  # a row's last output leaves raw
                    g_rows = grads if sel is None else grads.index_select(0, sel)
                    new = torch.where((g_rows == t - n_max + 1)[:, None, None], x, h_new)
            # Outside no_grad: a row waiting out the no-grad phase keeps its state with its gradient path
            # (state_init=embed starts from e itself).
            s_next = new if sel is None else s.index_copy(0, sel, new.to(s.dtype))
            if diag is not None:
                with torch.no_grad():  # over the tokens of the rows updating now
                    delta = (h_new.detach().float() - s_in.detach().float()).norm(dim=-1)
                    hn = h_new.detach().float().norm(dim=-1)
                    diag["residual_norm"].append(x.detach().float().norm(dim=-1).mean())
                    diag["state_norm"].append(hn.mean())
                    diag["state_delta"].append(delta.mean())
                    diag["relative_residual"].append((delta / hn.clamp_min(1e-12)).mean())
            s = s_next
        out = s if self.out_proj is None else self.out_proj(s)
        if diag is not None:
            diag = {k: torch.stack(v) for k, v in diag.items()}
            if isinstance(self.injection, ParcaeInjection):
                diag["injection_spectral_norm"] = self.injection.spectral_norm().detach().reshape(1)
        return BlockOutput(out, None, diag)

    def _step_rows(self, t, e, rope, tokens, sel, s):
        """One loop step of the rows `sel` (None: all) from their states s; e and the token ids are taken
        inside, so that per-loop checkpointing saves only s."""
        if sel is not None:
            e = e.index_select(0, sel)
            tokens = None if tokens is None else tokens.index_select(0, sel)
            rope = select_rows(rope, sel)  # packed documents: these rows' structure
        return self._step_of_state(t, e, rope, s, tokens)

    def forward(self, e: torch.Tensor, rope, loops: int, grad_loops: Optional[int] = None,
                collect: bool = False, diagnostics: bool = False, final_norm: Optional[nn.Module] = None,
                generator: Optional[torch.Generator] = None, tokens: Optional[torch.Tensor] = None) -> BlockOutput:
        """Run `loops` iterations; gradients flow through the last `grad_loops` of them only. `loops` (and
        `grad_loops`) may also be (B,) tensors: one depth per sequence (`_forward_rows`).

        final_norm: the LM's final norm, needed only when it is shared with the loop (Ouro).
        generator:  RNG for the random initial state (state_init=noise); default: the step's keyed one
                    (`set_noise_key`), else torch's global one.
        tokens:     the token ids (B, T), for layers with a value embedding (model.value_embeddings).
        collect:    also return the output of every loop that carries gradients (per-loop losses,
                    exit gates). For Ouro those outputs are already final-normed.
        """
        if generator is None:
            generator = self._keyed_generator(e)
        if torch.is_tensor(loops) and loops.dim() > 0:
            return self._forward_rows(e, rope, loops, grad_loops, collect, diagnostics, final_norm, generator,
                                      tokens)
        loops = int(loops)
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        grad_loops = loops if grad_loops is None else max(1, min(grad_loops, loops))
        no_grad_loops = loops - grad_loops
        if self.arch == "recurrent":
            s = self.initial_state(e, generator)
        else:
            s = e  # unused at t = 0
        per_loop = [] if collect else None
        diag = ({"residual_norm": [], "state_norm": [], "state_delta": [], "relative_residual": []}
                if diagnostics else None)
        per_loop_ckpt = self.activation_checkpointing == "loop"

        for t in range(loops):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= no_grad_loops):
                if per_loop_ckpt and torch.is_grad_enabled():
                    # Keep only this loop's input state; recompute the loop in backward. Non-reentrant,
                    # so it composes with the pipeline engine's partial backward.
                    x = self._checkpointed(functools.partial(self._step_of_state, t, e, rope, tokens=tokens), s)
                else:
                    x = self._step_of_state(t, e, rope, s, tokens)
                last = t == loops - 1
                # The last raw output leaves the block un-normalised unless the norm is shared with
                # the LM's final norm (Ouro), in which case it was always part of the loop.
                s_next = self.carry(x, final_norm) if (not last or self.outer_is_final) else x
            if collect and t >= no_grad_loops:
                per_loop.append(s_next if self.outer_is_final else x)
            if diag is not None:
                with torch.no_grad():
                    h_new = self.carry(x, final_norm)
                    diag["residual_norm"].append(x.detach().float().norm(dim=-1).mean())
                    diag["state_norm"].append(h_new.detach().float().norm(dim=-1).mean())
                    prev = s if (self.arch == "recurrent" or t > 0) else torch.zeros_like(s)
                    delta = (h_new.detach().float() - prev.detach().float()).norm(dim=-1)
                    diag["state_delta"].append(delta.mean())
                    # ||h(t) - h(t-1)|| / ||h(t)|| per token, averaged over the tokens (like the others).
                    diag["relative_residual"].append(
                        (delta / h_new.detach().float().norm(dim=-1).clamp_min(1e-12)).mean())
            s = s_next

        out = s
        if self.out_proj is not None:
            out = self.out_proj(out)
            if per_loop is not None:
                per_loop = [self.out_proj(p) for p in per_loop]
        if diag is not None:
            diag = {k: torch.stack(v) for k, v in diag.items()}
            if isinstance(self.injection, ParcaeInjection):
                diag["injection_spectral_norm"] = self.injection.spectral_norm().detach().reshape(1)
        return BlockOutput(out, per_loop, diag)
