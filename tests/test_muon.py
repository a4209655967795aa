"""train.optimizer=muon: Muon for the layers' 2-D matrices, AdamW for the rest, as one optimizer object.

Unit checks against torch.optim.Muon + torch.optim.AdamW built by hand; then the trainer: two pipeline stages
give the one-stage losses, and a resumed run continues exactly where the uninterrupted one went.
"""
import copy
from types import SimpleNamespace

import pytest
import torch

from test_train_support import make_byte_dataset, run_ranks, tiny_config, train_losses, write_config

from megaloop.config import ConfigError
from megaloop.reproduce.runner import base_config, resolved_config


def _cfg(**train):
    return resolved_config(base_config(
        model={"vocab_size": 64, "d_model": 32, "n_heads": 2, "n_loop": 1, "n_prelude": 1, "n_coda": 1,
               "max_seq_len": 16, "loops": 2, "tie_embeddings": False},
        data={"tokenizer_type": "byte", "seq_len": 16},
        train={"optimizer": "muon", "lr": 1e-3, "muon_lr": 0.02, "steps": 10, "warmup_steps": 0, **train}))


def _model(cfg):
    from megaloop.model import build_model
    torch.manual_seed(0)
    return build_model(cfg)


def _step(model, opt, x):
    loss = model(x, labels=x).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def test_muon_takes_the_layer_matrices_and_adamw_the_embeddings_head_and_vectors():
    from megaloop.training.optim import build_optimizer
    cfg = _cfg()
    model = _model(cfg)
    opt = build_optimizer(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert muon and adamw and not muon & adamw and muon | adamw == set(names.values())
    assert all(model.get_parameter(n).dim() == 2 for n in muon)
    assert {"embedding.weight", "head.weight"} <= adamw
    assert any(n.startswith("prelude.") for n in muon) and any(n.startswith("block.") for n in muon)
    assert any(n.startswith("coda.") for n in muon)
    assert all(model.get_parameter(n).dim() == 1 for n in adamw - {"embedding.weight", "head.weight"})
    assert {g["lr"] for g in opt.param_groups if g["use_muon"]} == {0.02}
    assert {g["lr"] for g in opt.param_groups if not g["use_muon"]} == {1e-3}


def test_one_row_maps_and_no_decay_matrices_stay_on_adamw():
    from megaloop.training.optim import muon_parameter
    w = torch.nn.Parameter(torch.zeros(8, 4))
    marked = torch.nn.Parameter(torch.zeros(8, 4))
    marked.no_weight_decay = True  # (Parcae's B, W_C)
    assert muon_parameter("block.layers.0.mlp.w1.weight", w)
    assert not muon_parameter("exit_gate.weight", torch.nn.Parameter(torch.zeros(1, 4)))  # Ouro's exit gate
    assert not muon_parameter("block.injection.B", marked)
    assert not muon_parameter("value_embeddings.0.weight", w) and not muon_parameter("head.weight", w)
    assert not muon_parameter("block.layers.0.attn_norm.weight", torch.nn.Parameter(torch.zeros(4)))


def test_steps_match_torch_muon_and_adamw_built_by_hand_and_survive_a_state_dict_round_trip():
    from megaloop.training.optim import build_optimizer
    cfg = _cfg(weight_decay=0.1)
    model, ref = _model(cfg), _model(cfg)
    opt = build_optimizer(model, cfg.train)
    ref_params = dict(ref.named_parameters())
    by_name = {id(p): n for n, p in model.named_parameters()}
    ref_opts = []
    for g in opt.param_groups:
        params = [ref_params[by_name[id(p)]] for p in g["params"]]
        if g["use_muon"]:
            ref_opts.append(torch.optim.Muon(params, lr=0.02, momentum=0.95, nesterov=True, adjust_lr_fn="original",
                                             weight_decay=g["weight_decay"]))
        else:
            ref_opts.append(torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                              weight_decay=g["weight_decay"]))

    class Both:
        def zero_grad(self, set_to_none=True):
            for o in ref_opts:
                o.zero_grad(set_to_none=set_to_none)

        def step(self):
            for o in ref_opts:
                o.step()

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(4)]
    for x in batches[:3]:
        assert _step(model, opt, x) == _step(ref, Both(), x)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    # a copy restored from the state dict takes the same next step
    clone = copy.deepcopy(model)
    opt2 = build_optimizer(clone, cfg.train)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert _step(model, opt, batches[3]) == _step(clone, opt2, batches[3])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))
    assert any("momentum_buffer" in s for s in opt2.state.values())


def test_a_non_finite_step_leaves_weights_and_momentum_untouched():
    from megaloop.training.nonfinite import SkipNonFinite
    from megaloop.training.optim import build_optimizer
    cfg = _cfg()
    model = _model(cfg)
    opt = build_optimizer(model, cfg.train)
    clip = SimpleNamespace(last_norm=torch.tensor(1.0))
    hook = SkipNonFinite(clip)
    opt.register_step_pre_hook(hook)
    x = torch.randint(0, 64, (2, 16))
    _step(model, opt, x)
    assert hook.take() is False
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict()["state"])
    model(x, labels=x).loss.backward()
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    clip.last_norm = torch.tensor(float("nan"))
    opt.step()
    assert hook.take() is True and opt.overflow
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = opt.state_dict()["state"]
    assert all(torch.equal(state[i][k], after[i][k]) for i in state for k in state[i])


def test_the_schedule_scales_each_group_from_its_own_peak_and_a_resume_applies_new_peaks():
    from megaloop.training.optim import apply_schedule, build_optimizer, build_scheduler
    cfg = _cfg(warmup_steps=2, lr_schedule="constant")
    model = _model(cfg)
    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train)
    assert sorted({g["lr"] for g in opt.param_groups}) == [5e-4, 0.01]  # step 0 of 2 warm-up steps: half
    cfg2 = _cfg(warmup_steps=2, lr_schedule="constant", muon_lr=0.04, lr=2e-3, muon_momentum=0.9)
    apply_schedule(SimpleNamespace(lr_scheduler=sched, optimizer=opt), cfg2.train)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-3, 0.02]
    assert {g["momentum"] for g in opt.param_groups if g["use_muon"]} == {0.9}


@pytest.mark.parametrize("override, message", [
    ({"parallel": {"tensor_parallel": 2}}, "tensor_parallel=2"),
    ({"parallel": {"zero_stage": 1}}, "zero_stage=1"),
    ({"train": {"precision": "fp16"}}, "precision='fp16'"),
    ({"train": {"precision": "bf16", "bf16_impl": "master_weights"}}, "master_weights"),
    ({"train": {"optimizer": "mu0n"}}, "train.optimizer='mu0n'"),
    ({"train": {"muon_lr": 0.0}}, "train.muon_lr"),
])
def test_layouts_muon_does_not_run_on_are_refused_naming_the_field(override, message):
    cfg = base_config(model={"vocab_size": 64, "d_model": 32, "n_heads": 2, "n_loop": 1, "max_seq_len": 16},
                      data={"tokenizer_type": "byte", "seq_len": 16}, train={"optimizer": "muon"})
    for section, values in override.items():
        cfg[section].update(values)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolved_config(cfg)


def test_a_muon_checkpoint_is_not_moved_to_another_layout():
    from megaloop.checkpoint.relayout import supported_change
    muon, adamw = _cfg(), _cfg(optimizer="adamw")
    assert "train.optimizer=muon" in supported_change(muon, muon, 0, 0)
    assert supported_change(adamw, adamw, 0, 0) is None


# ------------------------------------------------------------------------------------------------
# Through the trainer

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon")
    data = make_byte_dataset(str(root / "data" / "corpus"), max_bytes=100_000)
    train = {"optimizer": "muon", "muon_lr": 0.02, "steps": 6, "log_interval": 1, "lr_schedule": "constant"}

    def run(name, world=1, **over):
        cfg = tiny_config(data, str(root / name), train={**train, **over.pop("train", {})}, **over)
        (path) = write_config(str(root / f"{name}.yaml"), cfg)
        results = run_ranks(world, ["--config", path], timeout=240)
        assert all(rc == 0 for rc, _ in results), results[0][1][-3000:]
        return str(root / name), results[0][1]
    return run


def test_two_pipeline_stages_give_the_one_stage_losses(trained):
    one, text = trained("pp1")
    assert "Muon + AdamW" in text
    from test_train_support import metrics
    assert max(r["lr"] for r in metrics(one) if "loss" in r) == pytest.approx(3e-3)  # train.lr's scale, not Muon's
    two, _ = trained("pp2", world=2, parallel={"pipeline_parallel": 2})
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    assert a[6] < a[1]  # (it learns)


def test_a_resumed_run_continues_the_uninterrupted_one(trained):
    whole, _ = trained("pp1")
    part, _ = trained("resumed", train={"steps": 3, "save_interval": 3})
    part, text = trained("resumed", train={"steps": 6, "save_interval": 3})
    assert "resum" in text.lower()
    a, b = train_losses(whole), train_losses(part)
    assert all(abs(a[s] - b[s]) < 1e-5 for s in (4, 5, 6)), (a, b)


def test_flt_stability_trains_with_the_reference_optimizer_and_schedule(tmp_path):
    """The claim's protocol (megaloop/reproduce/flt_stability.py): the FLT reference's Muon, no warm-up and a
    20% warm-down to 0, at every scale; spikes count after the shared early transient."""
    from megaloop.reproduce import flt_stability
    from megaloop.reproduce.runner import Context
    from megaloop.training.optim import lr_at
    for ctx in (Context(str(tmp_path)), Context(str(tmp_path), quick=True), Context(str(tmp_path), scale="gpu")):
        t = flt_stability.settings(ctx)["train"]
        assert t["optimizer"] == "muon" and t["warmup_steps"] == 0 and t["weight_decay"] == 0.0
        cfg = _cfg(**{k: v for k, v in t.items() if k in flt_stability.REFERENCE_OPTIMIZER}, steps=t["steps"],
                   lr=3e-3)
        assert lr_at(0, cfg.train) == 3e-3 and lr_at(int(0.8 * t["steps"]) - 1, cfg.train) == 3e-3
        assert lr_at(t["steps"] - 1, cfg.train) == 0.0
    assert flt_stability.spike_window_start(flt_stability.settings(Context(str(tmp_path)))["train"]) == 20


def test_two_data_parallel_ranks_give_one_rank_with_double_accumulation(trained):
    """ZeRO 0: the gradients are all-reduced over DP, then every replica takes the same Muon step."""
    single, _ = trained("accum2", train={"grad_accum_steps": 2})
    dp2, _ = trained("dp2", world=2, train={"grad_accum_steps": 1})
    a, b = train_losses(single), train_losses(dp2)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
