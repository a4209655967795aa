"""Sliding-window and DeepSeek-style top-k sparse attention against masked dense references."""
import pytest
import torch
import torch.nn.functional as F

from megaloop.ops.dense_attention import causal_attention_dense, masked_attention_dense
from megaloop.ops.indexer_loss import indexer_kl_loss
from megaloop.ops.lightning_indexer import lightning_indexer_scores, lightning_indexer_topk, select_topk_keys
from megaloop.ops.sliding_window import sliding_window_attention, sliding_window_attention_dense
from megaloop.ops.sparse_attention import topk_sparse_attention

F64 = torch.float64


def make_qkv(B=2, H=4, Hkv=2, T=19, D=8, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen, dtype=dtype)
    return q, k, v


def make_indexer_inputs(B=2, T=19, Hi=3, Di=4, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q_idx = torch.randn(B, T, Hi, Di, generator=gen, dtype=dtype)
    k_idx = torch.randn(B, T, Di, generator=gen, dtype=dtype)
    w = torch.randn(B, T, Hi, generator=gen, dtype=dtype)
    return q_idx, k_idx, w


def value_and_grads(fn, q, k, v):
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    gen = torch.Generator().manual_seed(7)
    (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def assert_all_close(actual, expected, atol=1e-12):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=atol)


def test_dense_references_agree_with_sdpa():
    q, k, v = make_qkv()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(causal_attention_dense(q, k, v), expected, rtol=0, atol=1e-12)
    # A band that covers everything is causal attention.
    torch.testing.assert_close(sliding_window_attention_dense(q, k, v, window=19), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [1, 2, 4, 5, 18, 19, 40])
def test_sliding_window_matches_masked_dense(window):
    q, k, v = make_qkv(T=19, seed=window)
    actual = value_and_grads(lambda q, k, v: sliding_window_attention(q, k, v, window), q, k, v)
    expected = value_and_grads(lambda q, k, v: sliding_window_attention_dense(q, k, v, window), q, k, v)
    assert_all_close(actual, expected)


def test_sliding_window_sees_exactly_the_window():
    q, k, v = make_qkv(B=1, H=1, Hkv=1, T=12)
    v = v.clone().requires_grad_(True)
    out = sliding_window_attention(q, k, v, window=4)
    (grad,) = torch.autograd.grad(out[0, 0, 9].sum(), v)
    assert (grad[0, 0].abs().sum(-1) > 0).nonzero().flatten().tolist() == [6, 7, 8, 9]


@pytest.mark.parametrize("layers,window", [(3, 3), (2, 5), (4, 2)])
def test_stacked_sliding_window_receptive_field(layers, window):
    # x -> x + swa(x, x, x) applied `layers` times: each layer reaches window - 1 further back,
    # so output t depends on inputs t - layers (window - 1) .. t and on nothing else.
    T, D = 24, 6
    gen = torch.Generator().manual_seed(layers * 10 + window)
    x = torch.randn(1, 1, T, D, generator=gen, dtype=F64, requires_grad=True)
    h = x
    for _ in range(layers):
        h = h + sliding_window_attention(h, h, h, window)
    reach = layers * (window - 1)
    for t in (T - 1, reach + 2, 3):
        (grad,) = torch.autograd.grad(h[0, 0, t].sum(), x, retain_graph=True)
        depends_on = (grad[0, 0].abs().sum(-1) > 0).nonzero().flatten().tolist()
        assert depends_on == list(range(max(0, t - reach), t + 1)), (t, depends_on)


def test_indexer_scores_match_formula():
    q_idx, k_idx, w = make_indexer_inputs(B=1, T=7)
    scores = lightning_indexer_scores(q_idx, k_idx, w, query_block_size=3)
    for t in range(7):
        for s in range(7):
            if s > t:
                assert scores[0, t, s] == float("-inf")
            else:
                expected = (w[0, t] * (q_idx[0, t] @ k_idx[0, s]).relu()).sum()
                torch.testing.assert_close(scores[0, t, s], expected, rtol=0, atol=1e-12)


def test_blocked_topk_equals_full_topk():
    q_idx, k_idx, w = make_indexer_inputs(T=23)
    indices, valid = select_topk_keys(lightning_indexer_scores(q_idx, k_idx, w), topk=6)
    blocked_indices, blocked_valid = lightning_indexer_topk(q_idx, k_idx, w, topk=6, query_block_size=5)
    assert torch.equal(valid, blocked_valid)
    # Compare the selected sets (topk order among ties of -inf slots is unspecified).
    selected = torch.where(valid, indices, -1).sort(-1).values
    blocked_selected = torch.where(blocked_valid, blocked_indices, -1).sort(-1).values
    assert torch.equal(selected, blocked_selected)
    # Early queries have fewer than 6 causal keys: all of them are selected.
    assert valid[:, :5].sum(-1).tolist() == [[1, 2, 3, 4, 5]] * 2
    assert valid[:, 5:].all()


@pytest.mark.parametrize("topk", [19, 100])
def test_dsa_with_topk_at_least_T_is_dense_causal(topk):
    q, k, v = make_qkv(T=19)
    index_scores = lightning_indexer_scores(*make_indexer_inputs(T=19))
    actual = value_and_grads(lambda q, k, v: topk_sparse_attention(q, k, v, index_scores, topk, query_block_size=8), q, k, v)
    expected = value_and_grads(causal_attention_dense, q, k, v)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("query_block_size,recompute", [(64, True), (4, True), (5, False)])
def test_dsa_attends_to_exactly_the_selected_keys(query_block_size, recompute):
    q, k, v = make_qkv(T=19)
    index_scores = lightning_indexer_scores(*make_indexer_inputs(T=19))
    indices, valid = select_topk_keys(index_scores, topk=5)
    # Invalid slots are routed to a spare column 19 that is dropped afterwards.
    selected = torch.zeros(2, 19, 20, dtype=torch.bool)
    selected.scatter_(-1, torch.where(valid, indices, 19), True)
    selected = selected[..., :19]
    assert selected.sum(-1).max() == 5 and not selected.triu(1).any()
    actual = value_and_grads(
        lambda q, k, v: topk_sparse_attention(q, k, v, index_scores, 5, query_block_size=query_block_size, recompute=recompute),
        q, k, v,
    )
    expected = value_and_grads(lambda q, k, v: masked_attention_dense(q, k, v, selected), q, k, v)
    assert_all_close(actual, expected)


def test_dsa_is_causal():
    T, t_changed = 16, 11
    q, k, v = make_qkv(T=T)
    q_idx, k_idx, w = make_indexer_inputs(T=T)

    def run(q, k, v, q_idx, k_idx, w):
        return topk_sparse_attention(q, k, v, lightning_indexer_scores(q_idx, k_idx, w), topk=4)

    before = run(q, k, v, q_idx, k_idx, w)
    perturbed = [x.clone() for x in (q, k, v)] + [x.clone() for x in (q_idx, k_idx, w)]
    for x in perturbed[:3]:
        x[:, :, t_changed] += 10.0          # (B, H, T, D) layout
    for x in perturbed[3:]:
        x[:, t_changed] += 10.0             # (B, T, ...) layout
    after = run(*perturbed)
    assert torch.equal(before[:, :, :t_changed], after[:, :, :t_changed])
    assert not torch.allclose(before[:, :, t_changed:], after[:, :, t_changed:])


def test_indexer_kl_loss():
    q, k, _ = make_qkv(T=10)
    q_idx, k_idx, w = make_indexer_inputs(T=10)
    q_idx.requires_grad_(True)
    q.requires_grad_(True)
    loss = indexer_kl_loss(lightning_indexer_scores(q_idx, k_idx, w), q, k)
    assert loss > 0
    loss.backward()
    assert q_idx.grad.abs().sum() > 0   # trains the indexer...
    assert q.grad is None               # ...and never the main attention

    # The loss vanishes when the indexer reproduces the head-averaged attention distribution.
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    logits = torch.einsum("bhgtd,bhsd->bhgts", q.detach().view(2, 2, 2, 10, 8), k).reshape(2, 4, 10, 10) / 8 ** 0.5
    target = logits.masked_fill(~causal, float("-inf")).softmax(-1).mean(1)
    perfect = target.log().masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(indexer_kl_loss(perfect, q, k), torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-12)

    # Sparse stage: both distributions live on the selected set; the target is the head-average
    # of each head's softmax over that set (what the sparse main attention computes).
    index_scores = lightning_indexer_scores(q_idx.detach(), k_idx, w)
    indices, valid = select_topk_keys(index_scores, topk=3)
    sparse_loss = indexer_kl_loss(index_scores, q, k, indices=indices, valid=valid)
    expected = 0.0
    for b in range(2):
        for t in range(10):
            keys = indices[b, t][valid[b, t]]
            p = logits[b, :, t, keys].softmax(-1).mean(0)
            log_r = index_scores[b, t, keys].log_softmax(-1)
            expected += (p * (p.log() - log_r)).sum()
    torch.testing.assert_close(sparse_loss, expected / 20, rtol=0, atol=1e-12)
    assert sparse_loss > 0


# --------------------------------------------------------------------------------------------
# Blockwise DSA path (blockwise indexer + staged top-k, gathered attention with its own backward)
# --------------------------------------------------------------------------------------------

from megaloop.ops.indexer_loss import indexer_kl_loss_from_probs  # noqa: E402
from megaloop.ops.lightning_indexer import _topk_earliest, _topk_rows  # noqa: E402
from megaloop.ops.sparse_attention import sparse_attention_from_indices  # noqa: E402


def _selected_sets(indices, valid):
    return torch.where(valid, indices, -1).sort(-1).values


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("S,k", [(10, 3), (97, 5), (500, 7), (4096, 16)])
def test_staged_topk_equals_stable_sort(S, k, quantised):
    gen = torch.Generator().manual_seed(S + k)
    x = torch.randn(6, S, generator=gen, dtype=torch.float32)
    if quantised:  # heavy exact ties (and -0.0 vs 0.0), including at the k-th value
        x = (x * 2).round() * 0.5 - 0.0 * x
        x[0] = 0.0
        x[1, : S // 2] = float("-inf")
    expected = x.sort(dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
    assert torch.equal(_topk_earliest(x, k), expected)
    assert torch.equal(_topk_rows(x, k), expected)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("T,topk,block", [(23, 6, 5), (64, 8, 64), (200, 7, 64), (331, 9, 32), (300, 400, 64)])
def test_blockwise_indexer_selects_the_reference_keys(T, topk, block, dtype):
    q_idx, k_idx, w = make_indexer_inputs(T=T, seed=T, dtype=dtype)
    if T == 200:  # coarse inputs: many exact ties, broken towards the earlier key in both paths
        q_idx, k_idx, w = q_idx.round(), k_idx.round(), w.round()
    indices, valid = select_topk_keys(lightning_indexer_scores(q_idx, k_idx, w), topk)
    blocked_indices, blocked_valid = lightning_indexer_topk(q_idx, k_idx, w, topk, query_block_size=block)
    assert torch.equal(valid, blocked_valid)
    assert torch.equal(_selected_sets(indices, valid), _selected_sets(blocked_indices, blocked_valid))
    assert (blocked_indices >= 0).all() and (blocked_indices < T).all()
    assert not (blocked_valid & (blocked_indices > torch.arange(T)[None, :, None])).any()


@pytest.mark.parametrize("H,Hkv,T,topk,block", [(4, 2, 19, 5, 4), (4, 4, 70, 9, 16), (2, 1, 37, 40, 8), (4, 2, 65, 12, 64)])
def test_gathered_attention_matches_reference_path(H, Hkv, T, topk, block):
    q, k, v = make_qkv(H=H, Hkv=Hkv, T=T, seed=T)
    q_idx, k_idx, w = make_indexer_inputs(T=T, seed=T + 1)
    indices, valid = lightning_indexer_topk(q_idx, k_idx, w, topk, query_block_size=block)

    def fast(q, k, v):
        return sparse_attention_from_indices(q, k, v, indices, valid, query_block_size=block)

    def reference(q, k, v):
        return sparse_attention_from_indices(q, k, v, indices, valid, query_block_size=7, recompute=False)

    assert_all_close(value_and_grads(fast, q, k, v), value_and_grads(reference, q, k, v))
    # The head-summed probabilities it can return are the dense masked attention's, on the selection.
    out, probs = sparse_attention_from_indices(q, k, v, indices, valid, query_block_size=block, return_probs=True)
    logits = torch.einsum("bhgtd,bhsd->bhgts", q.view(2, Hkv, H // Hkv, T, 8), k).reshape(2, H, T, T) / 8 ** 0.5
    logits = logits.gather(-1, indices[:, None].expand(2, H, T, indices.shape[-1]))
    expected = logits.masked_fill(~valid[:, None], float("-inf")).softmax(-1).sum(1)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-12)


def test_blockwise_dsa_is_causal():
    T, t_changed = 150, 97
    q, k, v = make_qkv(T=T)
    q_idx, k_idx, w = make_indexer_inputs(T=T)

    def run(q, k, v, q_idx, k_idx, w):
        indices, valid = lightning_indexer_topk(q_idx, k_idx, w, topk=6, query_block_size=32)
        return sparse_attention_from_indices(q, k, v, indices, valid, query_block_size=16)

    before = run(q, k, v, q_idx, k_idx, w)
    perturbed = [x.clone() for x in (q, k, v, q_idx, k_idx, w)]
    for x in perturbed[:3]:
        x[:, :, t_changed:] += 10.0
    for x in perturbed[3:]:
        x[:, t_changed:] += 10.0
    after = run(*perturbed)
    assert torch.equal(before[:, :, :t_changed], after[:, :, :t_changed])
    assert not torch.allclose(before[:, :, t_changed:], after[:, :, t_changed:])


def test_blockwise_dsa_never_forms_a_T_by_T_tensor():
    """Every tensor created by the selection, the attention and its backward is far below T^2."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    # A sparse (T, T) selection pattern stores only its entries.
                    stored = t.numel() if t.layout == torch.strided else t.values().numel()
                    LargestTensor.largest = max(LargestTensor.largest, stored)
            return out

    T = 2048
    q, k, v = (x.float().requires_grad_(True) for x in make_qkv(B=1, H=2, Hkv=1, T=T))
    q_idx, k_idx, w = (x.float() for x in make_indexer_inputs(B=1, T=T))
    with LargestTensor():
        indices, valid = lightning_indexer_topk(q_idx, k_idx, w, topk=16, query_block_size=32)
        out = sparse_attention_from_indices(q, k, v, indices, valid)
        out.sum().backward()
    assert LargestTensor.largest <= T * T // 8, LargestTensor.largest


def test_indexer_kl_loss_from_probs_matches_the_dense_sparse_stage():
    T = 40
    q, k, _ = make_qkv(T=T)
    q_idx, k_idx, w = (x.requires_grad_(True) for x in make_indexer_inputs(T=T))
    indices, valid = lightning_indexer_topk(q_idx, k_idx, w, topk=6, query_block_size=16)
    expected = indexer_kl_loss(lightning_indexer_scores(q_idx, k_idx, w), q, k, indices=indices, valid=valid)
    expected_grads = torch.autograd.grad(expected, (q_idx, k_idx, w))
    _, probs = sparse_attention_from_indices(q, k, k, indices, valid, return_probs=True)
    loss = indexer_kl_loss_from_probs(q_idx, k_idx, w, indices, valid, probs / q.shape[1])
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for a, e in zip(torch.autograd.grad(loss, (q_idx, k_idx, w)), expected_grads):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("H,Hkv,T,topk,block", [(4, 2, 19, 5, 4), (2, 1, 37, 40, 8), (4, 2, 65, 12, 64)])
def test_gathered_kernel_matches_sampled_kernel(H, Hkv, T, topk, block):
    """The gathered-block kernel (non-CPU devices) and the sampled-product kernel (CPU) agree."""
    from megaloop.ops.sparse_attention import _GatheredSparseAttention, _SampledSparseAttention

    q, k, v = make_qkv(H=H, Hkv=Hkv, T=T, seed=T + 2)
    indices, valid = lightning_indexer_topk(*make_indexer_inputs(T=T, seed=T + 3), topk, query_block_size=block)
    scale = 8 ** -0.5

    def gathered(q, k, v):
        return _GatheredSparseAttention.apply(q, k, v, indices, valid, scale, block, False)[0]

    def sampled(q, k, v):
        return _SampledSparseAttention.apply(q, k, v, indices, valid, scale, False)[0]

    assert_all_close(value_and_grads(gathered, q, k, v), value_and_grads(sampled, q, k, v))
    probs_g = _GatheredSparseAttention.apply(q, k, v, indices, valid, scale, block, True)[1]
    probs_s = _SampledSparseAttention.apply(q, k, v, indices, valid, scale, True)[1]
    torch.testing.assert_close(probs_g, probs_s, rtol=0, atol=1e-12)
