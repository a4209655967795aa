"""The pipeline split of a LoopedLM, in one process (no DeepSpeed engine): the pipeline layers run in
sequence reproduce LoopedLM's loss exactly, the looped block is one indivisible layer, and stages are
balanced by FLOPs with the looped block weighted by its loop count."""
import pytest
import torch

from megaloop.config import load_config
from megaloop.model import build_model
from megaloop.parallel import pipeline as pl
from megaloop.parallel import stage_split


def _layers(cfg, lm):
    collect = cfg.loop.loss != "last"
    layers = pl.local_layers(lm, collect)
    loss = pl.LoopLoss(cfg.loop.loss, lm.token_loss_fn, cfg.loop.exit_entropy_weight, collect)
    return layers, loss


CASES = [
    ["model.arch=flt"],
    ["model.n_prelude=1", "model.n_coda=1", "model.injection=parcae", "model.normalization=inner",
     "model.state_init=zeros", "model.tie_embeddings=false"],
    ["model.norm_style=sandwich", "model.share_outer_final_norm=true", "model.exit_gate=true",
     "loop.loss=exit_weighted"],
    ["model.arch=flt", "loop.loss=mean", "model.logit_softcap=30"],
    ["model.injection=add", "model.loop_residual_gate=true", "loop.loss=last_third"],
]


@pytest.mark.parametrize("overrides", CASES)
@pytest.mark.parametrize("ckpt", ["none", "loop"])
def test_pipeline_layers_in_sequence_equal_the_model(overrides, ckpt):
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.vocab_size=100", "model.max_seq_len=16",
                             "data.seq_len=16", *overrides])
    torch.manual_seed(0)
    lm = build_model(cfg)
    lm.block.activation_checkpointing = ckpt
    tokens = torch.randint(0, 100, (2, 16))
    labels = torch.randint(0, 100, (2, 16))
    R, G = 3, 2
    ref = lm(tokens, labels=labels, loops=R, grad_loops=G).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()

    layers, loss_fn = _layers(cfg, lm)
    x = (tokens, torch.tensor([R, G]))
    for layer in layers:
        x = layer(x)
    loss = loss_fn(x, labels)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6), (loss.item(), ref.item())
    loss.backward()
    for n, p in lm.named_parameters():
        if n in ref_grads:
            assert torch.allclose(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7), n


def test_stage_state_dicts_use_the_model_names():
    cfg = load_config(None, ["model.n_prelude=1", "model.n_coda=2", "model.tie_embeddings=false"])
    lm = build_model(cfg)
    layers, _ = _layers(cfg, lm)

    class FakeModule:
        forward_funcs = layers
        tied_modules = {}
    sd = pl.full_state_dict_of_stage(FakeModule())
    assert set(sd) == set(lm.state_dict())


def test_balanced_partition_keeps_stages_non_empty_and_minimises_the_heaviest():
    assert stage_split.balanced_partition([0, 0, 100, 1, 10], 2) == [0, 3, 5]
    assert stage_split.balanced_partition([1, 1, 1, 1], 4) == [0, 1, 2, 3, 4]
    parts = stage_split.balanced_partition([0.001, 0.001, 50, 0.001, 3], 3)
    assert all(b > a for a, b in zip(parts, parts[1:]))
    with pytest.raises(ValueError):
        stage_split.balanced_partition([1, 2], 3)


def test_looped_block_is_one_layer_weighted_by_its_loop_count():
    from megaloop.model.flops import pipeline_layer_weights
    cfg = load_config(None, ["model.n_prelude=2", "model.n_coda=2"])
    names = pl.layer_names(cfg.model)
    assert names.count("loop") == 1
    w4 = dict(zip(names, pipeline_layer_weights(cfg, names, 4, 4)))
    w8 = dict(zip(names, pipeline_layer_weights(cfg, names, 8, 8)))
    assert w8["loop"] == pytest.approx(2 * w4["loop"])
    # n_loop layers x R passes: 2 layers x 4 loops weigh like 8 prelude layers
    assert w4["loop"] == pytest.approx(cfg.model.n_loop * 4 * w4["prelude"])
    # with many loops the block gets a stage of its own; with 4 stages the plan never splits it
    plan = stage_split.stage_plan(load_config(None, ["model.n_prelude=2", "model.n_coda=2", "loop.mean=12",
                                            "parallel.pipeline_parallel=3"]), 3)
    assert ["loop"] in plan
    # 'parameters' would weigh the block like n_loop layers and the embedding by its size: different plan
    assert sum(len(s) for s in plan) == len(names)


@pytest.mark.parametrize("tied", [True, False])
def test_layer_state_keys_cover_the_model_once_in_layer_order(tied):
    # What the checkpoint reader expects in each layer_LL-model_TT-model_states.pt file.
    cfg = load_config(None, ["model.n_prelude=2", "model.n_coda=1", f"model.tie_embeddings={str(tied).lower()}",
                             "model.exit_gate=true"])
    keys = pl.layer_state_keys(cfg.model)
    assert [n for n, _ in keys] == pl.layer_names(cfg.model) == [layer.name for layer in pl.pipeline_layers(cfg.model)]
    head_keys = dict(keys)["head"]
    assert (head_keys is None) == tied  # the tied head reuses the embedding module: no file of its own
    flat = [k for _, ks in keys if ks for k in ks]
    assert len(flat) == len(set(flat)) and set(flat) == set(build_model(cfg).state_dict())
    assert keys[0][1] == (["embedding.weight", "head.weight"] if tied else ["embedding.weight"])
