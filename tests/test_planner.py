"""The cluster planner (megaloop/planner, tools/plan.py): per-(stage, TP rank) parameter counts equal
those of the real modules, the stage split is the pipeline's, ZeRO shards the optimizer over DP, and
the tool prints a table and JSON."""
import glob
import importlib.util
import json
import os

import pytest
import torch

from dist_utils import run_distributed
from megaloop.config import ConfigError, load_config
from megaloop.model import build_model
from megaloop.parallel import pipeline as pl
from megaloop.parallel.apply_tp import partition_info_for
from megaloop.planner import make_plan, parse_gpu, stage_params, stage_parts, state_bytes
from megaloop.planner.flops import bubble_fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = sorted(glob.glob(os.path.join(ROOT, "yaml_configs", "tiny", "*.yaml")))
# Shapes the tiny configs do not cover: untied head, prelude / coda layers (the prelude norm, stages
# that split inside the prelude and the coda), Ouro's final norm held by the looped block.
EXTRA = [("plain.yaml", ["model.n_prelude=1", "model.n_coda=2", "model.tie_embeddings=false"]),
         ("parcae.yaml", ["model.n_prelude=2", "model.n_coda=1"]),
         ("ouro.yaml", ["model.n_prelude=2"])]


def _load(path, tp, pp, extra=()):
    try:
        return load_config(path, [f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
                                  "parallel.zero_stage=0", *extra])
    except ConfigError as e:
        if tp > 1 and "parallel.tensor_parallel" in str(e):
            return None  # the config does not allow this TP degree
        raise


def _expected(cfg, tp, pp):
    """Per stage, the elements TP rank r holds, from the real CPU model's parameters and the partition
    rules (shard = full / (tp / replicas) along dim): independent of the planner's meta/TP build."""
    lm = build_model(cfg)
    name_of = {id(p): n for n, p in lm.named_parameters()}
    info = partition_info_for(cfg.model, tp) if tp > 1 else {}
    plan = pl.stage_plan(cfg, pp)
    fwds = pl.local_layers(lm, cfg.loop.loss != "last")
    out, start = [], 0
    for names in plan:
        stage_names = set()
        for f in fwds[start:start + len(names)]:
            module = f if isinstance(f, torch.nn.Module) else f.args[0]  # tied head: partial(head_forward, m)
            stage_names |= {name_of[id(p)] for p in module.parameters()}
        start += len(names)
        n = 0
        for name in stage_names:
            numel = dict(lm.named_parameters())[name].numel()
            part = info.get(name)
            if part is not None and part.sharded:
                numel //= tp // part.replicas
            n += numel
        out.append(n)
    assert start == len(fwds)
    return out, [len(s) for s in plan]


CASES = [(os.path.basename(p), ()) for p in TINY] + EXTRA


@pytest.mark.parametrize("name,extra", CASES, ids=[c[0] + ("+" if c[1] else "") for c in CASES])
def test_stage_params_equal_the_real_modules(name, extra):
    ran = 0
    for tp in (1, 2):
        for pp in (1, 2, 3):
            if pp == 3 and not extra:
                continue
            cfg = _load(os.path.join(ROOT, "yaml_configs", "tiny", name), tp, pp, extra)
            if cfg is None:
                continue
            expected, sizes = _expected(cfg, tp, pp)
            parts = stage_parts(cfg, pp, tp)
            assert [parts[s + 1] - parts[s] for s in range(pp)] == sizes  # the pipeline's own split
            got = stage_params(cfg)
            assert [(r.stage, r.tp_rank) for r in got] == [(s, r) for s in range(pp) for r in range(tp)]
            for r in got:
                assert r.params == expected[r.stage], (name, tp, pp, r.stage, r.tp_rank)
            if pp == 1 and tp == 1:
                assert got[0].params == build_model(cfg).num_params()
            ran += 1
    assert ran >= 2


def test_tied_embedding_is_counted_on_the_first_and_last_stage():
    cfg = _load(os.path.join(ROOT, "yaml_configs", "tiny", "plain.yaml"), 1, 2)
    assert cfg.model.tie_embeddings
    rows = stage_params(cfg)
    emb = cfg.model.padded_vocab_size * cfg.model.d_model
    assert rows[0].by_layer["embedding"] == emb and rows[-1].by_layer["head"] == emb
    assert sum(r.params for r in rows) == build_model(cfg).num_params() + emb


def _real_tp_counts(rank, world, cases):
    """On a real 2-rank TP group: apply_tensor_parallel to a CPU model, count each pipeline stage's
    parameters from the sharded modules."""
    import torch.distributed as dist
    from megaloop.parallel.apply_tp import apply_tensor_parallel

    out = []
    for path, pp, extra in cases:
        cfg = load_config(path, ["parallel.tensor_parallel=2", f"parallel.pipeline_parallel={pp}", *extra])
        torch.manual_seed(0)
        lm = apply_tensor_parallel(build_model(cfg), dist.group.WORLD)
        fwds = pl.local_layers(lm, cfg.loop.loss != "last")
        counts, start = [], 0
        for names in pl.stage_plan(cfg, pp):
            seen = {}
            for f in fwds[start:start + len(names)]:
                module = f if isinstance(f, torch.nn.Module) else f.args[0]
                seen.update({id(p): p.numel() for p in module.parameters()})
            start += len(names)
            counts.append(sum(seen.values()))
        out.append(counts)
    return out


def test_stage_params_equal_a_real_two_rank_tensor_parallel_model():
    cases = [(os.path.join(ROOT, "yaml_configs", "tiny", "lt2_hybrid.yaml"), 2, ()),
             (os.path.join(ROOT, "yaml_configs", "tiny", "plain.yaml"), 2,
              ("model.n_prelude=1", "model.n_coda=1", "model.tie_embeddings=false"))]
    real = run_distributed(_real_tp_counts, world_size=2, args=(cases,), timeout=180)
    for i, (path, pp, extra) in enumerate(cases):
        cfg = load_config(path, ["parallel.tensor_parallel=2", f"parallel.pipeline_parallel={pp}", *extra])
        got = stage_params(cfg)
        for r in got:
            assert r.params == real[r.tp_rank][i][r.stage], (path, r.stage, r.tp_rank)


def test_zero_shards_over_dp():
    P, dp = 1_000_003, 8
    shard = -(-P // dp)
    z0, z1, z2, z3 = (state_bytes(P, "fp32", zero_stage=z, dp=dp) for z in range(4))
    assert (z0.weights, z0.grads, z0.optimizer) == (4 * P, 4 * P, 8 * P)
    assert (z1.weights, z1.grads, z1.optimizer) == (4 * P, 4 * P, 8 * shard)
    assert (z2.weights, z2.grads, z2.optimizer) == (4 * P, 4 * shard, 8 * shard)
    assert (z3.weights, z3.grads, z3.optimizer) == (4 * shard, 4 * shard, 8 * shard)
    assert state_bytes(P, "bf16", "autocast").to_dict() == z0.to_dict()
    mw = state_bytes(P, "bf16", "master_weights", zero_stage=1, dp=dp)
    assert (mw.weights, mw.grads, mw.master, mw.grad_accum, mw.optimizer) == (2 * P, 2 * P, 4 * shard, 4 * P, 8 * shard)
    # DeepSpeed's bf16 engine at ZeRO 0 (BF16_Optimizer) already shards the master copy and the moments.
    assert state_bytes(P, "bf16", "master_weights", zero_stage=0, dp=dp).optimizer == 8 * shard
    assert state_bytes(P, "fp32", zero_stage=1, dp=1).total == 16 * P


def test_plan_throughput_arithmetic():
    cfg = load_config(os.path.join(ROOT, "yaml_configs", "flt_350m_8gpu.yaml"))
    plan = make_plan(cfg, world=16, gpu=parse_gpu("a100"), mfu=0.5)
    assert plan["dp"] == 16 and plan["tokens_per_step"] == 8 * 4 * 16 * 2048
    flops = plan["tokens_per_step"] * plan["train_flops_per_token"]
    assert plan["step_time_s"] == pytest.approx(flops / (16 * 312e12 * 0.5))
    assert sum(plan["stage_model_flops_per_token"]) == pytest.approx(plan["train_flops_per_token"])
    assert plan["ranks"][0]["memory_bytes"]["optimizer"] == 8 * -(-plan["total_params"] // 16)
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15) and bubble_fraction(1, 4) == 0
    assert parse_gpu("X:1e15:96:3e12").mem_gib == 96
    with pytest.raises(ValueError):
        parse_gpu("h300")
    with pytest.raises(ValueError):
        make_plan(load_config(os.path.join(ROOT, "yaml_configs", "flt_350m_8gpu.yaml"),
                              ["parallel.tensor_parallel=2"]), world=3)


def _tool():
    spec = importlib.util.spec_from_file_location("plan_tool", os.path.join(ROOT, "tools", "plan.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_prints_a_table_and_json(capsys):
    tool = _tool()
    cfg = os.path.join(ROOT, "yaml_configs", "flt_350m_8gpu.yaml")
    assert tool.main(["--config", cfg, "--world", "8", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "TP 1 x PP 1 x DP 8" in out and "not estimated yet" in out and "tokens/s per GPU" in out
    assert tool.main(["--config", cfg, "--nodes", "2", "--gpus-per-node", "8", "--gpu", "h100", "--json",
                      "parallel.pipeline_parallel=2", "parallel.tensor_parallel=2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["world"], plan["tp"], plan["pp"], plan["dp"]) == (16, 2, 2, 4)
    assert len(plan["ranks"]) == 4 and plan["activations"] == "not estimated yet"
    assert tool.main(["--config", cfg, "--world", "6", "parallel.tensor_parallel=4"]) == 2
    assert "world size 6" in capsys.readouterr().err
