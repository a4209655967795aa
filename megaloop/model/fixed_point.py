"""Fixed-point and gradient diagnostics of the looped block (issue 13), computed on request only.

Nothing here runs unless called; the model's forward is untouched (the cheap per-loop numbers, among
them `relative_residual`, come from `model(..., return_diagnostics=True)`). All three functions work
on one process on the plain model; under tensor / pipeline parallelism the looped stage must call
them and reduce the norms over TP ranks (not done here).

  loop_map_spectral_norm   ||d f / d h|| (spectral norm) of one loop's state map f at the last iterate
  input_dependence         how far the state after R loops moves for a small perturbation of e
  per_loop_grad_contributions
                           each loop's contribution to each shared layer's gradient: norm, and cosine
                           with the previous loop's contribution

The loop's state map is `LoopedBlock.loop_map(t, h, e, rope, final_norm)`: h(t-1) -> h(t) =
carry(step(t, h(t-1))) with the injected signal e (embedding after the prelude) and rope held fixed,
exactly what the block's forward computes between loops. The maps see the state of the whole batch,
(B, T, d), as one vector: attention couples the tokens, so the Jacobian is (B*T*d) x (B*T*d).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn


def _embed(model, tokens: torch.Tensor):
    rope = model.rope(tokens.shape[1], tokens.device)
    return model.embed(tokens, rope), rope


def _iterate(block, e, rope, loops: int, final_norm, s0: torch.Tensor) -> torch.Tensor:
    s = s0
    for t in range(loops):
        s = block.loop_map(t, s, e, rope, final_norm)
    return s


def last_iterate(model, tokens: torch.Tensor, loops: int,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, object]:
    """(h(R), e, rope) without gradients: the state the loop carries after `loops` iterations (for the
    loop's last output this is carry(x(R)), i.e. normalised where the loop normalises between loops).
    Cost: one embed + `loops` loop steps, no autograd graph."""
    block = model.block
    with torch.no_grad():
        e, rope = _embed(model, tokens)
        s0 = block.initial_state(e, generator) if block.arch == "recurrent" else e
        return _iterate(block, e, rope, loops, model.final_norm, s0), e, rope


def loop_map_spectral_norm(model, tokens: torch.Tensor, loops: int, iters: int = 8, seed: int = 0,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Estimate sigma_max(J), J = d f / d h at h = h(R), f = the state map of the next loop
    (`block.loop_map(R, ., e, rope)`; the per-loop rho gate, if any, clamps to its last row). < 1 means
    the loop contracts around its last iterate (a locally stable fixed point).

    Method: `iters` steps of Lanczos on J^T J (each step one J v by torch.func.jvp and one J^T (J v) by
    torch.func.vjp), full reorthogonalisation, sigma = sqrt(largest Ritz value). Same products as
    `iters` power-iteration steps but a far better estimate when the top singular values cluster (as
    they do near init, where J is close to a projection); like power iteration it converges from below.

    Cost: last_iterate (R no-grad loop steps) + one loop step with autograd kept (vjp) + `iters`
    Jacobian-vector products (each about one more loop step forward, forward-mode AD through the step)
    + `iters` vector-Jacobian products (each about one loop step's backward): roughly 2 * iters + 2
    extra loop-step evaluations; memory: one loop step's activations + `iters` float32 copies of the
    state. Attention runs on SDPA's math kernel here (the fused kernels lack forward-mode AD); mixers
    with custom kernels must support torch.func.jvp (DSA's sparse attention, an autograd.Function
    without functorch support, does not yet: RuntimeError).
    Deterministic for a given `seed` (the start vector). Returns a float32 scalar tensor."""
    block = model.block
    h, e, rope = last_iterate(model, tokens, loops, generator)
    final_norm = model.final_norm

    def f(x):
        return block.loop_map(loops, x, e, rope, final_norm)

    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(h.numel(), generator=g, dtype=torch.float32).to(h.device)
    basis = [v / v.norm()]
    alphas, betas = [], []
    with _params_frozen(model), _math_attention():
        _, vjp_fn = torch.func.vjp(f, h)

        def jtj(x):
            _, jv = torch.func.jvp(f, (h,), (x.to(h.dtype).reshape(h.shape),))
            (w,) = vjp_fn(jv)
            return w.reshape(-1).float()

        for j in range(max(1, iters)):
            w = jtj(basis[j])
            a = torch.dot(w, basis[j])
            alphas.append(a)
            for q in basis:  # full reorthogonalisation (twice is enough)
                w = w - torch.dot(w, q) * q
            for q in basis:
                w = w - torch.dot(w, q) * q
            b = w.norm()
            if j == iters - 1 or b <= 1e-7 * a.abs().clamp_min(1e-30):
                break
            betas.append(b)
            basis.append(w / b)
    n = len(alphas)
    T = torch.diag(torch.stack(alphas).double())
    if n > 1:
        off = torch.stack(betas[: n - 1]).double()
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    lam = torch.linalg.eigvalsh(T).max().clamp_min(0)
    return lam.sqrt().float().detach()


def input_dependence(model, tokens: torch.Tensor, loops: int, eps: float = 1e-3, seed: int = 0,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """||h(R)(e + eps u) - h(R)(e)|| / (eps ||u||) for a random unit direction u of the injected signal e
    (a (B, T, d) tensor, seeded by `seed`): a finite-difference estimate of how strongly the fixed
    point depends on its input (~ ||(I - J)^{-1} d f/d e u|| at a fixed point; 0 would mean the loop
    forgets its input). e is perturbed wherever the loop reads it (injection, and the initial state when
    state_init=embed); a random initial state (state_init=noise) is drawn once and shared by both runs.
    eps is absolute: keep eps well above the dtype's rounding of ||h|| (float32: 1e-3 is fine).

    Cost: 2 * R no-grad loop steps (+ one embed), no autograd graph. Returns a float32 scalar tensor."""
    block = model.block
    with torch.no_grad():
        e, rope = _embed(model, tokens)
        g = torch.Generator(device="cpu").manual_seed(seed)
        u = torch.randn(e.shape, generator=g, dtype=torch.float32).to(device=e.device, dtype=e.dtype)
        u = u / u.norm()
        e2 = e + eps * u
        if block.arch != "recurrent":
            s0, s0_2 = e, e2
        elif block.cfg.state_init == "embed":
            s0, s0_2 = block.initial_state(e), block.initial_state(e2)
        else:
            s0 = block.initial_state(e, generator)
            s0_2 = s0
        h1 = _iterate(block, e, rope, loops, model.final_norm, s0)
        h2 = _iterate(block, e2, rope, loops, model.final_norm, s0_2)
        return ((h2.float() - h1.float()).norm() / (eps * u.float().norm())).detach()


def _math_attention():
    """The fused SDPA kernels (CPU flash, CUDA flash / memory-efficient) have no forward-mode AD; the math
    kernel (composite ops) has. It materialises the (T x T) scores per head: fine for a diagnostic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _params_frozen(model):
    """Parameters as constants for the torch.func transforms (no parameter gradients are built)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in flags:
            p.requires_grad_(r)


# ---------------------------------------------------------------------------------------------
# Per-loop gradient contributions of the shared block

class _Step(nn.Module):
    """Calls the block's (class) step, so torch.func.functional_call can swap the block's parameters
    for one loop's copies (the block's own `step` attribute is patched to route here)."""
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, t, s, e, rope):
        return type(self.block).step(self.block, t, s, e, rope)


def _group(name: str) -> Optional[str]:
    """Parameter name inside the block -> its group: "layer{i}" for the shared layers, "injection";
    None for parameters outside the loop step (outer norm, out_proj) or indexed per loop (rho)."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"layer{parts[1]}"
    if parts[0] == "injection":
        return "injection"
    return None


def per_loop_grad_contributions(model, tokens: torch.Tensor, labels: torch.Tensor,
                                loops: Optional[int] = None, grad_loops: Optional[int] = None,
                                return_grads: bool = False, **forward_kwargs) -> Dict[str, object]:
    """One forward/backward of `model(tokens, labels, loops, grad_loops)` in which loop t's step uses its
    own copy of the shared block parameters (`torch.func.functional_call`), so that d loss / d copy_t
    is loop t's contribution to the shared parameter's gradient; the contributions sum to `.grad`
    (the chain rule over the R uses of one weight). Returns

      groups       ["layer0", ..., ("injection")]
      grad_norm    (R, G): ||contribution of loop t to group g|| (all of the group's parameters)
      grad_cosine  (R, G): cosine with loop t-1's contribution (NaN for t = 0 and where a norm is 0,
                   e.g. loops run without gradients under grad_loops)
      loss         the loss (detached)
      grads        {param name in the block: (R, *shape)} when return_grads (zeros where the loss
                   does not reach a parameter, e.g. DSA's indexer, trained by its own loss)

    Leaves every `.grad` untouched (torch.autograd.grad w.r.t. the copies only); the block's step is
    patched for the call and restored. Cost: one training forward + backward, plus R copies of the
    shared block's parameters and of their gradients (memory R x block params x 2). Losses other than
    the model's own (`labels`) are not supported; forward_kwargs go to model(...)."""
    block = model.block
    loops = model.cfg.loops if loops is None else int(loops)
    names = [(n, p) for n, p in block.named_parameters() if _group(n) is not None]
    groups = list(dict.fromkeys(_group(n) for n, _ in names))  # in registration order
    copies: List[Dict[str, torch.Tensor]] = [
        {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in names} for _ in range(loops)]
    wrapper = _Step(block)

    def patched_step(t, s, e, rope):
        params = {f"block.{n}": c for n, c in copies[t].items()}
        return torch.func.functional_call(wrapper, params, (t, s, e, rope), strict=False)

    block.step = patched_step
    try:
        out = model(tokens, labels=labels, loops=loops, grad_loops=grad_loops, **forward_kwargs)
    finally:
        del block.step
    flat = [c[n] for c in copies for n, _ in names]
    grads = torch.autograd.grad(out.loss, [x for x in flat if x.requires_grad], allow_unused=True)
    it = iter(grads)
    per = [{n: (next(it) if c[n].requires_grad else None) for n, _ in names} for c in copies]
    per = [{n: (g if g is not None else torch.zeros_like(c[n])) for n, g in d.items()}
           for d, c in zip(per, copies)]

    R, G = loops, len(groups)
    norm = torch.zeros(R, G, dtype=torch.float64)
    cos = torch.full((R, G), float("nan"), dtype=torch.float64)
    for gi, grp in enumerate(groups):
        members = [n for n, _ in names if _group(n) == grp]
        vecs = [torch.cat([per[t][n].detach().double().reshape(-1) for n in members]) for t in range(R)]
        for t in range(R):
            norm[t, gi] = vecs[t].norm()
            if t > 0 and norm[t, gi] > 0 and norm[t - 1, gi] > 0:
                cos[t, gi] = vecs[t] @ vecs[t - 1] / (norm[t, gi] * norm[t - 1, gi])
    result = {"groups": groups, "grad_norm": norm, "grad_cosine": cos, "loss": out.loss.detach()}
    if return_grads:
        result["grads"] = {n: torch.stack([per[t][n] for t in range(R)]) for n, _ in names}
    return result
