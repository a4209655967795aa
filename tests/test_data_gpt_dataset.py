"""GPTDataset sampling, splits, index cache, blending, and resumable sampling."""
import multiprocessing
import os
import time

import numpy as np
import pytest

from megaloop.data import build_data_loader, build_datasets, parse_data_paths
from megaloop.data.blended_dataset import BlendedDataset, build_blending_indices
from megaloop.data.gpt_dataset import GPTDataset, build_sample_index, parse_split
from megaloop.data.index_cache import build_or_load_arrays
from megaloop.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megaloop.data.sampler import PretrainingSampler
from megaloop.data.tokenizer import ByteTokenizer


def make_dataset(prefix, num_docs=200, seed=0, max_len=40, dtype=np.int32):
    """Document d holds tokens d * 1000 + 0, 1, 2, ...: every token says where it came from."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, max_len, size=num_docs)
    docs = [d * 1000 + np.arange(n) for d, n in enumerate(lengths)]
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
    return IndexedDataset(str(prefix)), docs


def megatron_sample_index(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """A line-by-line port of Megatron-LM's C++ build_sample_idx (add_extra_token=1, drop last partial)."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int64)
    sample_index, doc_idx_index, doc_offset = 1, 0, 0
    while sample_index <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[doc_idx[doc_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
        sample_index += 1
    return sample_idx


@pytest.mark.parametrize("seed", range(5))
def test_vectorized_sample_index_equals_megatrons_loop(seed):
    rng = np.random.RandomState(seed)
    sizes = rng.randint(0, 30, size=60).astype(np.int32)  # includes empty documents
    sizes[0] = 5
    doc_idx = np.tile(np.arange(60, dtype=np.int32), 2)
    rng.shuffle(doc_idx)
    for seq_len in (1, 7, 16, 64):
        ours = build_sample_index(sizes, doc_idx, seq_len)
        assert ours.tolist() == megatron_sample_index(sizes, doc_idx, seq_len, 2, int(sizes.sum())).tolist()


@pytest.mark.parametrize("num_samples", [10, 150, 2000])  # within one epoch, a few epochs, many epochs
def test_every_sample_is_the_right_slice_of_the_shuffled_stream(tmp_path, num_samples):
    indexed, docs = make_dataset(tmp_path / "d")
    ds = GPTDataset(indexed, (0, 200), seq_len=16, num_samples=num_samples, seed=3)
    assert len(ds) >= num_samples
    stream = np.concatenate([docs[d] for d in ds.document_index])
    epochs = len(ds.document_index) // 200
    assert sorted(np.bincount(ds.document_index, minlength=200)) == [epochs] * 200  # every doc, every epoch
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
    for idx in range(len(ds)):
        sample = ds[idx]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        start = int(ds.shuffle_index[idx]) * 16
        np.testing.assert_array_equal(sample, stream[start:start + 17])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_parse_split_ranges_are_disjoint_and_cover():
    assert parse_split("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert parse_split("100", 7) == [(0, 7), (7, 7), (7, 7)]
    rng = np.random.RandomState(0)
    for _ in range(300):
        weights = rng.randint(0, 50, size=3)
        weights[rng.randint(3)] += 1
        n = int(rng.randint(0, 500))
        ranges = parse_split(",".join(map(str, weights)), n)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(start <= end for start, end in ranges)
    for bad in ("a,b", "-1,2", "0,0,0", "1,2,3,4", ""):
        with pytest.raises(ValueError, match="split"):
            parse_split(bad, 10)


def test_splits_draw_only_from_their_own_documents(tmp_path):
    make_dataset(tmp_path / "d")
    datasets = build_datasets([str(tmp_path / "d")], "80,15,5", seq_len=8,
                              num_samples={"train": 300, "valid": 50, "test": 20}, seed=1)
    docs_seen = {}
    for name, ds in datasets.items():
        tokens = np.concatenate([ds[i] for i in range(len(ds))])
        docs_seen[name] = set((tokens // 1000).tolist())
    assert docs_seen["train"] <= set(range(0, 160))
    assert docs_seen["valid"] <= set(range(160, 190))
    assert docs_seen["test"] <= set(range(190, 200))
    assert build_datasets(str(tmp_path / "d"), "80,15,5", 8, {"train": 10}, seed=1)["valid"] is None
    assert len(os.listdir(tmp_path / "index-cache")) > 0  # the default cache sits next to the data
    with pytest.raises(ValueError, match="leaves no documents"):
        build_datasets(str(tmp_path / "d"), "100,0,0", 8, {"train": 10, "valid": 5}, seed=1)


def test_seed_determines_the_order(tmp_path):
    indexed, _ = make_dataset(tmp_path / "d")
    a = GPTDataset(indexed, (0, 200), 16, 100, seed=5)
    b = GPTDataset(indexed, (0, 200), 16, 100, seed=5)
    c = GPTDataset(indexed, (0, 200), 16, 100, seed=6)
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    assert not all(np.array_equal(a[i], c[i]) for i in range(min(len(a), len(c))))


def test_index_cache_is_reused_and_invalidated_when_the_input_changes(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    indexed, _ = make_dataset(tmp_path / "d")
    first = GPTDataset(indexed, (0, 200), 16, 100, seed=5, cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 3

    def must_not_build(self):
        raise AssertionError("the cached index should have been loaded")

    with monkeypatch.context() as m:
        m.setattr(GPTDataset, "_build_indices", must_not_build)
        again = GPTDataset(IndexedDataset(str(tmp_path / "d")), (0, 200), 16, 100, seed=5, cache_dir=cache)
        assert isinstance(again.shuffle_index, np.memmap)
        assert all(np.array_equal(first[i], again[i]) for i in range(len(first)))
        for changed in (dict(seed=6), dict(num_samples=101), dict(seq_len=15)):
            args = dict(seq_len=16, num_samples=100, seed=5) | changed
            with pytest.raises(AssertionError, match="cached index"):
                GPTDataset(indexed, (0, 200), cache_dir=cache, **args)

    time.sleep(0.01)
    changed, _ = make_dataset(tmp_path / "d", seed=1)  # rewritten input: new content, size and mtime
    rebuilt = GPTDataset(changed, (0, 200), 16, 100, seed=5, cache_dir=cache)
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 6
    stream = np.concatenate([changed.get(int(d)) for d in rebuilt.document_index])
    start = int(rebuilt.shuffle_index[0]) * 16
    np.testing.assert_array_equal(rebuilt[0], stream[start:start + 17])


def _build_in_process(cache_dir, log_path, queue):
    def slow_build():
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        return {"x": np.arange(10) * 7}

    arrays = build_or_load_arrays(cache_dir, "test", {"what": "race"}, slow_build)
    queue.put(arrays["x"].tolist())


def test_concurrent_processes_build_the_cache_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    log = str(tmp_path / "builds.log")
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path / "cache"), log, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results == [list(range(0, 70, 7))] * 3
    assert len(open(log).read().split()) == 1
    assert not [f for f in os.listdir(tmp_path / "cache") if ".tmp-" in f]


def _distributed_rank(rank, world, init_file, cache_dir, log_path, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _build_in_process(cache_dir, log_path, queue)
    dist.barrier()
    dist.destroy_process_group()


def test_under_torch_distributed_rank0_builds_and_others_wait(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    log = str(tmp_path / "builds.log")
    args = (str(tmp_path / "init"), str(tmp_path / "cache"), log, queue)
    procs = [ctx.Process(target=_distributed_rank, args=(rank, 2) + args) for rank in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [list(range(0, 70, 7))] * 2
    assert len(open(log).read().split()) == 1


def test_resume_after_consumed_samples_continues_exactly(tmp_path):
    make_dataset(tmp_path / "d", num_docs=300)
    cache = str(tmp_path / "cache")
    mbs, dp = 2, 3
    train = build_datasets(str(tmp_path / "d"), "100", 12, {"train": 120}, seed=9, cache_dir=cache)["train"]

    def run(consumed, steps, dataset):
        """What every rank reads in `steps` steps after `consumed` samples: [step][rank] -> samples."""
        samplers = [iter(PretrainingSampler(len(dataset), consumed, mbs, r, dp)) for r in range(dp)]
        return [[[dataset[i].tolist() for i in next(s)] for s in samplers] for _ in range(steps)]

    uninterrupted = run(0, 10, train)
    # A fresh process: datasets rebuilt from the cache, sampler restarted after 4 steps.
    reopened = build_datasets(str(tmp_path / "d"), "100", 12, {"train": 120}, seed=9, cache_dir=cache)["train"]
    assert run(4 * mbs * dp, 6, reopened) == uninterrupted[4:]
    # ... and without the cache (rebuilt from scratch) the samples are the same too.
    rebuilt = build_datasets(str(tmp_path / "d"), "100", 12, {"train": 120}, seed=9)["train"]
    assert run(4 * mbs * dp, 6, rebuilt) == uninterrupted[4:]


def test_sampler_partitions_global_batches_among_ranks():
    per_rank = [list(PretrainingSampler(23, 3, 2, r, 3)) for r in range(3)]
    assert per_rank[0][:2] == [[3, 4], [9, 10]] and per_rank[2][0] == [7, 8]
    flat = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert flat == list(range(3, 21))  # 3 full global batches of 6; the last 2 samples are dropped
    assert [len(PretrainingSampler(23, 3, 2, r, 3)) for r in range(3)] == [3, 3, 3]
    # drop_last=False: a last partial batch of 4 is shared equally, one sample per rank (24 is dropped).
    with_tail = [list(PretrainingSampler(25, 3, 2, r, 3, drop_last=False)) for r in range(3)]
    assert [batches[-1] for batches in with_tail] == [[21], [22], [23]]
    assert [len(PretrainingSampler(25, 3, 2, r, 3, drop_last=False)) for r in range(3)] == [4, 4, 4]
    for bad in [dict(consumed_samples=24), dict(dp_rank=3), dict(micro_batch_size=0)]:
        args = dict(total_samples=23, consumed_samples=0, micro_batch_size=2, dp_rank=0, dp_size=3) | bad
        with pytest.raises(ValueError):
            PretrainingSampler(**args)


def test_data_loader_yields_token_tensors(tmp_path):
    make_dataset(tmp_path / "d")
    train = build_datasets(str(tmp_path / "d"), "100", 8, {"train": 40}, seed=0)["train"]
    loader = build_data_loader(train, consumed_samples=8, micro_batch_size=4, dp_rank=1, dp_size=2, num_workers=0)
    batches = list(loader)
    assert batches[0].shape == (4, 9) and str(batches[0].dtype) == "torch.int64"
    assert batches[0][0].tolist() == train[12].tolist()
    assert len(batches) == (len(train) - 8) // 8


def reference_blend(weights, n):
    """Megatron-LM's build_blending_indices, transcribed directly."""
    counts = np.zeros(len(weights))
    out = []
    for i in range(n):
        errors = np.asarray(weights) * max(i, 1) - counts
        best = int(np.argmax(errors))
        out.append(best)
        counts[best] += 1
    return out


def test_blending_follows_the_greedy_rule_and_holds_at_every_prefix():
    for weights in ([0.7, 0.3], [0.5, 0.25, 0.25], [0.1, 0.6, 0.05, 0.25], [1 / 3] * 3):
        dataset_index, sample_index = build_blending_indices(weights, 5000)
        assert dataset_index.tolist()[:500] == reference_blend(weights, 500)
        counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[dataset_index], axis=0)  # [n, datasets]
        expected = np.outer(np.arange(1, 5001), weights)
        assert np.abs(counts - expected).max() <= 1.0 + 1e-9
        for d in range(len(weights)):
            assert sample_index[dataset_index == d].tolist() == list(range(int(counts[-1, d])))
    # A weight of 0 is never picked, even on ties of zero error.
    dataset_index, _ = build_blending_indices([0.0, 0.5, 0.5], 1000)
    assert 0 not in dataset_index


def test_blended_datasets_mix_by_weight(tmp_path):
    make_dataset(tmp_path / "a", num_docs=100, seed=1)
    make_dataset(tmp_path / "b", num_docs=60, seed=2, dtype=np.uint16)  # ids < 60,000 fit uint16
    (tmp_path / "cache").mkdir()
    datasets = build_datasets(["0.75", str(tmp_path / "a"), "0.25", str(tmp_path / "b")], "90,10,0", seq_len=8,
                              num_samples={"train": 400, "valid": 40}, seed=2, cache_dir=str(tmp_path / "cache"))
    train = datasets["train"]
    assert isinstance(train, BlendedDataset) and len(train) == 400 and datasets["test"] is None
    assert np.bincount(train.dataset_index).tolist() == [300, 100]
    a, b = train.datasets
    for i in range(0, 400, 7):
        source = (a, b)[train.dataset_index[i]]
        assert np.array_equal(train[i], source[int(train.dataset_sample_index[i])])
    with pytest.raises(ValueError, match="has only"):
        BlendedDataset([a, b], [0.5, 0.5], len(b) * 3)


def test_data_path_forms_and_vocab_check(tmp_path):
    assert parse_data_paths("a_text_document") == (["a_text_document"], [1.0])
    assert parse_data_paths([0.3, "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_data_paths([(1, "a"), (2, "b")]) == (["a", "b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="weight"):
        parse_data_paths(["a", "b"])
    make_dataset(tmp_path / "d")  # ids up to 199 * 1000: not byte-tokenizer ids
    with pytest.raises(ValueError, match="another tokenizer"):
        build_datasets(str(tmp_path / "d"), "100", 8, {"train": 4}, seed=0, tokenizer=ByteTokenizer())
