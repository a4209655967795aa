"""The causal short convolution must equal a token-by-token decode and be resumable from its state."""
import pytest
import torch

from megaloop.ops.short_conv import causal_depthwise_conv1d, causal_depthwise_conv1d_step


def make_inputs(B=2, T=11, C=5, W=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, W, generator=gen, dtype=torch.float64)
    bias = torch.randn(C, generator=gen, dtype=torch.float64)
    state = torch.randn(B, C, W - 1, generator=gen, dtype=torch.float64)
    return x, weight, bias, state


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_step_by_step(W, with_state):
    x, weight, bias, state = make_inputs(W=W)
    initial_state = state if with_state else None
    y, final_state = causal_depthwise_conv1d(x, weight, bias, initial_state)

    step_state = initial_state
    for t in range(x.shape[1]):
        y_t, step_state = causal_depthwise_conv1d_step(x[:, t], weight, bias, step_state)
        torch.testing.assert_close(y[:, t], y_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(final_state, step_state, rtol=0, atol=0)


def test_matches_explicit_formula():
    # y[t, c] = bias[c] + sum_w weight[c, w] * x[t - (W-1) + w, c], with x[<0] = 0.
    x, weight, bias, _ = make_inputs(B=1, T=6, C=3, W=4)
    y, _ = causal_depthwise_conv1d(x, weight, bias)
    for t in range(6):
        expected = bias.clone()
        for w in range(4):
            s = t - 3 + w
            if s >= 0:
                expected = expected + weight[:, w] * x[0, s]
        torch.testing.assert_close(y[0, t], expected, rtol=0, atol=1e-12)


def test_split_sequence_resumes_exactly():
    x, weight, bias, _ = make_inputs(T=13)
    y_full, state_full = causal_depthwise_conv1d(x, weight, bias)
    y_a, state_a = causal_depthwise_conv1d(x[:, :2], weight, bias)   # shorter than W-1
    y_b, state_b = causal_depthwise_conv1d(x[:, 2:], weight, bias, state_a)
    torch.testing.assert_close(torch.cat([y_a, y_b], dim=1), y_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(state_b, state_full, rtol=0, atol=0)


def test_is_causal_and_differentiable():
    x, weight, bias, _ = make_inputs(B=1, T=10, C=2, W=4)
    x.requires_grad_(True)
    y, _ = causal_depthwise_conv1d(x, weight, bias)
    (grad,) = torch.autograd.grad(y[0, 6].sum(), x)
    touched = (grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == [3, 4, 5, 6]
