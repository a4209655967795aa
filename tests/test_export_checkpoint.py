"""Export straight from a DeepSpeed training checkpoint (issue 6): train a tiny model for a few steps
with megaloop's Trainer on spawned gloo ranks, then read the checkpoint offline and export it.

Reference weights are independent of the checkpoint files: at the end of the run every rank gathers
its live parameters (pipeline stage layers, tensor-parallel shards all-gathered over the TP group,
ZeRO-3 partitions gathered by DeepSpeed) and rank 0 returns the full state dict. The distributed
engine also evaluates a fixed probe batch at several loop counts; the one-process LoopedLM built from
the merged checkpoint must reproduce those losses.

Layouts: TP 2 x PP 2 (4 ranks; prelude + coda layers, QK-norm and one kv head shared by both TP
ranks), TP 2 with PP 1 (one mp_rank file per TP rank), PP 2 untied (the head has its own layer file)
and DP 2 with ZeRO 2 and ZeRO 3.
"""
import os
import shutil

import pytest
import torch

from dist_utils import run_distributed
from test_train_support import make_byte_dataset, tiny_config, write_config

STEPS = 3
PROBE_LOOPS = (1, 2, 4)
# recurrent + add injection with a larger init: the logits depend on the loop count by ~1 (at
# init_std 0.02 by ~1e-3), so a loop count that does not reach the model would show far above 1e-5.
MODEL = {"arch": "recurrent", "injection": "add", "init_std": 0.15, "n_prelude": 1, "n_coda": 1, "qk_norm": True,
         "n_kv_heads": 1}
LAYOUTS = {
    "tp2_pp2": (4, {"tensor_parallel": 2, "pipeline_parallel": 2, "zero_stage": 1}, MODEL),
    "tp2_zero1": (2, {"tensor_parallel": 2, "zero_stage": 1}, MODEL),
    "pp2_untied": (2, {"pipeline_parallel": 2, "zero_stage": 0}, dict(MODEL, tie_embeddings=False)),
    "dp2_zero2": (2, {"zero_stage": 2}, MODEL),
    "dp2_zero3": (2, {"zero_stage": 3}, MODEL),
}


def _probe_batch(cfg):
    g = torch.Generator().manual_seed(1234)
    mb, T = cfg.train.micro_batch_size, cfg.data.seq_len
    sample = torch.randint(0, 256, (mb, T + 1), generator=g)
    return sample[:, :-1].contiguous(), sample[:, 1:].contiguous()


def _train_and_gather(rank, world, cfg_path):
    """One rank: train, then (collectively) gather the live full weights and evaluate the probe batch."""
    import contextlib

    import torch.distributed as tdist

    from megaloop.config import load_config
    from megaloop.parallel.tensor_parallel import partition_of
    from megaloop.training.trainer import Trainer

    cfg = load_config(cfg_path)
    tr = Trainer(cfg)
    result = tr.run()
    st = tr.state
    if tr.pp > 1:
        mods = [f for f in tr.module.forward_funcs if isinstance(f, torch.nn.Module)]
        mods += list(tr.module.tied_modules.values())
    else:
        mods = [tr.module]
    gather_ctx = contextlib.nullcontext()
    if cfg.parallel.zero_stage == 3:
        import deepspeed
        gather_ctx = deepspeed.zero.GatheredParameters(list(tr.module.parameters()), modifier_rank=None)
    local = {}
    with gather_ctx:
        params = {}
        for m in mods:
            for k, p in m.state_dict(keep_vars=True).items():
                params.setdefault(k, p)
        for k, p in params.items():  # same keys, same order on every TP rank of a stage
            part = partition_of(p)
            t = p.detach().clone().contiguous()
            if part.sharded and st.tp_size > 1:
                shards = [torch.empty_like(t) for _ in range(st.tp_size)]
                tdist.all_gather(shards, t, group=st.tp_group)
                t = torch.cat(shards[::part.replicas], dim=part.dim)
            local[k] = t
    gathered = [None] * world if rank == 0 else None
    tdist.gather_object(local if st.dp_rank == 0 else {}, gathered, dst=0)

    tokens, labels = _probe_batch(cfg)
    losses = {}
    for R in PROBE_LOOPS:
        if tr.pp > 1:
            batch = ((tokens, torch.tensor([R, R], dtype=torch.long)), labels)
            losses[R] = float(tr.engine.eval_batch(iter([batch]), num_micro_batches=1))
        else:
            tr.engine.eval()
            with torch.no_grad():
                losses[R] = float(tr.engine(tokens, labels=labels, loops=R).loss)
    if rank != 0:
        return None
    full = {}
    for part in gathered:
        for k, v in part.items():
            full.setdefault(k, v)
    return {"state_dict": full, "losses": losses, "train": result.get("losses")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_export")
    data = make_byte_dataset(str(root / "data" / "corpus"), max_bytes=150_000)
    cache = {}

    def run(name):
        if name not in cache:
            world, parallel, model = LAYOUTS[name]
            out_dir = root / name
            cfg = tiny_config(data, str(out_dir), model=model, parallel=parallel,
                              train={"steps": STEPS, "log_interval": STEPS})
            path = write_config(str(root / f"{name}.yaml"), cfg)
            res = run_distributed(_train_and_gather, world_size=world, args=(path,), timeout=150)[0]
            cache[name] = (out_dir, res, data)
        return cache[name]

    return run


def _reference(sd, cfg):
    from megaloop.model import build_model

    model = build_model(cfg).eval()
    model.load_state_dict(sd, strict=not cfg.model.tie_embeddings)
    return model


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merged_checkpoint_equals_the_live_training_weights(runs, layout):
    from megaloop.export import load_checkpoint

    out_dir, res, _ = runs(layout)
    sd, cfg, tok = load_checkpoint(out_dir)  # the run directory: latest -> step_00000003
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.zero_stage) == \
        (LAYOUTS[layout][1].get("tensor_parallel", 1), LAYOUTS[layout][1].get("pipeline_parallel", 1),
         LAYOUTS[layout][1]["zero_stage"])
    assert tok.tokenizer_type == "byte" and cfg.train.steps == STEPS
    live = res["state_dict"]
    assert set(sd) == set(live)
    for k in live:
        assert sd[k].dtype == torch.float32 and sd[k].shape == live[k].shape, k
        assert torch.equal(sd[k], live[k]), f"{k}: differs by {(sd[k] - live[k]).abs().max()}"
    # The one-process model reproduces the distributed engine's loss on the probe batch.
    model = _reference(sd, cfg)
    tokens, labels = _probe_batch(cfg)
    with torch.no_grad():
        for R, loss in res["losses"].items():
            assert float(model(tokens, labels=labels, loops=R).loss) == pytest.approx(loss, rel=1e-5, abs=1e-6), R
    # the probe losses depend on R (the loop count really reaches the model)
    assert max(res["losses"].values()) - min(res["losses"].values()) > 1e-3, res["losses"]


@pytest.mark.parametrize("layout", ["tp2_pp2", "dp2_zero3"])
def test_export_tool_from_deepspeed_checkpoint(runs, layout, tmp_path, capsys):
    import json

    from megaloop.export import load_exported, load_merged_state_dict
    from megaloop.checkpoint import load_deepspeed_checkpoint
    from tools.export_hf import main

    out_dir, res, _ = runs(layout)
    ckpt = out_dir / "checkpoints"
    assert main(["--checkpoint", str(ckpt), "--step", str(STEPS), "--output", str(tmp_path / "hf")]) == 0, \
        capsys.readouterr().err
    sd, info = load_deepspeed_checkpoint(ckpt / f"step_{STEPS:08d}")
    assert info.step == STEPS and info.tp == LAYOUTS[layout][1].get("tensor_parallel", 1)
    model = _reference(sd, info.config)
    hf = load_exported(tmp_path / "hf").float()
    cfg_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg_json["num_loops"] == info.config.model.loops
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
    logits = {}
    with torch.no_grad():
        for R in (1, 2, 3, 6):
            a = model(ids, loops=R).logits
            b = hf(ids, num_loops=R, use_cache=False).logits.float()
            assert (a - b).abs().max().item() <= 1e-5, R
            logits[R] = a
    assert (logits[6] - logits[1]).abs().max().item() > 0.1  # the comparison sees the loop count
    # the merged weights are what got exported (and what load_merged_state_dict returns)
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    merged = load_merged_state_dict(out_dir)
    for k, v in stored.items():
        assert torch.equal(v, merged[k]), k


def _copy(out_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(out_dir / "checkpoints", dst / "checkpoints")
    return dst / "checkpoints", dst / "checkpoints" / f"step_{STEPS:08d}"


def _fails(tmp_path, capsys, ckpt, *must, step=None):
    from tools.export_hf import main

    out = tmp_path / "exports" / "hf"
    argv = ["--checkpoint", str(ckpt), "--output", str(out)] + (["--step", str(step)] if step else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    for m in must:
        assert m in err, err
    assert not out.exists()
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())  # no temp folder
    return err


def test_damaged_pipeline_checkpoint_fails_naming_the_file(runs, tmp_path, capsys):
    out_dir, _, _ = runs("tp2_pp2")
    root, tag = _copy(out_dir, tmp_path)
    # a TP rank's file of the looped block's pipeline layer (layer 3: embedding, embed norm, prelude, loop)
    (tag / "layer_03-model_01-model_states.pt").unlink()
    _fails(tmp_path, capsys, root, "layer_03-model_01-model_states.pt", "pipeline layer 3 'loop'",
           "tensor-parallel rank 1 of 2")
    # a shard of the wrong shape (another TP degree's wq)
    root, tag = _copy(out_dir, tmp_path / "b")
    f = tag / "layer_02-model_00-model_states.pt"
    sd = torch.load(f, weights_only=False)
    sd["prelude.0.mixer.wq.weight"] = torch.zeros(8, sd["prelude.0.mixer.wq.weight"].shape[1])
    torch.save(sd, f)
    _fails(tmp_path / "b", capsys, tag, "layer_02-model_00-model_states.pt", "prelude.0.mixer.wq.weight",
           "shape (8, 32)")
    # a model-parallel rank's states file
    root, tag = _copy(out_dir, tmp_path / "c")
    (tag / "mp_rank_03_model_states.pt").unlink()
    _fails(tmp_path / "c", capsys, root, "mp_rank_03_model_states.pt")
    # an incomplete checkpoint (interrupted before the marker): refused by tag, by step and by root
    root, tag = _copy(out_dir, tmp_path / "d")
    (tag / "megaloop_complete.json").unlink()
    _fails(tmp_path / "d", capsys, tag, "incomplete", "megaloop_complete.json")
    _fails(tmp_path / "d", capsys, root, "incomplete", step=STEPS)
    _fails(tmp_path / "d", capsys, root.parent, "no complete checkpoint")
    # a step that does not exist
    _fails(tmp_path, capsys, out_dir, "no step 7", f"steps there: {STEPS}", step=7)


def test_zero3_weights_are_gathered_per_tensor_as_deepspeed_lays_them_out(runs):
    # megaloop reads a ZeRO-3 checkpoint one tensor at a time from the memory-mapped files (init.from, export);
    # DeepSpeed's zero_to_fp32 reads every rank's files whole: both give the same weights.
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from megaloop.checkpoint import load
    from megaloop.checkpoint.lazy_state_dict import Zero3StateDict
    out_dir, _, _ = runs("dp2_zero3")
    tag = out_dir / "checkpoints" / "step_00000003"
    sd, _ = load(tag)
    assert isinstance(sd, Zero3StateDict)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ref = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


def test_damaged_zero_checkpoints_fail_naming_the_file(runs, tmp_path, capsys):
    out_dir, _, _ = runs("dp2_zero2")
    root, tag = _copy(out_dir, tmp_path)
    (tag / "mp_rank_00_model_states.pt").unlink()
    _fails(tmp_path, capsys, root, "no DeepSpeed model states")
    out_dir, _, _ = runs("dp2_zero3")
    root, tag = _copy(out_dir, tmp_path / "z3")
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _fails(tmp_path / "z3", capsys, root, "zero_pp_rank_1_mp_rank_00_optim_states.pt")


def test_generate_and_eval_loops_read_deepspeed_checkpoints(runs, tmp_path, capsys):
    from megaloop.data.tokenizer import ByteTokenizer
    from megaloop.export import load_checkpoint
    from megaloop.generation import generate, wrap_megaloop
    from megaloop.evaluation.inputs import load_eval_tokens, windows
    from megaloop.evaluation.loops import evaluate
    from tools import eval_loops
    from tools.generate import main as generate_main

    out_dir, _, data = runs("tp2_pp2")
    sd, cfg, _ = load_checkpoint(out_dir)
    ref = wrap_megaloop(_reference(sd, cfg), ByteTokenizer())

    assert generate_main(["--model", str(out_dir), "--prompt", "def ", "--max-new-tokens", "6", "--loops", "3",
                          "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    want = generate(ref, ref.encode("def "), max_new_tokens=6, loops=3, temperature=0)
    assert text == "def " + ref.decode(want.new_tokens[0].tolist()) + "\n"

    assert eval_loops.main(["--model", str(out_dir / "checkpoints"), "--step", str(STEPS), "--data", data,
                            "--split", "95,5,0", "--max-windows", "4", "--loops", "1,3", "--exits",
                            "--out-dir", str(tmp_path / "ev")]) == 0
    rows = (tmp_path / "ev" / "eval_loops.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    lm = load_eval_tokens(ref, data, None, "95,5,0", max_tokens=4 * cfg.model.max_seq_len + 1)
    batches = windows(lm, cfg.model.max_seq_len, 4, 8)
    nll3 = float(rows[2].split(",")[4])
    assert nll3 == pytest.approx(evaluate(ref, batches, 3)[0], rel=1e-6)

    # a damaged checkpoint: a clear message, no traceback
    root, tag = _copy(out_dir, tmp_path)
    (tag / "layer_04-model_00-model_states.pt").unlink()
    assert generate_main(["--model", str(root), "--max-new-tokens", "2"]) == 2
    assert "layer_04-model_00-model_states.pt" in capsys.readouterr().err
    assert eval_loops.main(["--model", str(root), "--data", data, "--out-dir", str(tmp_path / "ev2")]) == 2
    assert "layer_04-model_00-model_states.pt" in capsys.readouterr().err and not (tmp_path / "ev2").exists()
