"""Training setup in one process: the DeepSpeed config built from the YAML config, weight-decay groups,
learning-rate schedules, refusals, and the shipped yaml_configs."""
import glob
import os

import pytest
import torch

from megaloop.config import ConfigError, load_config
from megaloop.model import build_model
from megaloop.training.ds_config import build_ds_config, check_supported
from megaloop.training.optim import lr_at, param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ds_config_is_built_from_the_yaml_config():
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum_steps=5", "parallel.zero_stage=2",
                             "train.precision=bf16", "train.grad_clip=0.5"])
    ds = build_ds_config(cfg, dp_world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60 and ds["zero_optimization"]["stage"] == 2
    # bf16 defaults to torch.autocast over fp32 weights; DeepSpeed's bf16 engine is train.bf16_impl=master_weights
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["bf16"]["enabled"]
    assert not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert "pipeline" not in ds
    mw = load_config(None, ["train.precision=bf16", "train.bf16_impl=master_weights"])
    ds = build_ds_config(mw, dp_world_size=1)
    assert ds["bf16"]["enabled"] and not ds["torch_autocast"]["enabled"]
    assert not build_ds_config(load_config(None, []), 1)["torch_autocast"]["enabled"]  # fp32
    pp = load_config(None, ["parallel.pipeline_parallel=2", "parallel.zero_stage=1", "train.precision=bf16",
                            "train.bf16_impl=master_weights"])
    ds = build_ds_config(pp, dp_world_size=1)
    assert ds["pipeline"]["activation_checkpoint_interval"] == 0  # per-loop checkpointing is the block's own
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    fp16 = load_config(None, ["train.precision=fp16", "train.loss_scale=0"])
    assert build_ds_config(fp16, 1)["fp16"] == {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 16,
                                                "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}


def test_weight_decay_groups_exclude_norms_biases_and_marked_parameters():
    cfg = load_config(None, ["model.injection=parcae", "model.normalization=inner", "model.n_coda=1",
                             "model.loop_residual_gate=true", "model.exit_gate=true"])
    model = build_model(cfg)
    groups = param_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for n, p in model.named_parameters():
        if "norm" in n or n.endswith("bias") or getattr(p, "no_weight_decay", False):
            assert id(p) not in decay, n
    assert {"block.rho", "block.out_proj.weight"} <= no_decay
    assert any("injection" in n and "A_log" in n for n in no_decay)
    assert any("injection" in n and n.endswith("B") or "B" in n.split(".")[-1] for n in no_decay)
    assert "embedding.weight" in {names[id(p)] for p in groups[0]["params"]}
    # tied head/embedding counted once
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lr_schedules():
    t = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"]).train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(100, t) == pytest.approx(0.1)
    assert lr_at(55, t) == pytest.approx(0.55)
    w = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1",
                           "train.lr_schedule=wsd", "train.wsd_decay_fraction=0.2"]).train
    assert lr_at(50, w) == 1.0 and lr_at(79, w) == 1.0
    assert lr_at(89, w) == pytest.approx(0.55) and lr_at(99, w) == pytest.approx(0.1)


def test_unsupported_combinations_are_refused_with_what_works():
    cfg = load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="fp16.*not supported by the cpu accelerator"):
        check_supported(cfg, 1, "cpu", fp16_supported=False)
    with pytest.raises(ConfigError, match="not divisible"):
        check_supported(load_config(None, ["parallel.pipeline_parallel=2"]), 3, "cpu")
    with pytest.raises(ConfigError, match="zero_stage 1 or 2 with TP"):
        check_supported(load_config(None, ["parallel.zero_stage=3", "parallel.tensor_parallel=2"]), 2, "cuda")
    with pytest.raises(ConfigError, match="partition_activations"):
        load_config(None, ["train.partition_activations=true", "train.activation_checkpointing=loop"])
    # DeepSpeed's partition / CPU offload act on the looped block's checkpoints: accepted with them ...
    check_supported(load_config(None, ["train.cpu_checkpointing=true", "train.activation_checkpointing=loop"]),
                    1, "cuda")
    check_supported(load_config(None, ["train.partition_activations=true", "train.activation_checkpointing=layer",
                                       "parallel.tensor_parallel=2"]), 2, "cuda")
    # ... refused without them (the (B, T, d) states split evenly: TP divides n_heads, so d_model)
    with pytest.raises(ConfigError, match="need train.activation_checkpointing 'loop' or 'layer'"):
        load_config(None, ["train.cpu_checkpointing=true"])
    with pytest.raises(ConfigError, match="pipeline_parallel 1 for ZeRO 2/3"):
        load_config(None, ["parallel.pipeline_parallel=2", "parallel.zero_stage=3"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "yaml_configs", "*.yaml"))))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    p = cfg.parallel
    assert not (p.pipeline_parallel > 1 and p.zero_stage > 1)
    world = 2 if "cpu" in path else (16 if "16gpu" in path else 8)
    check_supported(cfg, world, "cuda")
    assert world % (p.tensor_parallel * p.pipeline_parallel) == 0
    assert p.tensor_parallel <= 8  # TP stays inside an 8-GPU node


def test_adamw_kernel_follows_the_accelerator():
    from megaloop.training.optim import build_optimizer, optimizer_kernel
    assert optimizer_kernel("auto", "cuda") == "fused" and optimizer_kernel("auto", "xpu") == "fused"
    assert optimizer_kernel("auto", "cpu") == "foreach" and optimizer_kernel("for_loop", "cuda") == "for_loop"
    model = torch.nn.Linear(4, 4)
    cfg = load_config(None, [])
    assert build_optimizer(model, cfg.train, "cpu").defaults["foreach"] is True
    cfg = load_config(None, ["train.optimizer_impl=fused"])
    assert build_optimizer(model, cfg.train, "cpu").defaults["fused"] is True
    with pytest.raises(ConfigError, match="optimizer_impl"):
        load_config(None, ["train.optimizer_impl=apex"])
