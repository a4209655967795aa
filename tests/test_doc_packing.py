"""Document-aware packing (data.reset_attention_mask / reset_position_ids / eod_mask_loss, Megatron's
semantics): a packed sample gives each document the logits it gets alone, for every architecture and
mixer; the kernels' document-aware forms equal their references."""
import glob
from pathlib import Path

import pytest
import torch

from megaloop.config import load_config
from megaloop.model import build_model
from megaloop.model.documents import DocumentPacking, document_ids, positions_in_document

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted(glob.glob(str(ROOT / "yaml_configs/tiny/*.yaml")))
EOD = 256
# Two rows of 48 tokens: documents of these lengths (each ends with EOD but a row's last one, cut off).
SPLITS = [(11, 30, 7), (25, 23)]
PACKING = DocumentPacking(EOD, reset_attention_mask=True, reset_position_ids=True)


def packed_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, docs = [], []
    for split in SPLITS:
        pieces = []
        for i, n in enumerate(split):
            d = torch.randint(0, 256, (n,), generator=g)
            if i < len(split) - 1:
                d[-1] = EOD
            pieces.append(d)
        rows.append(torch.cat(pieces))
        docs.append(pieces)
    return torch.stack(rows), docs


def test_document_ids_and_positions_follow_megatron():
    tokens = torch.tensor([[5, EOD, 7, 8, EOD, EOD, 9]])
    ids = document_ids(tokens, EOD)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 3]]  # the eod belongs to the document it ends
    assert positions_in_document(ids).tolist() == [[0, 1, 0, 1, 2, 0, 0]]


@pytest.mark.parametrize("path", TINY, ids=[Path(p).stem for p in TINY])
def test_packed_documents_give_each_document_its_own_logits(path):
    over = ["model.gdn_chunk_size=16"]
    cfg = load_config(path)
    if cfg.model.state_init == "noise":  # a random start differs per call; the masks are what is tested
        over.append("model.state_init=zeros")
    cfg = load_config(path, over)
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    model.packing = PACKING
    tokens, docs = packed_rows()
    with torch.no_grad():
        packed = model(tokens).logits
        for b, pieces in enumerate(docs):
            start = 0
            for d in pieces:
                alone = model(d[None]).logits[0]
                torch.testing.assert_close(packed[b, start:start + len(d)], alone, rtol=1e-7, atol=1e-7)
                start += len(d)
        model.packing = None  # one document: the packed path is the plain one
        torch.testing.assert_close(model(docs[0][0][None]).logits[0], packed[0, :len(docs[0][0])],
                                   rtol=1e-7, atol=1e-7)


def test_per_sequence_loop_counts_with_packed_documents():
    # loop.granularity=sequence runs a loop on the rows still updating only: their document structure too.
    cfg = load_config(str(ROOT / "yaml_configs/tiny/parcae.yaml"), ["model.state_init=zeros"])
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    model.packing = PACKING
    tokens, docs = packed_rows()
    loops = torch.tensor([2, 4])
    with torch.no_grad():
        packed = model(tokens, loops=loops).logits
        for b, pieces in enumerate(docs):
            start = 0
            for d in pieces:
                alone = model(d[None], loops=int(loops[b])).logits[0]
                torch.testing.assert_close(packed[b, start:start + len(d)], alone, rtol=1e-7, atol=1e-7)
                start += len(d)


def test_eod_mask_loss_ignores_the_prediction_made_at_each_eod():
    import numpy as np

    from megaloop.training.data import EvalBatches, TrainBatches
    rows = [np.array([1, 2, EOD, 3, EOD, EOD, 4, 5, 6]), np.array([EOD, 7, 8, 9, 10, 11, 12, 13, 14])]
    on = load_config(None, ["data.seq_len=8", "model.max_seq_len=8", "data.eod_mask_loss=true",
                            "train.micro_batch_size=2"])
    (tokens, _), labels = next(TrainBatches(rows, on, 0, 1))
    # Megatron's loss_mask[tokens == eod] = 0: the eod itself is still predicted, what follows it is not
    assert labels.tolist() == [[2, EOD, -1, EOD, -1, -1, 5, 6], [-1, 8, 9, 10, 11, 12, 13, 14]]
    assert tokens.tolist() == [[1, 2, EOD, 3, EOD, EOD, 4, 5], [EOD, 7, 8, 9, 10, 11, 12, 13]]
    (_, _), eval_labels = next(EvalBatches(rows, on, 0, 1, iters=1, loops=1))
    assert torch.equal(eval_labels, labels)
    off = load_config(None, ["data.seq_len=8", "model.max_seq_len=8", "train.micro_batch_size=2"])
    assert (next(TrainBatches(rows, off, 0, 1))[1] >= 0).all()


@pytest.mark.parametrize("overrides, words", [
    (["data.task=parity", "data.reset_attention_mask=true"], "data.reset_attention_mask: data.task='parity'"),
    (["data.task=parity", "data.eod_mask_loss=true"], "data.eod_mask_loss"),
    (["data.reset_position_ids=true", "model.causal=false", "data.task=sudoku"], "data.reset_position_ids: data.task"),
])
def test_unsupported_packing_combinations_are_refused_naming_the_field(overrides, words):
    from megaloop.config import ConfigError
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, overrides)


# ------------------------------------------------------------------------------------------------
# The kernels: with document ids, each document computes what it computes alone.

def _doc_ids(T=37, cuts=(5, 6, 20, 33)):
    """Two rows: the first cut at `cuts` (a one-token document included), the second one document."""
    ids = torch.zeros(2, T, dtype=torch.long)
    for c in cuts:
        ids[0, c:] += 1
    return ids


def _per_document(fn, ids, *xs, dim=1):
    """fn on each document of each row alone, the results put back in place along `dim`."""
    rows = []
    for b in range(ids.shape[0]):
        pieces = []
        for d in ids[b].unique():
            sel = (ids[b] == d).nonzero().flatten()
            pieces.append(fn(*(x[b:b + 1].index_select(dim, sel) for x in xs)))
        rows.append(torch.cat(pieces, dim=dim))
    return torch.cat(rows, dim=0)


def test_gated_delta_rule_restarts_its_state_at_each_document():
    from megaloop.ops.gated_delta import gated_delta_rule_chunked, gated_delta_rule_recurrent
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 37, 2, 8
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    gate = -torch.nn.functional.softplus(torch.randn(B, T, H, generator=g, dtype=torch.float64))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g, dtype=torch.float64))
    ids = _doc_ids(T)
    ref = _per_document(lambda *x: gated_delta_rule_recurrent(*x)[0], ids, q, k, v, gate, beta)
    rec, _ = gated_delta_rule_recurrent(q, k, v, gate, beta, doc_ids=ids)
    torch.testing.assert_close(rec, ref)
    for chunk in (4, 8, 64):  # boundaries inside chunks, at chunk starts, one chunk for all
        out, _ = gated_delta_rule_chunked(q, k, v, gate, beta, chunk_size=chunk, doc_ids=ids)
        torch.testing.assert_close(out, ref)


def test_fla_varlen_path_cuts_at_documents_and_syncs_once_per_micro_batch():
    """fla's variable-length call (CUDA only), with a stand-in for fla's chunk kernel that runs megaloop's
    recurrent rule on each cu_seqlens piece: each document alone; cu_seqlens (a host sync) computed once per
    doc_ids tensor, not once per GDN layer and loop."""
    from megaloop.ops import gated_delta as gd
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 2, 37, 2, 8
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(2))
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    gate = -torch.nn.functional.softplus(torch.randn(B, T, H, generator=g, dtype=torch.float64))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g, dtype=torch.float64))
    seen = []

    def fla_standin(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        seen.append(cu_seqlens)
        cuts = cu_seqlens.tolist()
        pieces = [gd.gated_delta_rule_recurrent(*(x[:, a:b] for x in (q, k, v, g, beta)), scale=scale)[0]
                  for a, b in zip(cuts[:-1], cuts[1:])]
        return torch.cat(pieces, dim=1), None

    ids = _doc_ids(T)
    ref = _per_document(lambda *x: gd.gated_delta_rule_recurrent(*x)[0], ids, q, k, v, gate, beta)
    for _ in range(3):  # three layers / loops of one micro-batch
        out, state = gd._fla_varlen(fla_standin, q, k, v, gate, beta, None, ids)
        torch.testing.assert_close(out, ref)
        assert state is None
    assert seen[0] is seen[1] is seen[2]
    starts = [b * T + t for b in range(B) for t in range(T) if t == 0 or ids[b, t] != ids[b, t - 1]]
    assert seen[0].tolist() == starts + [B * T]
    gd._fla_varlen(fla_standin, q, k, v, gate, beta, None, ids.clone())  # the next micro-batch
    ids[:, 5:] += 1  # (changed in place: row 1 gets a document start at t = 5)
    gd._fla_varlen(fla_standin, q, k, v, gate, beta, None, ids)
    assert seen[3] is not seen[0] and seen[4] is not seen[0] and T + 5 in seen[4].tolist()


def test_short_conv_does_not_reach_across_a_document_start():
    from megaloop.ops.short_conv import causal_depthwise_conv1d
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, 6, generator=g, dtype=torch.float64)
    w, bias = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    ids = _doc_ids()
    ref = _per_document(lambda t: causal_depthwise_conv1d(t, w, bias)[0], ids, x)
    torch.testing.assert_close(causal_depthwise_conv1d(x, w, bias, doc_ids=ids)[0], ref)


@pytest.mark.parametrize("window", [3, 8, 64])
def test_sliding_window_stays_inside_the_document(window):
    from megaloop.ops.sliding_window import sliding_window_attention, sliding_window_attention_dense
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ids = _doc_ids()
    ref = _per_document(lambda a, b, c: sliding_window_attention(a, b, c, window), ids, q, k, v, dim=2)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, doc_ids=ids), ref)
    torch.testing.assert_close(sliding_window_attention_dense(q, k, v, window, doc_ids=ids), ref)


def test_dsa_indexer_selects_only_keys_of_the_document():
    from megaloop.ops.lightning_indexer import lightning_indexer_topk
    g = torch.Generator().manual_seed(3)
    T, K = 150, 8  # long enough for the staged top-k (several query blocks, strided bounds)
    q_idx = torch.randn(2, T, 2, 8, generator=g)
    k_idx, w = torch.randn(2, T, 8, generator=g), torch.randn(2, T, 2, generator=g)
    ids = _doc_ids(T, cuts=(3, 40, 41, 120))
    idx, valid = lightning_indexer_topk(q_idx, k_idx, w, K, doc_ids=ids)
    for b in range(2):
        for d in ids[b].unique():
            sel = (ids[b] == d).nonzero().flatten()
            start = int(sel[0])
            i1, v1 = lightning_indexer_topk(q_idx[b:b + 1, sel], k_idx[b:b + 1, sel], w[b:b + 1, sel], K)
            for j, t in enumerate(sel.tolist()):  # the same set of valid keys (slot order may differ)
                assert sorted((idx[b, t][valid[b, t]] - start).tolist()) == sorted(i1[0, j][v1[0, j]].tolist())


# ------------------------------------------------------------------------------------------------
# The pipeline layers carry the document ids from the embedding to the last layer that needs them.

@pytest.mark.parametrize("overrides", [
    ["model.n_prelude=1", "model.n_coda=1", "model.tie_embeddings=false"],
    ["model.n_prelude=1", "model.n_coda=2", "model.n_loop=2", "model.mixer=gdn,swa", "model.window=4",
     "loop.loss=mean"],  # per-loop outputs stacked on the batch axis through the coda
    ["model.mixer=dsa", "model.dsa_topk=4", "model.exit_gate=true", "loop.loss=exit_weighted"],
])
def test_pipeline_layers_in_sequence_equal_the_model_with_packed_documents(overrides):
    from megaloop.parallel import pipeline as pl
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.vocab_size=100", "model.max_seq_len=16",
                             "data.seq_len=16", *overrides])
    torch.manual_seed(0)
    lm = build_model(cfg)
    lm.packing = DocumentPacking(99, reset_attention_mask=True, reset_position_ids=True)
    tokens = torch.randint(0, 99, (2, 16))
    tokens[0, [3, 9]] = 99
    tokens[1, 6] = 99
    labels = torch.randint(0, 99, (2, 16))
    R, G = 3, 2
    ref = lm(tokens, labels=labels, loops=R, grad_loops=G).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()
    collect = cfg.loop.loss != "last"
    loss_fn = pl.LoopLoss(cfg.loop.loss, lm.token_loss_fn, cfg.loop.exit_entropy_weight, collect)
    x = (tokens, torch.tensor([R, G]))
    for layer in pl.local_layers(lm, collect):
        x = layer(x)
    loss = loss_fn(x, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    for n, p in lm.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    # ... and the masks matter here (logits: at init the loss is ~ln(vocab) whatever the masks)
    packed = lm(tokens, loops=R).logits
    lm.packing = None
    assert not torch.allclose(lm(tokens, loops=R).logits, packed)


# ------------------------------------------------------------------------------------------------
# Through the trainer: TP 2 with sequence parallelism and PP 2 follow the one-rank run, all flags on.

def _short_document_dataset(prefix: str, n_docs: int = 3000) -> str:
    """Lines of the standard library's sources as documents (3 to 60 bytes, each + eod 256): a 32-token
    sample holds several documents."""
    import os

    import numpy as np

    from megaloop.data.indexed_dataset import IndexedDatasetWriter
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    lines = [ln for ln in open(os.path.join(os.path.dirname(os.__file__), "os.py"), "rb").read().splitlines()
             if 3 <= len(ln.strip()) <= 60]
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for i in range(n_docs):
            w.add_document(list(lines[i % len(lines)].strip()) + [EOD])
    return prefix


def test_trainer_tp2_sp_and_pp2_match_single_rank_with_packed_documents(tmp_path):
    pytest.importorskip("deepspeed")
    from test_train_support import assert_ok, run_ranks, tiny_config, train_losses, train_rows, write_config
    data = _short_document_dataset(str(tmp_path / "data" / "docs"))
    model = {"n_prelude": 1, "n_coda": 1, "n_loop": 2, "mixer": "gdn,dsa", "dsa_topk": 8, "n_kv_heads": 2}
    flags = {"reset_attention_mask": True, "reset_position_ids": True, "eod_mask_loss": True}
    train = {"steps": 4, "log_interval": 1, "eval_interval": 4, "eval_iters": 1}
    runs = {}
    for name, world, par in [("single", 1, {"zero_stage": 1}),
                             ("tp2_sp", 2, {"zero_stage": 1, "tensor_parallel": 2, "sequence_parallel": True}),
                             ("pp2", 2, {"zero_stage": 1, "pipeline_parallel": 2})]:
        out = str(tmp_path / name)
        cfg = write_config(str(tmp_path / f"{name}.yaml"),
                           tiny_config(data, out, model=model, train=train, parallel=par, data=flags))
        assert_ok(run_ranks(world, ["--config", cfg], timeout=240))
        runs[name] = out
    a = train_losses(runs["single"])
    assert sorted(a) == [1, 2, 3, 4]
    for name in ("tp2_sp", "pp2"):
        b, rb = train_losses(runs[name]), train_rows(runs[name])
        for s in a:
            assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6), (name, s, a[s], b[s])
            assert rb[s]["grad_norm"] == pytest.approx(train_rows(runs["single"])[s]["grad_norm"], rel=1e-3)
