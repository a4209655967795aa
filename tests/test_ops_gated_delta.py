"""The chunkwise gated delta rule must equal the per-token recurrence (values, state, gradients)."""
import pytest
import torch
import torch.nn.functional as F

from megaloop.ops.gated_delta import gated_delta_rule, gated_delta_rule_chunked, gated_delta_rule_recurrent


def make_inputs(B, T, H, Dk, Dv, dtype, seed=0, with_state=False):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=dtype)
    # Realistic GDN gates: g = -exp(A_log) * softplus(.), beta = sigmoid(.)
    g = -0.5 * F.softplus(torch.randn(B, T, H, generator=gen, dtype=dtype))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype))
    state = torch.randn(B, H, Dk, Dv, generator=gen, dtype=dtype) if with_state else None
    return q, k, v, g, beta, state


def run_with_grads(fn, inputs, **kwargs):
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in inputs]
    o, state = fn(*leaves, **kwargs)
    # A loss touching both outputs so gradients flow through the output and the final state.
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (state * torch.randn(state.shape, generator=gen, dtype=state.dtype)).sum()
    loss.backward()
    return o.detach(), state.detach(), [x.grad for x in leaves if x is not None]


@pytest.mark.parametrize("T", [1, 7, 16, 37, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent_float64(T, with_state):
    inputs = make_inputs(2, T, 3, 8, 6, torch.float64, seed=T, with_state=with_state)
    o_ref, s_ref, grads_ref = run_with_grads(gated_delta_rule_recurrent, inputs)
    o, s, grads = run_with_grads(gated_delta_rule_chunked, inputs, chunk_size=16)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)
    assert len(grads) == len(grads_ref) == (6 if with_state else 5)
    for name, grad, grad_ref in zip("q k v g beta state".split(), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10, msg=f"grad of {name}")


@pytest.mark.parametrize("chunk_size", [1, 5, 32, 64])
def test_chunked_matches_recurrent_float32(chunk_size):
    inputs = make_inputs(1, 50, 2, 16, 16, torch.float32, seed=1, with_state=True)
    o_ref, s_ref, grads_ref = run_with_grads(gated_delta_rule_recurrent, inputs)
    o, s, grads = run_with_grads(gated_delta_rule_chunked, inputs, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    for name, grad, grad_ref in zip("q k v g beta state".split(), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


def test_strong_decay_is_finite():
    # Very negative g: within a 64-token chunk e^{G_i - G_j} above the diagonal would overflow
    # (e^{+1000}) if it were exponentiated before masking.
    q, k, v, g, beta, _ = make_inputs(1, 64, 1, 4, 4, torch.float32, seed=2)
    g = torch.full_like(g, -20.0)
    o, s, grads = run_with_grads(gated_delta_rule_chunked, (q, k, v, g, beta), chunk_size=64)
    o_ref, s_ref, _ = run_with_grads(gated_delta_rule_recurrent, (q, k, v, g, beta))
    assert all(torch.isfinite(x).all() for x in [o, s, *grads])
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)


def test_splitting_the_sequence_carries_the_state():
    # Running [0, T1) then [T1, T) with the carried state equals one pass: what decode and
    # a state carried across loops rely on.
    q, k, v, g, beta, _ = make_inputs(2, 40, 2, 8, 8, torch.float64, seed=3)
    o_full, s_full = gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=16)
    T1 = 23
    o_a, s_a = gated_delta_rule_chunked(q[:, :T1], k[:, :T1], v[:, :T1], g[:, :T1], beta[:, :T1], chunk_size=16)
    o_b, s_b = gated_delta_rule_chunked(q[:, T1:], k[:, T1:], v[:, T1:], g[:, T1:], beta[:, T1:], initial_state=s_a, chunk_size=16)
    torch.testing.assert_close(torch.cat([o_a, o_b], dim=1), o_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(s_b, s_full, rtol=0, atol=1e-12)


def test_delta_rule_erases_the_written_subspace():
    # beta = 1, alpha = 1, orthonormal keys k_1..k_T and zero values: each step applies the
    # projector (I - k_t k_t^T), so the state loses exactly span(k_1..k_T) and keeps the rest.
    Dk, Dv, T = 8, 5, 3
    gen = torch.Generator().manual_seed(4)
    basis, _ = torch.linalg.qr(torch.randn(Dk, Dk, generator=gen, dtype=torch.float64))
    keys = basis[:, :T].T                                   # (T, Dk), orthonormal rows
    complement = basis[:, T:]                               # (Dk, Dk - T)
    S0 = torch.randn(1, 1, Dk, Dv, generator=gen, dtype=torch.float64)

    k = keys.reshape(1, T, 1, Dk)
    q = torch.randn(1, T, 1, Dk, generator=gen, dtype=torch.float64)
    v = torch.zeros(1, T, 1, Dv, dtype=torch.float64)
    g = torch.zeros(1, T, 1, dtype=torch.float64)
    beta = torch.ones(1, T, 1, dtype=torch.float64)

    for fn in (gated_delta_rule_recurrent, gated_delta_rule_chunked):
        _, S_T = fn(q, k, v, g, beta, initial_state=S0)
        S_T = S_T[0, 0]
        # Rows of S are indexed by key directions: reading the state at a written key gives zero...
        torch.testing.assert_close(keys @ S_T, torch.zeros(T, Dv, dtype=torch.float64), rtol=0, atol=1e-12)
        # ...and the orthogonal complement is untouched.
        torch.testing.assert_close(complement.T @ S_T, complement.T @ S0[0, 0], rtol=0, atol=1e-12)
        assert (complement.T @ S0[0, 0]).abs().max() > 0.1  # the kept part is not trivially zero


def test_dispatcher_on_cpu_uses_torch_path():
    inputs = make_inputs(1, 20, 2, 8, 8, torch.float32, seed=5)
    o, s = gated_delta_rule(*inputs[:5], chunk_size=8)
    o_ref, s_ref = gated_delta_rule_chunked(*inputs[:5], chunk_size=8)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


def test_bfloat16_inputs_compute_in_float32():
    q, k, v, g, beta, _ = make_inputs(1, 30, 2, 8, 8, torch.float32, seed=6)
    bf = [x.bfloat16() for x in (q, k, v, g, beta)]
    o, s = gated_delta_rule_chunked(*bf, chunk_size=16)
    o_ref, _ = gated_delta_rule_recurrent(*[x.float() for x in bf])
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(o.float(), o_ref, rtol=2e-2, atol=2e-2)


def test_recurrent_reference_is_the_documented_matrix_recurrence():
    # S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale * S_t^T q_t
    q, k, v, g, beta, S0 = make_inputs(1, 6, 1, 4, 3, torch.float64, seed=7, with_state=True)
    o, S_T = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=S0, scale=0.7)
    S = S0[0, 0]
    for t in range(6):
        k_t, v_t, q_t = k[0, t, 0], v[0, t, 0], q[0, t, 0]
        alpha_t, beta_t = g[0, t, 0].exp(), beta[0, t, 0]
        S = alpha_t * (torch.eye(4, dtype=torch.float64) - beta_t * torch.outer(k_t, k_t)) @ S + beta_t * torch.outer(k_t, v_t)
        torch.testing.assert_close(o[0, t, 0], 0.7 * S.T @ q_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(S_T[0, 0], S, rtol=0, atol=1e-12)
