"""Fixed-point and gradient diagnostics of the looped block (issue 13), computed on request only.

Nothing here runs unless called; the model's forward is untouched (the cheap per-loop numbers, among
them `relative_residual`, come from `model(..., return_diagnostics=True)`). The functions work on the
plain model and on a tensor-parallel one (every TP rank calls them; `seq_comm` under sequence
parallelism); megaloop/training/diagnostics.py calls them during training (`train.diag_interval`) and
reduces the per-loop gradient norms over TP ranks.

  loop_map_spectral_norm   ||d f / d h|| (spectral norm) of one loop's state map f at the last iterate
  input_dependence         how far the state after R loops moves for a small perturbation of e
  per_loop_grad_contributions
                           each loop's contribution to each shared layer's gradient: norm, and cosine
                           with the previous loop's contribution

The loop's state map is `LoopedBlock.loop_map(t, h, e, rope, final_norm)`: h(t-1) -> h(t) =
carry(step(t, h(t-1))) with the injected signal e (embedding after the prelude) and rope held fixed,
exactly what the block's forward computes between loops. The block-level forms (`block_spectral_norm`,
`block_input_dependence`, `per_loop_copies`) start from (block, e, rope, final_norm) instead of the
tokens: a pipeline stage holding the looped block but not the embedding calls them. The maps see the state of the whole batch,
(B, T, d), as one vector: attention couples the tokens, so the Jacobian is (B*T*d) x (B*T*d).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn


def _embed(model, tokens: torch.Tensor):
    rope = model.rope(tokens.shape[1], tokens.device, tokens)
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
    with torch.no_grad():
        e, rope = _embed(model, tokens)
    return last_iterate_of_block(model.block, e, rope, loops, model.final_norm, generator), e, rope


def last_iterate_of_block(block, e: torch.Tensor, rope, loops: int, final_norm,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """h(R) from the injected signal e (what `last_iterate` computes after the embedding): the block-level
    form, for a pipeline stage that holds the block but not the embedding."""
    with torch.no_grad():
        s0 = block.initial_state(e, generator) if block.arch == "recurrent" else e
        return _iterate(block, e, rope, loops, final_norm, s0)


def _seq_sum(x: torch.Tensor, seq_comm) -> torch.Tensor:
    """A sum over this rank's part of the state, completed over the sequence-parallel group (if any)."""
    if seq_comm is not None and seq_comm.size > 1:
        x = seq_comm.all_reduce(x.reshape(1).clone()).reshape(())
    return x


def _random_like_state(shape, seed: int, device, dtype, seq_comm) -> torch.Tensor:
    """A seeded standard-normal tensor of the state's shape: under sequence parallelism the whole
    sequence's draw (identical to one process's) and this rank's chunk of it."""
    full = list(shape)
    if seq_comm is not None and seq_comm.size > 1:
        full[1] *= seq_comm.size
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(full, generator=g, dtype=torch.float32)
    if seq_comm is not None and seq_comm.size > 1:
        u = u.chunk(seq_comm.size, dim=1)[seq_comm.rank].contiguous()
    return u.to(device=device, dtype=dtype)


def loop_map_spectral_norm(model, tokens: torch.Tensor, loops: int, iters: int = 8, seed: int = 0,
                           generator: Optional[torch.Generator] = None, seq_comm=None) -> torch.Tensor:
    """Estimate sigma_max(J), J = d f / d h at h = h(R), f = the state map of the next loop
    (`block.loop_map(R, ., e, rope)`; the per-loop rho gate, if any, clamps to its last row). < 1 means
    the loop contracts around its last iterate (a locally stable fixed point).

    Method: `iters` steps of Lanczos on J^T J (each step one J v by forward-mode AD,
    torch.autograd.forward_ad, and one J^T (J v) by a backward through one loop step kept for the
    purpose), full reorthogonalisation, sigma = sqrt(largest Ritz value). Same products as
    `iters` power-iteration steps but a far better estimate when the top singular values cluster (as
    they do near init, where J is close to a projection); like power iteration it converges from below.

    Cost: last_iterate (R no-grad loop steps) + one loop step with its autograd graph kept + `iters`
    Jacobian-vector products (each about one more loop step forward, forward-mode AD through the step)
    + `iters` vector-Jacobian products (each about one loop step's backward): roughly 2 * iters + 2
    extra loop-step evaluations; memory: one loop step's activations + `iters` float32 copies of the
    state. Attention runs on SDPA's math kernel here (the fused kernels lack forward-mode AD); mixers
    with custom kernels must define forward-mode AD (`jvp` of their autograd.Function): DSA's sparse
    attention does not (NotImplementedError). Under tensor parallelism every TP rank calls it (the TP
    operators define their tangents); `seq_comm`: the TP group when the state is a sequence shard
    (sequence parallelism), over which the Lanczos dot products are summed.
    Deterministic for a given `seed` (the start vector). Returns a float32 scalar tensor."""
    with torch.no_grad():
        e, rope = _embed(model, tokens)
    return block_spectral_norm(model.block, e, rope, loops, model.final_norm, iters, seed, generator, seq_comm)


def block_spectral_norm(block, e: torch.Tensor, rope, loops: int, final_norm=None, iters: int = 8, seed: int = 0,
                        generator: Optional[torch.Generator] = None, seq_comm=None) -> torch.Tensor:
    """loop_map_spectral_norm from the injected signal e (the block-level form: a pipeline stage holding
    the block, e, rope and, for Ouro, the shared final norm). Same method, cost and result."""
    import torch.autograd.forward_ad as fwAD
    h = last_iterate_of_block(block, e, rope, loops, final_norm, generator)

    def f(x):
        return block.loop_map(loops, x, e, rope, final_norm)

    def dot(a, b):
        return _seq_sum(torch.dot(a, b), seq_comm)

    v = _random_like_state(h.shape, seed, h.device, torch.float32, seq_comm).reshape(-1)
    basis = [v / dot(v, v).sqrt()]
    alphas, betas = [], []
    with _params_frozen(block, final_norm), _math_attention():
        h_in = h.detach().requires_grad_(True)
        with torch.enable_grad():
            y = f(h_in)

        def jtj(x):
            with torch.no_grad(), fwAD.dual_level():
                jv = fwAD.unpack_dual(f(fwAD.make_dual(h, x.to(h.dtype).reshape(h.shape)))).tangent
            (w,) = torch.autograd.grad(y, h_in, jv, retain_graph=True)
            return w.reshape(-1).float()

        for j in range(max(1, iters)):
            w = jtj(basis[j])
            a = dot(w, basis[j])
            alphas.append(a)
            for q in basis:  # full reorthogonalisation (twice is enough)
                w = w - dot(w, q) * q
            for q in basis:
                w = w - dot(w, q) * q
            b = dot(w, w).sqrt()
            if j == iters - 1 or b <= 1e-7 * a.abs().clamp_min(1e-30):
                break
            betas.append(b)
            basis.append(w / b)
        del y
    n = len(alphas)
    T = torch.diag(torch.stack(alphas).double())
    if n > 1:
        off = torch.stack(betas[: n - 1]).double()
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    lam = torch.linalg.eigvalsh(T).max().clamp_min(0)
    return lam.sqrt().float().detach()


def input_dependence(model, tokens: torch.Tensor, loops: int, eps: float = 1e-3, seed: int = 0,
                     generator: Optional[torch.Generator] = None, seq_comm=None) -> torch.Tensor:
    """||h(R)(e + eps u) - h(R)(e)|| / (eps ||u||) for a random unit direction u of the injected signal e
    (a (B, T, d) tensor, seeded by `seed`): a finite-difference estimate of how strongly the fixed
    point depends on its input (~ ||(I - J)^{-1} d f/d e u|| at a fixed point; 0 would mean the loop
    forgets its input). e is perturbed wherever the loop reads it (injection, and the initial state when
    state_init=embed); a random initial state (state_init=noise) is drawn once and shared by both runs.
    eps is absolute: keep eps well above the dtype's rounding of ||h|| (float32: 1e-3 is fine).
    `seq_comm`: as in loop_map_spectral_norm (sequence parallelism: u is the whole sequence's draw, the
    norms are summed over the group).

    Cost: 2 * R no-grad loop steps (+ one embed), no autograd graph. Returns a float32 scalar tensor."""
    with torch.no_grad():
        e, rope = _embed(model, tokens)
    return block_input_dependence(model.block, e, rope, loops, model.final_norm, eps, seed, generator, seq_comm)


def block_input_dependence(block, e: torch.Tensor, rope, loops: int, final_norm=None, eps: float = 1e-3,
                           seed: int = 0, generator: Optional[torch.Generator] = None,
                           seq_comm=None) -> torch.Tensor:
    """input_dependence from the injected signal e (the block-level form). Same method, cost and result."""
    with torch.no_grad():
        u = _random_like_state(e.shape, seed, e.device, torch.float32, seq_comm)
        u = (u / _seq_sum(u.pow(2).sum(), seq_comm).sqrt()).to(e.dtype)
        e2 = e + eps * u
        if block.arch != "recurrent":
            s0, s0_2 = e, e2
        elif block.cfg.state_init == "embed":
            s0, s0_2 = block.initial_state(e), block.initial_state(e2)
        else:
            s0 = block.initial_state(e, generator)
            s0_2 = s0
        h1 = _iterate(block, e, rope, loops, final_norm, s0)
        h2 = _iterate(block, e2, rope, loops, final_norm, s0_2)
        diff = _seq_sum((h2.float() - h1.float()).pow(2).sum(), seq_comm).sqrt()
        return (diff / (eps * _seq_sum(u.float().pow(2).sum(), seq_comm).sqrt())).detach()


def _math_attention():
    """The fused SDPA kernels (CPU flash, CUDA flash / memory-efficient) have no forward-mode AD; the math
    kernel (composite ops) has. It materialises the (T x T) scores per head: fine for a diagnostic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _params_frozen(*modules):
    """Parameters as constants for the torch.func transforms (no parameter gradients are built)."""
    flags = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
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
    the model's own (`labels`) are not supported; forward_kwargs go to model(...). On one process;
    under tensor parallelism see megaloop/training/diagnostics.py (per_loop_grads + contribution_stats
    with the TP reductions)."""
    loss, groups, grads = per_loop_grads(model, tokens, labels, loops, grad_loops, **forward_kwargs)
    norm, cos = contribution_stats(grads, groups)
    result = {"groups": groups, "grad_norm": norm, "grad_cosine": cos, "loss": loss}
    if return_grads:
        result["grads"] = grads
    return result


def per_loop_grads(model, tokens: torch.Tensor, labels: torch.Tensor, loops: Optional[int] = None,
                   grad_loops: Optional[int] = None, **forward_kwargs):
    """(loss, groups, {param name in the block: (R, *shape) per-loop gradient contributions}): the
    computation behind per_loop_grad_contributions (same cost)."""
    loops = model.cfg.loops if loops is None else int(loops)
    with per_loop_copies(model.block, loops) as copies:
        out = model(tokens, labels=labels, loops=loops, grad_loops=grad_loops, **forward_kwargs)
    return out.loss.detach(), copies.groups, copies.grads(out.loss)


class PerLoopCopies:
    """One copy of the shared block's parameters per loop (see per_loop_copies); `grads` backpropagates
    into them."""

    def __init__(self, block, loops: int):
        self.names = [(n, p) for n, p in block.named_parameters() if _group(n) is not None]
        self.groups = list(dict.fromkeys(_group(n) for n, _ in self.names))  # in registration order
        self.copies: List[Dict[str, torch.Tensor]] = [
            {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in self.names} for _ in range(loops)]

    def grads(self, outputs, grad_outputs=None) -> Dict[str, torch.Tensor]:
        """{param name in the block: (R, *shape)}: d outputs / d copy_t (outputs: the loss, or tensors with
        their incoming gradients `grad_outputs`, e.g. from the next pipeline stage); zeros where the
        outputs do not reach a copy. `.grad` is untouched."""
        names, copies = self.names, self.copies
        flat = [c[n] for c in copies for n, _ in names]
        wanted = [x for x in flat if x.requires_grad]
        grads = torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True) if wanted else []
        it = iter(grads)
        per = [{n: (next(it) if c[n].requires_grad else None) for n, _ in names} for c in copies]
        per = [{n: (g if g is not None else torch.zeros_like(c[n])) for n, g in d.items()}
               for d, c in zip(per, copies)]
        del flat, wanted, grads, it
        self.copies = None
        stacked = {}
        for n, _ in names:  # one parameter at a time, freeing the per-loop pieces as they are stacked
            stacked[n] = torch.stack([d.pop(n) for d in per])
        return stacked


@contextlib.contextmanager
def per_loop_copies(block, loops: int):
    """Within the context, loop t of `block` runs its step with its own copy of the shared parameters
    (`torch.func.functional_call`), so that d loss / d copy_t is loop t's contribution to the shared
    parameter's gradient. Yields the PerLoopCopies; the block's step is restored on exit."""
    copies = PerLoopCopies(block, int(loops))
    wrapper = _Step(block)

    def patched_step(t, s, e, rope):
        params = {f"block.{n}": c for n, c in copies.copies[t].items()}
        return torch.func.functional_call(wrapper, params, (t, s, e, rope), strict=False)

    block.step = patched_step
    try:
        yield copies
    finally:
        del block.step


def contribution_stats(grads: Dict[str, torch.Tensor], groups: List[str],
                       counted: Optional[Callable[[str], bool]] = None,
                       sum_over_ranks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """(grad_norm, grad_cosine), both (R, G) float64 on the host, from per-loop contributions
    {name: (R, *shape)} (see per_loop_grad_contributions). counted(name): whether this process's
    copy of the parameter counts (a model split over ranks counts each distinct element once);
    sum_over_ranks: sums the (2, R, G) float64 device tensor of partial squared norms and dot products
    over those ranks (in place or returned). One host read."""
    members = {g: [n for n in grads if _group(n) == g and (counted is None or counted(n))] for g in groups}
    R = next(iter(grads.values())).shape[0] if grads else 0
    device = next(iter(grads.values())).device if grads else torch.device("cpu")
    sums = torch.zeros(2, R, len(groups), dtype=torch.float64, device=device)  # [squared norm, dot with t-1]
    for gi, grp in enumerate(groups):
        for n in members[grp]:
            v = grads[n].detach().double().reshape(R, -1)
            sums[0, :, gi] += (v * v).sum(1)
            if R > 1:
                sums[1, 1:, gi] += (v[1:] * v[:-1]).sum(1)
    if sum_over_ranks is not None:
        out = sum_over_ranks(sums)
        sums = sums if out is None else out
    sums = sums.cpu()
    norm = sums[0].sqrt()
    cos = torch.full((R, len(groups)), float("nan"), dtype=torch.float64)
    if R > 1:
        denom = norm[1:] * norm[:-1]
        cos[1:] = torch.where(denom > 0, sums[1, 1:] / denom.clamp_min(1e-300), cos[1:])
    return norm, cos
