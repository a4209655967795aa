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
"""
import math
from typing import Optional, Tuple

import torch

__all__ = ["gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_recurrent"]


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


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
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
    outputs = []
    for t in range(T):
        k_t, q_t = k[:, t], q[:, t]                                      # (B, H, Dk)
        state = state * g[:, t].exp()[..., None, None]                   # S' = alpha S
        stored = torch.einsum("bhkv,bhk->bhv", state, k_t)               # S'^T k
        correction = beta[:, t, :, None] * (v[:, t] - stored)            # u
        state = state + k_t[..., :, None] * correction[..., None, :]     # S' + k u^T
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q_t) * scale)
    o = torch.stack(outputs, dim=1) if T > 0 else v.new_zeros(B, 0, H, Dv)
    return o.to(out_dtype), state


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    chunk_size: int = 64,
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

    # --- everything below, up to the chunk loop, is parallel over (B, H, N) ---
    log_decay = g.cumsum(dim=-1)                                             # G_i   (B, H, N, C)
    # e^{G_i - G_j} for j <= i. Mask *before* exp: G_i - G_j > 0 above the diagonal could overflow.
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    pair_log_decay = log_decay[..., :, None] - log_decay[..., None, :]
    decay_mask = pair_log_decay.masked_fill(~causal, 0.0).exp() * causal    # (B, H, N, C, C)

    # UT transform: solve (I + A) X = [diag(beta) V | diag(beta e^G) K] with A strictly lower.
    k_beta = k * beta[..., None]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    A = (k_beta @ k.transpose(-1, -2)) * decay_mask * strictly_lower
    eye = torch.eye(C, dtype=dtype, device=q.device)
    rhs = torch.cat([v * beta[..., None], k_beta * log_decay.exp()[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    u_from_values, w = solved[..., :Dv], solved[..., Dv:]                   # U = U_v - W S_0

    # Intra-chunk attention (decayed, causal incl. the diagonal) and the inter-chunk read-out terms.
    intra_attention = (q @ k.transpose(-1, -2)) * decay_mask * scale        # (B, H, N, C, C)
    q_decayed = q * (log_decay.exp()[..., None] * scale)                    # e^{G_i} q_i
    chunk_log_decay = log_decay[..., -1:]                                   # G_C   (B, H, N, 1)
    k_to_chunk_end = k * (chunk_log_decay - log_decay).exp()[..., None]     # e^{G_C - G_j} k_j
    chunk_decay = chunk_log_decay.exp()[..., None]                          # (B, H, N, 1, 1)

    # --- sequential hand-off of the state between chunks ---
    outputs = []
    for n in range(N):
        u = u_from_values[:, :, n] - w[:, :, n] @ state                      # (B, H, C, Dv)
        outputs.append(q_decayed[:, :, n] @ state + intra_attention[:, :, n] @ u)
        state = chunk_decay[:, :, n] * state + k_to_chunk_end[:, :, n].transpose(-1, -2) @ u

    o = torch.stack(outputs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), state


def _fla_is_available() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401  (imports Triton: only ever reached on CUDA)
    except ImportError:
        return False
    return True


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: flash-linear-attention's Triton `chunk_gated_delta_rule` for half/bfloat16 CUDA
    tensors when `fla` is installed, else `gated_delta_rule_chunked`. Same conventions either way.

    fla is imported lazily, here and only for CUDA tensors, so CPU installs never import Triton.
    float32/float64 inputs stay on the torch path: some fla releases reject float32, and float64
    is the exactness-testing dtype.
    """
    use_fla = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _fla_is_available()
    if use_fla:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True
        )
    return gated_delta_rule_chunked(q, k, v, g, beta, initial_state=initial_state, scale=scale, chunk_size=chunk_size)
