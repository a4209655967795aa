"""The trainer's one data path: TrainBatches / EvalBatches read through megaloop.data's loader
(build_data_loader: PretrainingSampler + collate_samples, data.num_workers reader processes) and attach the
loop counts in the main process. Worker processes change nothing about what is read: same samples, same
order, same R, across a resume."""
import numpy as np
import torch

from megaloop.config import config_from_dict
from megaloop.data import build_datasets
from megaloop.data.indexed_dataset import IndexedDatasetWriter
from megaloop.model.loop_schedule import sample_loops
from megaloop.training.data import EvalBatches, TrainBatches

MBS, GAS, DP, SEQ = 2, 2, 2, 8


def _dataset(tmp_path, num_samples=64):
    rng = np.random.RandomState(0)
    with IndexedDatasetWriter(str(tmp_path / "d"), np.int32) as writer:
        for d, n in enumerate(rng.randint(1, 30, size=120)):
            writer.add_document(d * 1000 + np.arange(n))
    return build_datasets(str(tmp_path / "d"), "90,10,0", SEQ, {"train": num_samples, "valid": 8}, seed=0,
                          cache_dir=str(tmp_path / "cache"))


def _cfg(num_workers):
    return config_from_dict({"train": {"micro_batch_size": MBS, "grad_accum_steps": GAS, "seed": 7},
                             "loop": {"sampling": "poisson", "mean": 3, "min": 1, "max": 6},
                             "data": {"seq_len": SEQ, "num_workers": num_workers}})


def _take(batches, n):
    out = []
    for _ in range(n):
        (tokens, loops), labels = next(batches)
        out.append((tokens.clone(), loops.clone(), labels.clone()))
    return out


def _run_with_resume(train, num_workers, dp_rank, first, then):
    """`first` micro-batches, then a restart from the consumed samples, then `then` more."""
    cfg = _cfg(num_workers)
    batches = TrainBatches(train, cfg, dp_rank, DP, 0)
    assert batches._it is None  # nothing read, no workers started (a middle pipeline stage never reads)
    head = _take(batches, first)
    if num_workers:
        assert type(batches._it).__name__ == "_MultiProcessingDataLoaderIter"
    consumed = first * MBS * DP  # `first` is a whole number of optimizer steps
    resumed = TrainBatches(train, cfg, dp_rank, DP, consumed)
    return head + _take(resumed, then)


def test_workers_read_the_same_batches_and_loops_as_in_process_across_a_resume(tmp_path):
    train = _dataset(tmp_path)["train"]
    cfg = _cfg(0)
    first, then = 3 * GAS, 2 * GAS  # resume at a step boundary (consumed_samples is whole global batches)
    for dp_rank in range(DP):
        in_process = _run_with_resume(train, 0, dp_rank, first, then)
        with_workers = _run_with_resume(train, 2, dp_rank, first, then)
        uninterrupted = _take(TrainBatches(train, cfg, dp_rank, DP, 0), first + then)
        for j, ((t0, l0, y0), (t2, l2, y2), (tu, lu, yu)) in enumerate(zip(in_process, with_workers, uninterrupted)):
            start = j * MBS * DP + dp_rank * MBS  # this rank's slice of global micro batch j
            sample = np.stack([train[i] for i in range(start, start + MBS)]).astype(np.int64)
            assert t0.dtype == torch.int64 and t0.shape == (MBS, SEQ) and t0.is_contiguous()
            assert t0.tolist() == sample[:, :-1].tolist() and y0.tolist() == sample[:, 1:].tolist()
            lc = sample_loops(cfg.loop, cfg.train.seed, j // GAS, j % GAS)
            assert l0.tolist() == [lc.total, lc.grad]
            for t, lp, y in ((t2, l2, y2), (tu, lu, yu)):
                assert torch.equal(t, t0) and torch.equal(lp, l0) and torch.equal(y, y0), (dp_rank, j)
    # R varies across the run (a fixed R would not test the (step, micro-batch) counter).
    assert len({int(lp[0]) for _, lp, _ in uninterrupted}) > 1


def test_eval_batches_are_the_first_micro_batches_every_time(tmp_path):
    valid = _dataset(tmp_path)["valid"]
    n = len(valid)
    iters = n // (MBS * DP) + 1  # runs past the end of the split: indices wrap around
    for dp_rank in range(DP):
        batches = EvalBatches(valid, _cfg(2), dp_rank, DP, iters, loops=5)
        got = _take(batches, iters)
        for k, (tokens, loops, labels) in enumerate(got):
            idx = [((k * DP + dp_rank) * MBS + b) % n for b in range(MBS)]
            sample = np.stack([valid[i] for i in idx]).astype(np.int64)
            assert tokens.tolist() == sample[:, :-1].tolist() and labels.tolist() == sample[:, 1:].tolist()
            assert loops.tolist() == [5, 5]
        assert next(batches, None) is None
        batches.reset()
        assert torch.equal(_take(batches, 1)[0][0], got[0][0])
