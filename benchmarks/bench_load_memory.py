"""Host memory of one rank while it loads a checkpoint for a new layout (resume) or for init.from.

A ZeRO 0 training checkpoint saved on TP = 2 (fp32 weights + AdamW exp_avg / exp_avg_sq, written in
DeepSpeed's file layout by `write_zero0_checkpoint`) is loaded by every rank of TP = 4 (resume on another
layout: megaloop.checkpoint.relayout.load_training_any_layout into a stand-in engine that holds the rank's
TP-sharded module and a torch AdamW, as a ZeRO 0 DeepSpeed engine does), by `load_training_state` (the
whole state merged in one process: what every rank built before the sharded read), and as init.from's
state dict (megaloop.checkpoint.init_weights.init_state_dict). Each in a fresh process.

Reported per load: the process's private (anonymous) memory growth at its peak, sampled every 2 ms from
/proc/self/status RssAnon, and the peak resident set (VmHWM after clearing it: private memory plus the
file-backed pages of the memory-mapped checkpoint that were read, which are page cache shared by the
node's ranks and reclaimable), both above the process's RSS before the load (the engine / model already
built), and the checkpoint's total size and the rank's share of it (its slices of weights + both moments).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/bench_load_memory.py [--d 1024 --layers 2]

Measured on the 2-core CPU machine, 2026-12-07 (d 1024, 8 heads / 2 kv heads, n_loop 2: 22.5 M parameters;
"before" = the same script run on main before the sharded read, copied beside main's megaloop/; the build and
init.from-onto-a-rank rows were added with the meta-device build, their "before" is the whole build):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/bench_load_memory.py --workdir /tmp/blm_big
    checkpoint: TP 2, ZeRO 0, 259 MiB (weights + exp_avg + exp_avg_sq, fp32)
                                     rank share   peak private MiB     peak RSS MiB
    load                                    MiB      now    before      now  before
    resume TP 2 -> 4, rank 1                 67       67       646      158     649
    resume TP 2 -> 1                        257      258       647      517     650
    whole state merged (load_training_state)  -      257       646      520     653
    init.from state dict                      -        3       259      136     395
    init.from -> TP 4 rank 1                 22       58     ~186*      152       -
    build: whole model (before)               -      100         -      103       -
    build: TP 4 rank 1 (meta)                22       33       100       39     103

    (* the merged TP 2 source, 86 MiB, plus the whole build, 100 MiB)

A resume's growth is the rank's AdamW moments (kept: 2/3 of its share) plus one parameter's slices and
allocator slack; before, every rank held the files whole and the merged whole state (~2.5x the state).
init.from's state dict merges nothing when it is read (megaloop/checkpoint/lazy_state_dict.py: per tensor, when
asked) and never reads the optimizer state in the same files. A rank's build (megaloop/parallel/materialize.py)
holds its own weights (the "rank share" of the build rows: weights only) plus one buffer of the largest
parameter's size that every full value is drawn into (here an 11 MiB MLP matrix); from init.from's TP 2 source
the merged values are new tensors, one at a time, and the heap keeps some of them (58 MiB). Peak RSS adds the mapped pages read (page cache: shared by a node's
ranks, reclaimable).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MIB = 1 << 20


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """with PeakMemory() as pm: ...  ->  pm.anon (peak private memory growth, bytes, sampled every 2 ms)
    and pm.rss (peak resident set growth: VmHWM after resetting it, file-backed mapped pages included)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.anon, self.rss = interval, 0, 0

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _status("RssAnon"))
            self._stop.wait(self.interval)

    def __enter__(self):
        import gc
        gc.collect()
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self._rss0, self._anon0 = _status("VmRSS"), _status("RssAnon")
        self._peak, self._stop = self._anon0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _status("RssAnon"))
        self.anon, self.rss = self._peak - self._anon0, _status("VmHWM") - self._rss0
        return False


def model_section(d: int, layers: int) -> dict:
    return {"vocab_size": 258, "d_model": d, "n_heads": 8, "n_kv_heads": 2, "max_seq_len": 64, "n_loop": layers,
            "n_prelude": 0, "n_coda": 0, "loops": 2, "arch": "recurrent", "injection": "add"}


def run_config(d: int, layers: int, tp: int, data: str = "unused"):
    from megaloop.config import config_from_dict
    return config_from_dict({"model": model_section(d, layers), "data": {"data_path": [data], "seq_len": 64},
                             "train": {"steps": 10, "micro_batch_size": 1, "output_dir": "unused"},
                             "parallel": {"tensor_parallel": tp}})


def write_zero0_checkpoint(tag_dir, cfg, step: int = 3) -> None:
    """A complete ZeRO 0 tag of `cfg`'s TP degree (PP = 1, DP = 1) in DeepSpeed's layout: per TP rank
    mp_rank_TT_model_states.pt with the module shard, torch AdamW's state_dict (exp_avg = weight + 1,
    exp_avg_sq = weight ** 2, so every value says where it came from) and the client state."""
    import torch

    from megaloop.checkpoint.integrity import checksum_tag
    from megaloop.checkpoint.layout import write_marker
    from megaloop.checkpoint.training_state import _groups
    from megaloop.model import LoopedLM
    from megaloop.parallel.apply_tp import partition_info_for, shard_state_dict

    tp, tag_dir = cfg.parallel.tensor_parallel, Path(tag_dir)
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lm = LoopedLM(cfg.model)
    full = {k: v.detach() for k, v in lm.state_dict().items()}
    seen, named = set(), []
    for n, p in lm.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            named.append((n, p))
    del lm
    info = partition_info_for(cfg.model, tp) if tp > 1 else {}
    for t in range(tp):
        module = shard_state_dict(full, info, t, tp) if tp > 1 else dict(full)
        state, groups, i = {}, [], 0
        for decay, names in _groups(named):
            groups.append({"params": list(range(i, i + len(names))), "decay": decay, "lr": 1e-3})
            for n in names:
                state[i] = {"step": torch.tensor(float(step)), "exp_avg": module[n] + 1, "exp_avg_sq": module[n] ** 2}
                i += 1
        torch.save({"module": module, "optimizer": {"state": state, "param_groups": groups}, "config": cfg.to_dict(),
                    "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": tp}, "dp_world_size": 1,
                    "ds_config": {"zero_optimization": {"stage": 0}}, "step": step, "global_steps": step,
                    "lr_scheduler": {}}, tag_dir / f"mp_rank_{t:02d}_model_states.pt")
        del module, state
    write_marker(tag_dir, step, step, checksum_tag(tag_dir, 0, 1))


def stand_in_engine(cfg, tp_rank: int, tp: int):
    """(te, state): what load_training_any_layout needs of a ZeRO 0 DeepSpeed engine on TP rank tp_rank of tp:
    the rank's TP-sharded LoopedLM (uninitialised memory) and a torch AdamW over it."""
    import torch

    from megaloop.model import LoopedLM
    from megaloop.parallel.apply_tp import apply_tensor_parallel
    from megaloop.parallel.comm import TPComm

    with torch.device("meta"):
        lm = LoopedLM(cfg.model)
    if tp > 1:
        apply_tensor_parallel(lm, TPComm(None, tp_rank, tp), check_replicas=False, force=True)
    lm = lm.to_empty(device="cpu")
    if cfg.model.tie_embeddings:  # (to_empty gives each module its own tensor)
        lm.head.weight = lm.embedding.weight
    engine = SimpleNamespace(module=lm, optimizer=torch.optim.AdamW(lm.parameters(), lr=1e-3), lr_scheduler=None,
                             global_steps=0, global_samples=0, skipped_steps=0, train_batch_size=lambda: 1)
    state = SimpleNamespace(tp_size=tp, tp_rank=tp_rank, dp_rank=0, pp_size=1, dp_size=1)
    return SimpleNamespace(engine=engine), state


def build_rank(cfg, tp_rank: int, tp: int, source=None):
    """What the trainer builds on TP rank tp_rank of tp (megaloop.training.engine): the LoopedLM on the meta
    device, tensor parallelism applied, the rank's parameters materialised on the host (initial values, or
    `source`: init.from's state dict)."""
    import torch

    from megaloop.model import build_model
    from megaloop.parallel.apply_tp import apply_tensor_parallel
    from megaloop.parallel.comm import TPComm
    from megaloop.parallel.materialize import materialize_all

    torch.manual_seed(0)
    with torch.device("meta"):
        lm = build_model(cfg)
    if tp > 1:
        apply_tensor_parallel(lm, TPComm(None, tp_rank, tp), check_replicas=False, force=True)
    materialize_all(lm, "cpu", source)
    return lm


def share_bytes(module) -> int:
    """The rank's share of a training state: its weights and both AdamW moments, fp32."""
    return 3 * 4 * sum(p.numel() for p in module.parameters())


def measure(kind: str, tag: str, d: int, layers: int, tp_new: int, tp_rank: int) -> dict:
    """One load in this process: kind 'resume' | 'merged' | 'init_from'."""
    import torch
    torch.set_num_threads(1)
    import deepspeed.runtime.base_optimizer  # noqa: F401 - imports outside the measured load
    import deepspeed.utils  # noqa: F401
    import megaloop.checkpoint.init_weights  # noqa: F401
    import megaloop.checkpoint.relayout  # noqa: F401
    import megaloop.model  # noqa: F401
    import megaloop.parallel.apply_tp  # noqa: F401
    import megaloop.parallel.pipeline  # noqa: F401
    cfg = run_config(d, layers, tp_new)
    out = {"kind": kind}
    if kind == "resume":
        from megaloop.checkpoint.relayout import load_training_any_layout
        te, state = stand_in_engine(cfg, tp_rank, tp_new)
        out["share"] = share_bytes(te.engine.module)
        with PeakMemory() as pm:
            load_training_any_layout(te, tag, state, cfg)
    elif kind == "merged":
        from megaloop.checkpoint.training_state import load_training_state
        with PeakMemory() as pm:
            held = load_training_state(tag)
        assert held.adam_step == 3
    elif kind == "build_whole":
        from megaloop.model import build_model
        with PeakMemory() as pm:
            lm = build_model(cfg)
    elif kind == "build_rank":
        with PeakMemory() as pm:
            lm = build_rank(cfg, tp_rank, tp_new)
        out["share"] = share_bytes(lm) // 3  # (its weights only)
    else:
        from megaloop.checkpoint.init_weights import init_state_dict
        with PeakMemory() as pm:
            sd, _ = init_state_dict(tag, cfg.model)
            if kind == "init_from_rank":
                lm = build_rank(cfg, tp_rank, tp_new, sd)
                out["share"] = share_bytes(lm) // 3  # (its weights only)
        del sd
    out.update(anon=pm.anon, rss=pm.rss)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/bench_load_memory")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "TP_NEW", "TP_RANK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    tag = os.path.join(a.workdir, "step_00000003")
    if a.one:
        print(json.dumps(measure(a.one[0], tag, a.d, a.layers, int(a.one[1]), int(a.one[2]))))
        return
    if not os.path.isdir(tag):
        write_zero0_checkpoint(tag, run_config(a.d, a.layers, 2))
    size = sum(f.stat().st_size for f in Path(tag).glob("*.pt"))
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")}
    rows = [("resume TP 2 -> 4, rank 1", "resume", 4, 1), ("resume TP 2 -> 1", "resume", 1, 0),
            ("whole state merged", "merged", 1, 0), ("init.from state dict", "init_from", 1, 0),
            ("init.from -> TP 4 rank 1", "init_from_rank", 4, 1),
            ("build: whole model (before)", "build_whole", 1, 0), ("build: TP 4 rank 1 (meta)", "build_rank", 4, 1)]
    print(f"checkpoint: TP 2, ZeRO 0, {size / MIB:.0f} MiB (weights + exp_avg + exp_avg_sq, fp32)")
    print(f"{'load':32s} {'rank share MiB':>14s} {'peak private MiB':>17s} {'peak RSS MiB':>13s}")
    for label, kind, tp_new, rank in rows:
        p = subprocess.run([sys.executable, __file__, "--d", str(a.d), "--layers", str(a.layers), "--workdir",
                            a.workdir, "--one", kind, str(tp_new), str(rank)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        share = f"{r['share'] / MIB:.0f}" if "share" in r else "-"
        print(f"{label:32s} {share:>14s} {r['anon'] / MIB:17.0f} {r['rss'] / MIB:13.0f}")


if __name__ == "__main__":
    main()
