"""Gated delta rule (Gated DeltaNet, Yang et al. 2024): a per-token reference and a chunkwise form.

Convention used throughout this file (the flash-linear-attention one). Per batch and head the state
S is a (Dk x Dv) matrix, keys index its rows and values its columns:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        alpha_t = exp(g_t)
    o_t = scale * S_t^T q_t                                                  scale = 1/sqrt(Dk)

Equivalently, in the "delta" reading: decay the state, ask it what it currently stores for k_t,
and write only the correction:

    S'  = alpha_t S_{t-1}
    u_t = beta_t (v_t - S'^T k_t)
    S_t = S' + k_t u_t^T

(looped_models.md writes the same rule with S transposed, i.e. S as Dv x Dk.)

Shapes: q, k (B, T, H, Dk); v (B, T, H, Dv); g, beta (B, T, H); state (B, H, Dk, Dv).
g is a log-decay (g <= 0) and beta is in (0, 1). Normalising q and k (the mixer L2-normalises
them) and producing g/beta from the hidden states are the caller's job.

Precision: half/bfloat16 inputs are computed in float32 internally and the output is cast back;
the returned state stays in the compute dtype (float32 or float64), as it is a carry.

Packed documents (doc_ids (B, T), megaloop/model/documents.py): the state is zeroed where a new
document starts, S_t = beta_t k_t v_t^T there (alpha_t = 0, i.e. g_t = -inf). The chunked form does not
put -inf into its cumulative log-decays (differences of huge numbers lose the within-document decays);
it keeps g finite and multiplies each decay factor e^{G_i - G_j} by "no document start in (j, i]"
(see `gated_delta_rule_chunked`), which is exact.
"""
import functools
import math
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from megaloop.errors import MegaloopError  # (a leaf module: ops still depend on nothing else in megaloop)
import torch
import torch.nn.functional as F

__all__ = ["GDN_KERNELS", "GDNKernelUnavailable", "GDNKernelWarning", "describe_kernel_choice", "gated_delta_rule",
           "gated_delta_rule_chunked", "gated_delta_rule_recurrent", "select_gdn_kernel"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The state is a long-lived accumulator: never run it in half precision.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_shapes(q, k, v, g, beta, initial_state):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (B, T, H, Dv) = ({B}, {T}, {H}, Dv), got {tuple(v.shape)}")
    if g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"g and beta must be (B, T, H) = ({B}, {T}, {H}), got {tuple(g.shape)}, {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(f"initial_state must be (B, H, Dk, Dv) = ({B}, {H}, {Dk}, {Dv}), got {tuple(initial_state.shape)}")


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the token starts a new document (its predecessor is in another one; never at t = 0,
    whose state is the carried initial state)."""
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def gated_delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                               initial_state: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                               doc_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Naive token-by-token gated delta rule. The reference the chunked form is tested against,
    and the right tool for single-token decode. Returns (o (B, T, H, Dv), final_state (B, H, Dk, Dv))."""
    _check_shapes(q, k, v, g, beta, initial_state)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    out_dtype = v.dtype
    dtype = _compute_dtype(q.dtype)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))

    if initial_state is None:
        state = q.new_zeros(B, H, Dk, Dv)
    else:
        state = initial_state.to(dtype)
    keep = None if doc_ids is None else (~document_starts(doc_ids)).to(dtype)  # 0: a document starts
    outputs = []
    for t in range(T):
        k_t, q_t = k[:, t], q[:, t]                                      # (B, H, Dk)
        state = state * g[:, t].exp()[..., None, None]                   # S' = alpha S
        if keep is not None:
            state = state * keep[:, t, None, None, None]
        stored = torch.einsum("bhkv,bhk->bhv", state, k_t)               # S'^T k
        correction = beta[:, t, :, None] * (v[:, t] - stored)            # u
        state = state + k_t[..., :, None] * correction[..., None, :]     # S' + k u^T
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q_t) * scale)
    o = torch.stack(outputs, dim=1) if T > 0 else v.new_zeros(B, 0, H, Dv)
    return o.to(out_dtype), state


def gated_delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                             initial_state: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                             chunk_size: int = 64, doc_ids: Optional[torch.Tensor] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel gated delta rule, numerically equal to `gated_delta_rule_recurrent`.

    Inside a chunk of C tokens, with S_0 the state entering the chunk and G_i = g_1 + ... + g_i
    (cumulative log-decay from the chunk start), the corrections u_i of the delta form satisfy

        u_i = beta_i (v_i - e^{G_i} S_0^T k_i - sum_{j<i} e^{G_i - G_j} (k_i . k_j) u_j)

    i.e. the lower-triangular system (I + A) U = diag(beta) V - diag(beta e^G) K S_0 with
    A_ij = beta_i e^{G_i - G_j} (k_i . k_j) for j < i. Solving it once per chunk (the UT transform)
    gives U = U_v - W S_0 with U_v = (I + A)^-1 diag(beta) V and W = (I + A)^-1 diag(beta e^G) K;
    both depend only on the chunk's own inputs, so they are computed for all chunks in parallel.
    After that the chunk is plain decayed linear attention with u in place of v:

        o_i      = scale * (e^{G_i} S_0^T q_i + sum_{j<=i} e^{G_i - G_j} (q_i . k_j) u_j)
        S_C      = e^{G_C} S_0 + sum_j e^{G_C - G_j} k_j u_j^T

    Only the state hand-off between chunks is sequential (a Python loop over T / C chunks).
    Cost per head: O(T C (Dk + Dv) + T Dk Dv) time; O(T C) memory for the intra-chunk matrices
    plus the T / C chunk-boundary states (Dk x Dv each) that autograd keeps for backward.

    T need not be a multiple of chunk_size: the tail is padded with k = v = q = 0, g = 0, beta = 0,
    which leaves the state untouched (alpha = 1, nothing written).

    doc_ids: with n_i the number of document starts in the chunk up to i, e^{G_i - G_j} is kept only
    where n_i = n_j, e^{G_i} (from S_0) only where n_i = 0, e^{G_C - G_j} only where n_C = n_j.
    """
    _check_shapes(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    out_dtype = v.dtype
    dtype = _compute_dtype(q.dtype)
    state = q.new_zeros(B, H, Dk, Dv, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), state

    C = chunk_size
    N = (T + C - 1) // C
    pad = N * C - T

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # (B, T, H, ...) -> (B, H, N, C, ...), zero-padded along T.
        x = x.to(dtype).transpose(1, 2)
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], pad, *x.shape[3:])], dim=2)
        return x.reshape(B, H, N, C, *x.shape[3:])

    q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))
    same_doc = from_start = to_end = None
    if doc_ids is not None:  # documents started in the chunk up to i, (B, 1, N, C) (heads broadcast)
        starts = document_starts(doc_ids).to(dtype)
        n = F.pad(starts, (0, pad)).view(B, 1, N, C).cumsum(-1)
        same_doc = (n[..., :, None] == n[..., None, :]).to(dtype)             # (B, 1, N, C, C)
        from_start = (n == 0).to(dtype)                                       # no start in [0, i]
        to_end = (n == n[..., -1:]).to(dtype)                                 # no start in (j, C)

    # --- everything below, up to the chunk loop, is parallel over (B, H, N) ---
    log_decay = g.cumsum(dim=-1)                                             # G_i   (B, H, N, C)
    # e^{G_i - G_j} for j <= i. Mask *before* exp: G_i - G_j > 0 above the diagonal could overflow.
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    pair_log_decay = log_decay[..., :, None] - log_decay[..., None, :]
    decay_mask = pair_log_decay.masked_fill(~causal, 0.0).exp() * causal    # (B, H, N, C, C)
    decay = log_decay.exp()                                                 # e^{G_i}
    if same_doc is not None:
        decay_mask = decay_mask * same_doc
        decay = decay * from_start

    # UT transform: solve (I + A) X = [diag(beta) V | diag(beta e^G) K] with A strictly lower.
    k_beta = k * beta[..., None]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    A = (k_beta @ k.transpose(-1, -2)) * decay_mask * strictly_lower
    eye = torch.eye(C, dtype=dtype, device=q.device)
    rhs = torch.cat([v * beta[..., None], k_beta * decay[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    u_from_values, w = solved[..., :Dv], solved[..., Dv:]                   # U = U_v - W S_0

    # Intra-chunk attention (decayed, causal incl. the diagonal) and the inter-chunk read-out terms.
    intra_attention = (q @ k.transpose(-1, -2)) * decay_mask * scale        # (B, H, N, C, C)
    q_decayed = q * (decay[..., None] * scale)                              # e^{G_i} q_i
    chunk_log_decay = log_decay[..., -1:]                                   # G_C   (B, H, N, 1)
    to_chunk_end = (chunk_log_decay - log_decay).exp()                      # e^{G_C - G_j}
    chunk_decay = decay[..., -1:, None]                                     # e^{G_C} (B, H, N, 1, 1)
    if to_end is not None:
        to_chunk_end = to_chunk_end * to_end
    k_to_chunk_end = k * to_chunk_end[..., None]

    # --- sequential hand-off of the state between chunks ---
    outputs = []
    for n in range(N):
        u = u_from_values[:, :, n] - w[:, :, n] @ state                      # (B, H, C, Dv)
        outputs.append(q_decayed[:, :, n] @ state + intra_attention[:, :, n] @ u)
        state = chunk_decay[:, :, n] * state + k_to_chunk_end[:, :, n].transpose(-1, -2) @ u

    o = torch.stack(outputs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), state



# ------------------------------------------------------------------------------------------------
# Kernel selection: flash-linear-attention's Triton kernel or the torch chunked form above.
#
#   kernel="torch": always `gated_delta_rule_chunked` (fla is never imported).
#   kernel="fla":   fla's `chunk_gated_delta_rule`, or GDNKernelUnavailable saying why not.
#   kernel="auto":  fla when `fla_device_supported` accepts the device/dtype (CUDA, half/bfloat16),
#                   fla imports, and a tiny forward+backward probe on that device/dtype runs and
#                   agrees with the torch form; otherwise the torch form, with ONE GDNKernelWarning
#                   when fla was expected to run (supported device/dtype) but did not. Some fla
#                   releases raise only in backward (fla 0.6 on Hopper with Triton >= 3.4, < 3.7.1):
#                   hence the probe includes a backward pass.
#
# The torch form is wrapped in torch.compile on non-CPU devices while autograd is on (training):
# the chunked form is dozens of small element-wise ops per chunk, which Inductor fuses. Under
# no_grad (evaluation, generation with a growing context) it runs eagerly, so varying lengths never
# trigger recompilations. The compiled path is probed like fla; a failure means one warning and
# the eager path. MEGALOOP_GDN_COMPILE=0 turns compilation off, =1 forces it (also on CPU).
#
# Each choice is made once per (kernel, device, dtype, head dims) and cached; `select_gdn_kernel`
# returns it and `describe_kernel_choice` renders it as the line a trainer logs at startup.
# Inside a compiled region (train.compile compiles whole layers) the dispatch is traced: the cached
# lookup is plain Python that Dynamo specialises on, the selection/probe and fla's kernels are
# excluded from tracing (torch.compiler.disable), and the torch form is traced into the layer's graph.

GDN_KERNELS = ("auto", "fla", "torch")


class GDNKernelUnavailable(MegaloopError, RuntimeError):
    """model.gdn_kernel=fla was asked for but flash-linear-attention cannot run here."""


class GDNKernelWarning(UserWarning):
    """A faster GDN kernel was expected but could not be used; the torch path runs instead."""


@dataclass(frozen=True)
class GDNKernelChoice:
    name: str        # "fla" | "torch" | "torch+compile"
    fn: Callable     # fn(q, k, v, g, beta, initial_state, scale, chunk_size) -> (o, final_state)
    detail: str      # version / why the faster path was not taken


_CHOICES: Dict[tuple, GDNKernelChoice] = {}
_WARNED: set = set()
_COMPILE_BACKEND = "inductor"  # tests swap in "eager" (dynamo tracing only, no code generation)
_PROBE_T, _PROBE_H = 80, 2     # one full 64-token chunk plus a partial one (fla's chunk is 64)


def fla_device_supported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when fla's Triton kernels may run on this device/dtype, else the reason they cannot.
    float32 stays off fla (some releases reject it) and float64 is the exactness-testing dtype.
    Tests monkeypatch this to exercise the selection on CPU."""
    if device.type != "cuda":
        return f"fla's Triton kernels need a CUDA device, not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"fla is used for float16/bfloat16 only, not {str(dtype).replace('torch.', '')}"
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, GDNKernelWarning, stacklevel=3)


def reset_kernel_cache() -> None:
    """Forget every cached choice and emitted warning (tests; or after installing fla mid-process)."""
    _CHOICES.clear()
    _WARNED.clear()
    _compiled_chunked.cache_clear()


def _torch_run(q, k, v, g, beta, initial_state, scale, chunk_size, doc_ids=None):
    return gated_delta_rule_chunked(q, k, v, g, beta, initial_state=initial_state, scale=scale,
                                    chunk_size=chunk_size, doc_ids=doc_ids)


def _fla_run_for(chunk_fn: Callable) -> Callable:
    # Never traced by Dynamo (train.compile compiles whole layers): fla's Triton autograd functions
    # run as fla ships them, at the cost of one graph break around the scan.
    @torch.compiler.disable
    def run(q, k, v, g, beta, initial_state, scale, chunk_size, doc_ids=None):
        # fla's chunk length is its own (64); the result is the same operator either way.
        if doc_ids is None:
            return chunk_fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True)
        return _fla_varlen(chunk_fn, q, k, v, g, beta, scale, doc_ids)
    return run


def _fla_varlen(chunk_fn, q, k, v, g, beta, scale, doc_ids):
    """Packed documents on fla: its variable-length mode, the (B, T) batch flattened to one row of B*T
    tokens cut at `cu_seqlens` (every row start and document start); each piece starts from a zero state.
    No final state (None): the mixer never carries one."""
    B, T = doc_ids.shape
    flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
    o, _ = chunk_fn(*flat, scale=scale, initial_state=None, output_final_state=False,
                    cu_seqlens=cu_seqlens_of(doc_ids))
    return o.reshape(B, T, *o.shape[2:]), None


_CU_SEQLENS: list = [None, -1, None]  # [weak reference to the last doc_ids tensor, its _version, cu_seqlens]


def cu_seqlens_of(doc_ids: torch.Tensor) -> torch.Tensor:
    """fla's cu_seqlens for the (B, T) document ids: offsets of every row start and document start in the
    flattened batch, then B*T. Its nonzero() is a host sync, so the result is kept for the doc_ids tensor
    it came from: the micro-batch's one doc_ids tensor reaches every GDN layer in every loop (and their
    recomputation), which makes it one sync per micro-batch instead of one per layer and loop."""
    ref, version, cached = _CU_SEQLENS
    if ref is not None and ref() is doc_ids and version == doc_ids._version:
        return cached
    B, T = doc_ids.shape
    starts = document_starts(doc_ids)
    starts[:, 0] = True
    cu = torch.cat([starts.reshape(-1).nonzero().reshape(-1), torch.tensor([B * T], device=doc_ids.device)])
    _CU_SEQLENS[:] = [weakref.ref(doc_ids), doc_ids._version, cu]
    return cu


@functools.lru_cache(maxsize=None)
def _compiled_chunked() -> Callable:
    # Static shapes: the probe and the training shape each get their own specialised graph (a dynamic
    # one would be built for the training shape, the second seen); evaluation runs eagerly anyway.
    return torch.compile(gated_delta_rule_chunked, backend=_COMPILE_BACKEND, dynamic=False)


def _compiled_run_for(compiled: Callable) -> Callable:
    def run(q, k, v, g, beta, initial_state, scale, chunk_size, doc_ids=None):
        if not torch.is_grad_enabled():
            return _torch_run(q, k, v, g, beta, initial_state, scale, chunk_size, doc_ids)
        return compiled(q, k, v, g, beta, initial_state=initial_state, scale=scale, chunk_size=chunk_size,
                        doc_ids=doc_ids)
    return run


def _probe(run: Callable, device: torch.device, dtype: torch.dtype, head_k_dim: int, head_v_dim: int) -> None:
    """A tiny forward+backward of `run` on device/dtype, checked against the eager torch form in
    float32. Raises on any failure. Uses its own generator: the global RNG stream is untouched."""
    gen = torch.Generator().manual_seed(0)
    B, T, H = 1, _PROBE_T, _PROBE_H
    q = F.normalize(torch.randn(B, T, H, head_k_dim, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, head_k_dim, generator=gen), dim=-1)
    v = torch.randn(B, T, H, head_v_dim, generator=gen)
    g = -F.softplus(torch.randn(B, T, H, generator=gen)) * 0.3
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    inputs = [x.to(device=device, dtype=dtype) for x in (q, k, v, g, beta)]
    w_o = torch.randn(B, T, H, head_v_dim, generator=gen).to(device)
    w_s = torch.randn(B, H, head_k_dim, head_v_dim, generator=gen).to(device)
    scale = 1.0 / math.sqrt(head_k_dim)

    def forward_backward(fn, xs):
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        o, s = fn(*leaves, None, scale, 64)
        ((o.float() * w_o).sum() + (s.float() * w_s).sum()).backward()
        return [o.detach().float(), s.detach().float()] + [x.grad.float() for x in leaves[:3]]

    with torch.enable_grad():
        got = forward_backward(run, inputs)
        want = forward_backward(_torch_run, [x.float() for x in inputs])
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 0.1
    for name, a, b in zip(("output", "final state", "dq", "dk", "dv"), got, want):
        if a.shape != b.shape:
            raise RuntimeError(f"{name} has shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        err = ((a - b).norm() / b.norm().clamp_min(1e-6)).item()
        if not err <= tol:  # also catches NaN
            raise RuntimeError(f"{name} disagrees with the torch reference (relative error {err:.3g} > {tol})")


def _fla_version() -> str:
    try:
        import fla

        return f"fla {getattr(fla, '__version__', '?')}"
    except Exception:  # noqa: BLE001
        return "fla"


def _want_compile(device: torch.device, compile: Optional[bool]) -> bool:
    if compile is not None:
        return compile
    env = os.environ.get("MEGALOOP_GDN_COMPILE", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return device.type != "cpu"


@torch.compiler.disable  # the probe runs eagerly, also when first reached inside a compiled layer
def _select(kernel: str, device: torch.device, dtype: torch.dtype, head_k_dim: int, head_v_dim: int,
            compile: Optional[bool]) -> GDNKernelChoice:
    if kernel not in GDN_KERNELS:
        raise ValueError(f"GDN kernel {kernel!r} is not one of {list(GDN_KERNELS)}")
    where = f"{device}/{str(dtype).replace('torch.', '')}"
    why_not_fla = "model.gdn_kernel=torch"
    if kernel in ("auto", "fla"):
        why_not_fla = fla_device_supported(device, dtype)
        if why_not_fla is None:
            try:
                from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            except Exception as exc:  # noqa: BLE001 -- not installed, or its Triton import fails
                why_not_fla = f"flash-linear-attention does not import: {_one_line(exc)}"
            else:
                try:
                    run = _fla_run_for(chunk_gated_delta_rule)
                    _probe(run, device, dtype, head_k_dim, head_v_dim)
                    return GDNKernelChoice("fla", run, f"{_fla_version()} chunk_gated_delta_rule")
                except Exception as exc:  # noqa: BLE001 -- Triton RuntimeErrors, wrong numbers
                    why_not_fla = f"{_fla_version()} failed its forward+backward probe on {where}: {_one_line(exc)}"
            if kernel == "auto":
                _warn_once(f"GDN kernel: falling back to the torch chunked form ({why_not_fla})")
        if kernel == "fla":
            raise GDNKernelUnavailable(
                f"model.gdn_kernel=fla, but flash-linear-attention cannot run on {where}: {why_not_fla}"
                f" (use model.gdn_kernel=auto or torch)")
    if _want_compile(device, compile):
        try:
            run = _compiled_run_for(_compiled_chunked())
            _probe(run, device, dtype, head_k_dim, head_v_dim)
            return GDNKernelChoice("torch+compile", run, f"fla not used: {why_not_fla}")
        except Exception as exc:  # noqa: BLE001
            _warn_once(f"GDN kernel: torch.compile of the torch chunked form failed on {where} "
                       f"({_one_line(exc)}); running it eagerly")
    return GDNKernelChoice("torch", _torch_run, f"fla not used: {why_not_fla}")


def select_gdn_kernel(kernel: str, device, dtype: torch.dtype, head_k_dim: int, head_v_dim: int,
                      compile: Optional[bool] = None) -> GDNKernelChoice:
    """The kernel `gated_delta_rule(..., kernel=kernel)` uses for this device/dtype/head dims; the
    first call for a combination probes (and may warn, or raise for kernel="fla"), later ones are a
    dict lookup. compile: None = on non-CPU devices (MEGALOOP_GDN_COMPILE overrides), True/False."""
    device = torch.device(device)
    key = (kernel, device.type, device.index, dtype, head_k_dim, head_v_dim, compile)
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _select(kernel, device, dtype, head_k_dim, head_v_dim, compile)
        _CHOICES[key] = choice
    return choice


def _eager_torch_path(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    """gated_delta_rule's shortcut: the torch chunked form, eagerly, without a lookup or probe (CPU by default)."""
    return (kernel == "torch" or (kernel == "auto" and fla_device_supported(device, dtype) is not None)) \
        and not _want_compile(device, None)


def kernel_in_use(kernel: str, device, dtype: torch.dtype, head_k_dim: int, head_v_dim: int) -> str:
    """The name of what `gated_delta_rule(..., kernel=kernel)` runs for tensors of this device / dtype / head
    dims: "torch", "torch+compile" or "fla" (its first call for a combination probes, as the dispatcher's)."""
    device = torch.device(device)
    if _eager_torch_path(kernel, device, dtype):
        return "torch"
    return select_gdn_kernel(kernel, device, dtype, head_k_dim, head_v_dim).name


_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
                "float32": torch.float32, "float": torch.float32, "fp64": torch.float64, "float64": torch.float64}


def _as_dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else _DTYPE_NAMES[str(dtype).lower()]


def describe_kernel_choice(cfg, device, dtype) -> str:
    """One line naming the GDN kernel this run uses, for the trainer to log once at startup.

    cfg: a megaloop Config or ModelConfig; device: the training device; dtype: the compute dtype
    (torch.dtype or "bf16" / "fp16" / "fp32"). Runs the selection (and its probe) now, so a
    fallback warning appears at startup and model.gdn_kernel=fla fails here, before training."""
    mc = getattr(cfg, "model", cfg)
    from megaloop.config import mixer_pattern

    if "gdn" not in mixer_pattern(mc.mixer, mc.n_loop, getattr(mc, "linear_mixer", "gdn")):
        return "GDN kernel: unused (no gdn layer in model.mixer)"
    device, dtype = torch.device(device), _as_dtype(dtype)
    kernel = getattr(mc, "gdn_kernel", "auto")
    head_v_dim = int(mc.attn_head_dim * mc.gdn_expand_v)
    choice = select_gdn_kernel(kernel, device, dtype, mc.attn_head_dim, head_v_dim)
    where = f"{device}/{str(dtype).replace('torch.', '')}"
    if choice.name == "fla":
        return f"GDN kernel: {choice.detail} on {where} (model.gdn_kernel={kernel})"
    form = "torch chunked form, torch.compile'd in training" if choice.name == "torch+compile" else "torch chunked form"
    return f"GDN kernel: {form} on {where} (model.gdn_kernel={kernel}; {choice.detail})"


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     chunk_size: int = 64, kernel: str = "auto", doc_ids: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher over the kernels above (see `select_gdn_kernel`); same conventions whichever runs.

    fla is imported lazily and only when `fla_device_supported` accepts the tensors (CUDA,
    half/bfloat16) and kernel is not "torch", so CPU runs never import Triton. On CPU the default
    is exactly `gated_delta_rule_chunked`. doc_ids (B, T): packed documents, each starting from a zero
    state (fla: its cu_seqlens mode, and no final state is returned).
    """
    if _eager_torch_path(kernel, q.device, q.dtype):
        return _torch_run(q, k, v, g, beta, initial_state, scale, chunk_size, doc_ids)  # CPU: no lookup, no probe
    choice = select_gdn_kernel(kernel, q.device, q.dtype, q.shape[-1], v.shape[-1])
    if doc_ids is None:
        return choice.fn(q, k, v, g, beta, initial_state, scale, chunk_size)
    return choice.fn(q, k, v, g, beta, initial_state, scale, chunk_size, doc_ids=doc_ids)
