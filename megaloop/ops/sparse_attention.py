"""DeepSeek-style top-k sparse attention (DSA): each query attends to its selected keys only.

Layout and grouped-query heads as in dense_attention.py; the selection (indices, valid), shared by all
heads, comes from the lightning indexer (lightning_indexer.py). The attention is O(T * topk) and
flash-attention style (only a log-sum-exp per query is kept, backward recomputes): on CPU
`_SampledSparseAttention` gets the scores as sampled dense-dense products
(`torch.sparse.sampled_addmm` on the selection pattern) and every product with P or dS as fused
gather + weighted sums (`F.embedding_bag`), the key-side gradients over the selection sorted by
key, so nothing gathered is ever stored and nothing is scattered; elsewhere
`_GatheredSparseAttention` gathers each query block's keys/values into a buffer.
GPU: no third-party fused kernel is wired in. fla's `parallel_nsa` (the nearest, Triton) selects
*blocks* of keys per kv head with its own layout and gating, not DeepSeek's token-level top-k;
FlashMLA's sparse kernels are MLA/Hopper inference kernels. On CUDA the attention block runs
through torch.compile instead (lazily, eager fallback); selection is plain torch there too.
The top-k selection is not differentiable: no gradient reaches the indexer through the main
attention. DeepSeek trains the indexer with a separate loss (indexer_loss.py), whose target the
attention can return (`return_probs`).
"""
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megaloop.ops.dense_attention import _default_scale
from megaloop.ops.lightning_indexer import select_topk_keys

__all__ = ["sparse_attention_from_indices", "topk_sparse_attention"]


def _gather_keys(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x: (B, Hkv, T, D), indices: (B, Tq, K) -> x[b, h, indices[b, t, k]] as (B, Hkv, Tq, K, D).

    An index_select over flattened (batch, head, time) rows: its backward is an index_add into a
    (B Hkv T, D) buffer, so no (Tq, T)-sized gradient is ever formed. The result is contiguous
    with (B, Hkv, Tq) leading, ready for a batched matmul per query.
    """
    B, Hkv, T, D = x.shape
    Tq, K = indices.shape[1:]
    row_offsets = (torch.arange(B * Hkv, device=x.device) * T).view(B, Hkv, 1, 1)
    rows = (indices[:, None] + row_offsets).reshape(-1)
    return x.reshape(B * Hkv * T, D).index_select(0, rows).view(B, Hkv, Tq, K, D)


def _sparse_attention_block(q_block, k, v, indices, valid, scale: float) -> torch.Tensor:
    B, H, Tq, D = q_block.shape
    Hkv = k.shape[1]
    k_selected = _gather_keys(k, indices)                                    # (B, Hkv, Tq, K, D)
    v_selected = _gather_keys(v, indices)
    qg = q_block.reshape(B, Hkv, H // Hkv, Tq, D).transpose(2, 3)           # (B, Hkv, Tq, G, D)
    scores = (qg @ k_selected.transpose(-1, -2)) * scale                     # (B, Hkv, Tq, G, K)
    probs = scores.masked_fill(~valid[:, None, :, None, :], float("-inf")).softmax(dim=-1)
    out = probs @ v_selected                                                 # (B, Hkv, Tq, G, Dv)
    return out.transpose(2, 3).reshape(B, H, Tq, v.shape[-1])


def _finish_forward(ctx, saved, scale, out, probs_sum):
    """The sparse-attention Functions' common end of forward: keep what backward recomputes from, and
    return (out, head-summed probabilities or an empty placeholder)."""
    ctx.save_for_backward(*saved)
    ctx.scale = scale
    if probs_sum is None:
        return out, out.new_empty(0)
    ctx.mark_non_differentiable(probs_sum)
    return out, probs_sum


class _GatheredSparseAttention(torch.autograd.Function):
    """Top-k sparse attention with a hand-written, recomputing backward (flash-attention style).

    Keys and values live in one (B, Hkv, T, D + Dv) table, so each block of queries does a single
    gather of its selected rows per kv head, into a buffer reused across blocks (no allocation, no
    page faults in the loop); products use zero-padded queries so the gathered rows are read as
    they are. Forward keeps only the output and the per-(query, head) log-sum-exp;
    backward gathers again, rebuilds the probabilities from the log-sum-exp and scatters the key and
    value gradients with one index_add per block. Optionally returns the attention probabilities
    summed over heads (B, T, K), detached: the indexer's training target.
    """

    @staticmethod
    def forward(ctx, q, k, v, indices, valid, scale: float, block: int, want_probs: bool):
        B, H, T, D = q.shape
        Hkv, Dv, K = k.shape[1], v.shape[-1], indices.shape[-1]
        G, C = H // Hkv, D + Dv
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        table = torch.cat([k, v], dim=-1)                                        # (B, Hkv, T, C)
        # Queries zero-padded over the value columns, so that every product reads the gathered
        # (K, D + Dv) rows as they are (no strided k / v halves, no copies).
        qpad = q.new_zeros(B, Hkv, T, G, C)
        qpad[..., :D] = (q * scale).reshape(B, Hkv, G, T, D).transpose(2, 3)
        invalid = ~valid[:, :, None, :]                                          # (B, T, 1, K)
        out = q.new_empty(B, Hkv, T, G, Dv)
        lse = torch.empty(B, Hkv, T, G, 1, dtype=acc, device=q.device)
        probs_sum = torch.zeros(B, T, K, dtype=acc, device=q.device) if want_probs else None
        gathered = q.new_empty(block * K, C)
        # One (batch, kv head) at a time: its (T, D + Dv) table is all the gathers touch, which
        # keeps them in cache at long T.
        for b in range(B):
            for h in range(Hkv):
                tab = table[b, h]
                for t0 in range(0, T, block):
                    t1 = min(T, t0 + block)
                    rows = indices[b, t0:t1].reshape(-1)
                    g = torch.index_select(tab, 0, rows, out=gathered[:rows.numel()]).view(t1 - t0, K, C)
                    s = torch.matmul(qpad[b, h, t0:t1], g.transpose(-1, -2)).to(acc)   # (n, G, K)
                    s.masked_fill_(invalid[b, t0:t1], float("-inf"))
                    m = torch.logsumexp(s, dim=-1, keepdim=True)
                    lse[b, h, t0:t1] = m
                    p = s.sub_(m).exp_()
                    if want_probs:
                        probs_sum[b, t0:t1] += p.sum(dim=1)
                    out[b, h, t0:t1] = torch.matmul(p.to(q.dtype), g)[..., D:]
        out = out.transpose(2, 3).reshape(B, H, T, Dv)
        ctx.block = block
        return _finish_forward(ctx, (q, k, v, indices, valid, out, lse), scale, out, probs_sum if want_probs else None)

    @staticmethod
    def backward(ctx, dout, _dprobs):
        q, k, v, indices, valid, out, lse = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        B, H, T, D = q.shape
        Hkv, Dv, K = k.shape[1], v.shape[-1], indices.shape[-1]
        G, C = H // Hkv, D + Dv
        acc = lse.dtype
        table = torch.cat([k, v], dim=-1)
        # [[q, 0], [0, dout]] per (query, kv head): one product with the gathered [k | v] rows gives
        # the scores (first G rows) and dP (last G rows); its transpose against [dS; P] gives the
        # gathered [dk | dv] rows, contiguous, ready for a single index_add.
        qd = q.new_zeros(B, Hkv, T, 2 * G, C)
        qd[..., :G, :D] = (q * scale).reshape(B, Hkv, G, T, D).transpose(2, 3)
        qd[..., G:, D:] = dout.reshape(B, Hkv, G, T, Dv).transpose(2, 3)
        delta = (dout.to(acc) * out.to(acc)).sum(-1).reshape(B, Hkv, G, T).transpose(2, 3)[..., None]
        invalid = ~valid[:, :, None, :]
        dq = q.new_empty(B, Hkv, T, G, D)
        dtable = torch.zeros(B, Hkv, T, C, dtype=acc, device=q.device)
        gathered = q.new_empty(block * K, C)
        dgathered = q.new_empty(block * K, C)
        for b in range(B):
            for h in range(Hkv):
                tab, dtab = table[b, h], dtable[b, h]
                for t0 in range(0, T, block):
                    t1 = min(T, t0 + block)
                    n = t1 - t0
                    rows = indices[b, t0:t1].reshape(-1)
                    g = torch.index_select(tab, 0, rows, out=gathered[:rows.numel()]).view(n, K, C)
                    qdb = qd[b, h, t0:t1]
                    sdp = torch.matmul(qdb, g.transpose(-1, -2)).to(acc)                # (n, 2G, K)
                    s, dp = sdp[:, :G], sdp[:, G:]
                    s.masked_fill_(invalid[b, t0:t1], float("-inf"))
                    p = s.sub_(lse[b, h, t0:t1]).exp_()                                 # P, in place
                    dp.sub_(delta[b, h, t0:t1]).mul_(p)                                 # dS, in place
                    dsp = torch.cat([dp, p], dim=1).to(q.dtype)                         # [dS; P]
                    dq[b, h, t0:t1] = torch.matmul(dsp[:, :G], g)[..., :D]
                    dg = dgathered[:rows.numel()]
                    torch.matmul(dsp.transpose(-1, -2), qdb, out=dg.view(n, K, C))      # [dk | dv] rows
                    dtab.index_add_(0, rows, dg.to(acc))  # (fp32 accumulation of bf16/fp16 rows)
        dq = dq.transpose(2, 3).reshape(B, H, T, D) * scale
        return dq, dtable[..., :D].to(k.dtype), dtable[..., D:].to(v.dtype), None, None, None, None, None


def _selection_pattern(crow: torch.Tensor, cols: torch.Tensor, T: int, S: int, dtype: torch.dtype) -> torch.Tensor:
    """A (T, S) CSR matrix with the entries crow/cols (int32) and zero values: a sampling pattern
    for `_sampled_dots`, which writes its results into the pattern's own values."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), dtype=dtype, device=cols.device),
                                       size=(T, S), check_invariants=False)


def _sampled_dots(pattern: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[t, j] = a[t] . b[cols[t, j]] for the pattern's (T, K) columns, written in place into the
    pattern's values (no copy of the pattern); returns them as (T, K). The values must be finite
    on entry (the kernel computes 0 * old + dot)."""
    torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0, out=pattern)
    return pattern.values().view(a.shape[0], -1)


def _weighted_rows(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[i] = sum over bag i (rows[offsets[i]:offsets[i + 1]]) of weights * table[rows]: a gather
    and weighted sum in one pass (embedding_bag's fused kernel; nothing gathered is stored)."""
    return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights)


class _SampledSparseAttention(torch.autograd.Function):
    """Top-k sparse attention as sampled dense-dense products and weighted row sums (CPU).

    Per (batch, query head): scores = `torch.sparse.sampled_addmm` of q k^T on the selection
    pattern (a dot product per selected (query, key), gathered rows never stored), the masked
    softmax on the (T, K) scores, and out = P V through `F.embedding_bag` with per-sample weights
    P (a fused gather + weighted sum). Forward keeps only the output and a log-sum-exp per
    (query, head). Backward recomputes P, gets dP = dout v^T the same way, and
    dq = dS k, dk = dS^T q, dv = P^T dout as weighted row sums; the transposed ones run over the
    selection sorted by key (one integer sort per batch row, shared by all heads), so no scatter
    (index_add) is needed. Everything is computed in fp32 at least (bf16/fp16 inputs are upcast
    one (T, D) slice at a time). Same results as `_GatheredSparseAttention` up to rounding.
    """

    @staticmethod
    def forward(ctx, q, k, v, indices, valid, scale: float, want_probs: bool):
        B, H, T, D = q.shape
        Hkv, S, Dv, K = k.shape[1], k.shape[2], v.shape[-1], indices.shape[-1]
        G = H // Hkv
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        out = q.new_empty(B, H, T, Dv)
        lse = torch.empty(B, H, T, dtype=acc, device=q.device)
        probs_sum = torch.zeros(B, T, K, dtype=acc, device=q.device) if want_probs else None
        crow = torch.arange(0, T * K + 1, K, dtype=torch.int32, device=q.device)
        offsets = crow[:-1]
        for b in range(B):
            cols = indices[b].reshape(-1).to(torch.int32)
            pattern = _selection_pattern(crow, cols, T, S, acc)
            invalid = ~valid[b]
            for kv in range(Hkv):
                k_bh, v_bh = k[b, kv].to(acc).contiguous(), v[b, kv].to(acc).contiguous()
                for h in range(kv * G, (kv + 1) * G):
                    s = _sampled_dots(pattern, q[b, h].to(acc) * scale, k_bh)         # (T, K)
                    s.masked_fill_(invalid, float("-inf"))
                    m = torch.logsumexp(s, dim=-1, keepdim=True)
                    lse[b, h] = m[:, 0]
                    p = s.sub_(m).exp_()
                    if want_probs:
                        probs_sum[b] += p
                    out[b, h] = _weighted_rows(v_bh, cols, offsets, p.view(-1))
        return _finish_forward(ctx, (q, k, v, indices, valid, out, lse), scale, out, probs_sum if want_probs else None)

    @staticmethod
    def backward(ctx, dout, _dprobs):
        q, k, v, indices, valid, out, lse = ctx.saved_tensors
        scale = ctx.scale
        B, H, T, D = q.shape
        Hkv, S, Dv, K = k.shape[1], k.shape[2], v.shape[-1], indices.shape[-1]
        G = H // Hkv
        acc = lse.dtype
        delta = (dout.to(acc) * out.to(acc)).sum(-1)                                   # (B, H, T)
        dq = torch.empty(B, H, T, D, dtype=acc, device=q.device)
        dk = torch.zeros(B, Hkv, S, D, dtype=acc, device=q.device)
        dv = torch.zeros(B, Hkv, S, Dv, dtype=acc, device=q.device)
        crow = torch.arange(0, T * K + 1, K, dtype=torch.int32, device=q.device)
        offsets = crow[:-1]
        key_dtype = torch.int16 if S <= torch.iinfo(torch.int16).max else torch.int32
        for b in range(B):
            cols = indices[b].reshape(-1).to(torch.int32)
            # Two value buffers on one structure: P and dP/dS live side by side.
            pattern_p = _selection_pattern(crow, cols, T, S, acc)
            pattern_ds = _selection_pattern(crow, cols, T, S, acc)
            invalid = ~valid[b]
            # The selection by key: order lists the (query, slot) entries key by key (queries
            # ascending within a key); bag s of the transposed products holds key s's queries.
            order = cols.to(key_dtype).sort(stable=True).indices
            queries_by_key = order.to(torch.int32).div_(K, rounding_mode="floor")
            counts = torch.bincount(cols, minlength=S)
            key_offsets = (counts.cumsum(0) - counts).to(torch.int32)
            for kv in range(Hkv):
                k_bh, v_bh = k[b, kv].to(acc).contiguous(), v[b, kv].to(acc).contiguous()
                for h in range(kv * G, (kv + 1) * G):
                    qs = q[b, h].to(acc) * scale
                    do = dout[b, h].to(acc).contiguous()
                    s = _sampled_dots(pattern_p, qs, k_bh)
                    s.masked_fill_(invalid, float("-inf"))
                    p = s.sub_(lse[b, h, :, None]).exp_()                              # P
                    ds = _sampled_dots(pattern_ds, do, v_bh).sub_(delta[b, h, :, None]).mul_(p)  # dS
                    dq[b, h] = _weighted_rows(k_bh, cols, offsets, ds.view(-1))
                    dk[b, kv] += _weighted_rows(qs, queries_by_key, key_offsets, ds.view(-1).index_select(0, order))
                    dv[b, kv] += _weighted_rows(do, queries_by_key, key_offsets, p.view(-1).index_select(0, order))
        dq = dq.mul_(scale).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _use_fused_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda and os.environ.get("MEGALOOP_DSA_COMPILE", "1") != "0"


_compiled_block = None  # None: not built yet; False: torch.compile unavailable or failed


def _cuda_sparse_attention_block(*args) -> torch.Tensor:
    """`_sparse_attention_block` through torch.compile for CUDA tensors (fuses the gather, the
    masked softmax and the products), built lazily on first CUDA use; eager if compiling fails."""
    global _compiled_block
    if _compiled_block is None:
        try:
            _compiled_block = torch.compile(_sparse_attention_block, dynamic=True)
        except Exception:  # pragma: no cover - no compiler backend
            _compiled_block = False
    if _compiled_block is not False:
        try:
            return _compiled_block(*args)
        except Exception as err:  # pragma: no cover - GPU only
            import warnings
            warnings.warn(f"torch.compile of the DSA attention block failed, running eagerly: {err}")
            _compiled_block = False
    return _sparse_attention_block(*args)


def sparse_attention_from_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    scale: Optional[float] = None,
    query_block_size: Optional[int] = None,
    recompute: bool = True,
    return_probs: bool = False,
):
    """Each query t attends to the keys indices[b, t, :] where valid[b, t, :] (shared by all heads).

    recompute=True (default): a flash-attention style kernel, autograd keeping only the output and
    a log-sum-exp per (query, head). On CPU `_SampledSparseAttention` (sampled products and
    embedding_bag sums, see its docstring; query_block_size is unused). Elsewhere
    `_GatheredSparseAttention`: blocks of `query_block_size` queries (default 64) gather their
    keys and values together, one (batch, kv head) at a time; backward gathers again and
    scatters with index_add. On CUDA, unless MEGALOOP_DSA_COMPILE=0
    or return_probs, the blocks instead run a torch.compile'd `_sparse_attention_block` under
    activation checkpointing (the compiler fuses the gather into the products; lazily built, eager
    if compiling fails). No fused third-party kernel is used (see the module docstring).
    recompute=False: plain autograd through the per-block gathers (reference; keeps the gathered
    keys/values of every block until backward: O(T K D) per kv head).

    return_probs=True also returns the attention probabilities over the selected keys summed over
    heads, (B, T, K), detached (the target of `indexer_kl_loss_from_probs`; zero on invalid slots).
    """
    scale = _default_scale(q, scale)
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"number of query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    T = q.shape[2]
    needs_graph = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if recompute and q.device.type == "cpu":
        out, probs = _SampledSparseAttention.apply(q, k, v, indices, valid, scale, return_probs)
        return (out, probs) if return_probs else out
    if recompute and not (_use_fused_cuda(q) and not return_probs):
        block = query_block_size or 64
        out, probs = _GatheredSparseAttention.apply(q, k, v, indices, valid, scale, block, return_probs)
        return (out, probs) if return_probs else out
    block_fn = _cuda_sparse_attention_block if recompute and _use_fused_cuda(q) else _sparse_attention_block
    query_block_size = query_block_size or 64
    blocks = []
    for t0 in range(0, T, query_block_size):
        block_args = (q[:, :, t0:t0 + query_block_size], k, v,
                      indices[:, t0:t0 + query_block_size], valid[:, t0:t0 + query_block_size], scale)
        if recompute and needs_graph:
            blocks.append(checkpoint(block_fn, *block_args, use_reentrant=False))
        else:
            blocks.append(block_fn(*block_args))
    out = torch.cat(blocks, dim=2)
    if return_probs:
        raise ValueError("return_probs needs recompute=True")
    return out


def topk_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index_scores: torch.Tensor,
    topk: int,
    scale: Optional[float] = None,
    query_block_size: Optional[int] = None,
    recompute: bool = True,
) -> torch.Tensor:
    """DSA: each query attends to its top-k causal keys under index_scores (B, T, T), the selection
    shared by all heads. With topk >= T this is dense causal attention. No gradient flows to
    index_scores (see `indexer_kl_loss`)."""
    indices, valid = select_topk_keys(index_scores, topk)
    return sparse_attention_from_indices(q, k, v, indices, valid, scale, query_block_size, recompute)
