"""Bounded host memory when loading for a new layout (issue 22): a rank reads its own TP slice of each of its
parameters from the memory-mapped checkpoint, one parameter at a time (megaloop.checkpoint.sharded_read),
instead of merging the whole training state first.

- tp_slice against merge-then-shard for every (old TP, new TP, kv replicas) combination, with a ZeRO 1/2
  parameter split across data-parallel partitions;
- a ZeRO 0 TP 2 checkpoint of ~3 M parameters (35 MiB of weights + moments) resumed on TP 4 through the
  resume's own loader into a stand-in engine: every rank gets its slices (weights, exp_avg, exp_avg_sq, step),
  and rank 1's private memory grows by about what it keeps (its moments), not by the whole state, which
  the whole-state merge (what every rank built before) does hold;
- init.from of the same checkpoint reads the weights only (the optimizer state in the same files stays on disk),
  one merged tensor at a time: a TP 4 rank holds its shards, not the merged source.
The in-process measurement and the checkpoint writer are benchmarks/bench_load_memory.py's.
"""
import pytest
import torch

from benchmarks.bench_load_memory import PeakMemory, run_config, share_bytes, stand_in_engine, write_zero0_checkpoint

MIB = 1 << 20


@pytest.mark.parametrize("tp_old,tp_new,rep_old,rep_new", [(2, 4, 1, 2), (4, 2, 2, 1), (2, 1, 1, 1), (1, 4, 1, 1),
                                                           (4, 4, 2, 1)])
def test_tp_slice_equals_merge_then_shard(tp_old, tp_new, rep_old, rep_new):
    from megaloop.checkpoint.sharded_read import Shard, tp_slice
    from megaloop.parallel.tensor_parallel import REPLICATED, Partition

    def part(tp, rep, dim):
        return Partition(dim, "kv_replicated", replicas=rep) if tp > 1 else REPLICATED

    full = torch.randn(8, 6)
    for dim in (0, 1):
        full_d = full if dim == 0 else full.t().contiguous()
        po, pn = part(tp_old, rep_old, dim), part(tp_new, rep_new, dim)
        n_old = tp_old // rep_old
        size = full_d.shape[dim] // n_old
        shards = []
        for r in range(tp_old):
            s = full_d.narrow(dim, (r // rep_old) * size, size).contiguous() if tp_old > 1 else full_d
            flat = s.reshape(-1)  # split in two pieces, as a parameter across two ZeRO partitions
            shards.append(Shard(tuple(s.shape), [flat[:5], flat[5:]], "test"))
        n_new = tp_new // rep_new
        for r in range(tp_new):
            got = tp_slice(shards, po, tp_old, pn, r, tp_new)
            want = full_d.narrow(dim, (r // rep_new) * (full_d.shape[dim] // n_new), full_d.shape[dim] // n_new)
            assert torch.equal(got, want), (dim, r)
            assert got.is_contiguous() and got.untyped_storage().data_ptr() != full_d.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megaloop.model import LoopedLM
    tag = tmp_path_factory.mktemp("load_memory") / "step_00000003"
    cfg = run_config(512, 1, 2)  # 8 heads, 2 kv heads: wk / wv replicated by pairs on TP 4
    write_zero0_checkpoint(tag, cfg)
    torch.manual_seed(0)
    full = {k: v.detach() for k, v in LoopedLM(cfg.model).state_dict().items()}
    return tag, full


def _in_a_fresh_process(fn, *args):
    """fn(*args) in a process forked from tests/preloaded.py's server: a heap that has not served the pytest
    process's earlier tests, whose freed memory the allocator would reuse and hide from the growth measured."""
    from preloaded import context
    ctx = context()
    q = ctx.Queue()
    p = ctx.Process(target=_call, args=(q, fn, args))
    p.start()
    try:
        ok, value = q.get(timeout=300)
    finally:
        p.join(30)
    if not ok:
        raise AssertionError(value)
    return value


def _call(q, fn, args):
    import traceback
    try:
        q.put((True, fn(*args)))
    except BaseException:  # noqa: BLE001 - the traceback goes back to the test
        q.put((False, traceback.format_exc()))


def test_resume_on_a_new_tp_layout_holds_the_ranks_share_not_the_whole_state(ckpt):
    _in_a_fresh_process(_resume_memory, ckpt)


def _resume_memory(ckpt):
    from megaloop.checkpoint.relayout import load_training_any_layout
    from megaloop.checkpoint.training_state import TrainingStateReader, load_training_state
    from megaloop.parallel.apply_tp import partition_info_for, shard_state_dict
    tag, full = ckpt
    cfg = run_config(512, 1, 4)
    info = partition_info_for(cfg.model, 4)
    whole = 3 * 4 * sum(v.numel() for k, v in full.items() if k != "head.weight")
    import deepspeed.utils  # noqa: F401 - (the loader's imports are not what is measured)
    TrainingStateReader(tag).close()
    te, state = stand_in_engine(cfg, 1, 4)
    module, opt = te.engine.module, te.engine.optimizer
    with PeakMemory() as pm:
        client = load_training_any_layout(te, tag, state, cfg)
    assert client["step"] == 3
    want = shard_state_dict(full, info, 1, 4)
    for n, p in module.named_parameters():
        assert torch.equal(p.detach(), want[n]), n
        st = opt.state[p]
        assert torch.equal(st["exp_avg"], want[n] + 1) and torch.equal(st["exp_avg_sq"], want[n] ** 2), n
        assert float(st["step"]) == 3.0
    share = share_bytes(module)
    assert share < whole / 3
    # what rank 1 keeps (its two moments: 2/3 of its share) plus one parameter's slice and small objects
    assert pm.anon < share + 8 * MIB < whole / 2, (pm.anon / MIB, share / MIB, whole / MIB)
    with PeakMemory() as merged:
        ts = load_training_state(tag)  # the whole state in one process (what every rank held before)
    # (the control: ~the whole state; 0.8 as the heap may already hold some of the memory freed above)
    assert merged.anon > 0.8 * whole, (merged.anon / MIB, whole / MIB)
    assert torch.equal(ts.exp_avg["embedding.weight"], full["embedding.weight"] + 1)


def test_init_from_reads_the_weights_not_the_optimizer_state_beside_them(ckpt):
    _in_a_fresh_process(_init_from_memory, ckpt)


def _init_from_memory(ckpt):
    from megaloop.checkpoint.init_weights import init_state_dict
    tag, full = ckpt
    init_state_dict(tag, run_config(512, 1, 1).model)  # (imports)
    # The source's TP 2 shards are merged per tensor when read (megaloop/checkpoint/lazy_state_dict.py): reading
    # the state dict holds nothing; the files also hold exp_avg and exp_avg_sq (2 x weights), never read.
    with PeakMemory() as pm:
        sd, _ = init_state_dict(tag, run_config(512, 1, 1).model)
    assert pm.anon < 4 * MIB, pm.anon / MIB
    assert all(torch.equal(sd[k], full[k]) for k in full)
    _starts_tp4_rank1_from(tag, full)


def _starts_tp4_rank1_from(source, full):
    """What rank 1 of a TP 4 run starts from with init.from = source: its shards of `full`, holding them plus one
    merged / drawn parameter and its shard at a time, and slack (the old build held the whole model and the
    merged source: 2 x weights)."""
    from benchmarks.bench_load_memory import build_rank
    from megaloop.checkpoint.init_weights import init_state_dict
    from megaloop.parallel.apply_tp import partition_info_for, shard_state_dict
    weights = 4 * sum(v.numel() for k, v in full.items() if k != "head.weight")
    largest = 4 * max(v.numel() for v in full.values())
    cfg = run_config(512, 1, 4)
    sd, _ = init_state_dict(source, cfg.model)
    with PeakMemory() as pm:
        lm = build_rank(cfg, 1, 4, sd)
    want = shard_state_dict(full, partition_info_for(cfg.model, 4), 1, 4)
    for n, t in lm.state_dict().items():
        assert torch.equal(t, want[n]), n
    share = 4 * sum(p.numel() for p in lm.parameters())
    assert pm.anon < min(share + 2 * largest + 2 * MIB, weights), (pm.anon / MIB, share / MIB, weights / MIB)


def test_init_from_a_safetensors_file_reads_one_tensor_at_a_time(ckpt, tmp_path):
    from megaloop.checkpoint import save_plain
    tag, full = ckpt
    path = tmp_path / "model.safetensors"
    save_plain({k: v for k, v in full.items()}, run_config(512, 1, 1), str(path))
    _in_a_fresh_process(_init_from_safetensors_memory, full, str(path))


def _init_from_safetensors_memory(full, path):
    from megaloop.checkpoint.init_weights import init_state_dict
    init_state_dict(path, run_config(512, 1, 1).model)  # (imports)
    with PeakMemory() as pm:
        init_state_dict(path, run_config(512, 1, 1).model)
    assert pm.anon < 4 * MIB, pm.anon / MIB  # (the old reader held every tensor: the weights)
    _starts_tp4_rank1_from(path, full)
