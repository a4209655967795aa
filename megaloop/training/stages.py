"""Training stages (`train.stage`): which parameters a run trains and which loss it trains them on.

pretrain    (default) every parameter, the LM loss of `loop.loss`.
dsa_warmup  DeepSeek-V3.2's dense warm-up: only the DSA indexers (wq_index, wk_index, k_index_norm,
            w_index) train; the model attends densely, and the loss is the indexers' KL to the dense
            attention distribution (megaloop/model/stage_losses.py).
exit_gate   Ouro's stage II: only the exit gate trains, on the BCE against the loss-improvement target;
            the LM's per-loop token losses are computed without gradients.

`apply_train_stage` freezes (requires_grad = False) everything else before the optimizer and the DeepSpeed
engine are built (megaloop.training.engine.build_engine), so AdamW and ZeRO hold only the trainable
parameters and frozen ones are bit-identical after training. PP = 1 only (validation refuses PP > 1).
A stage normally starts from a previous run's weights: a weights-only initialisation, not a resume
(train.stage may not change on resume, see megaloop/training/resume_policy.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch.nn as nn

from megaloop.config import ConfigError, TrainConfig

STAGE_LOSS_NAMES = {"dsa_warmup": "indexer_kl", "exit_gate": "exit_gate_bce"}


def stage_fields(stage: str) -> dict:
    """What a metrics row says about the stage: {} for pretrain, else the stage and the name of its loss
    (the row's `loss` is then that loss)."""
    return {} if stage == "pretrain" else {"stage": stage, "stage_loss": STAGE_LOSS_NAMES[stage]}


def stage_parameters(model: nn.Module, stage: str) -> List[nn.Parameter]:
    """The parameters `stage` trains (a LoopedLM, tensor-parallel or not)."""
    from megaloop.model.sparse_attention import DeepSeekSparseAttention
    if stage == "dsa_warmup":
        params = []
        for m in model.modules():
            if isinstance(m, DeepSeekSparseAttention):
                for sub in (m.wq_index, m.wk_index, m.k_index_norm, m.w_index):
                    if sub is not None:
                        params.extend(sub.parameters())
        if not params:
            raise ConfigError("train.stage='dsa_warmup' trains the DSA indexers, but the model has no 'dsa' layer "
                              "(model.mixer)")
        return params
    if stage == "exit_gate":
        if getattr(model, "exit_gate", None) is None:
            raise ConfigError("train.stage='exit_gate' trains Ouro's exit gate: it needs model.exit_gate=true")
        return list(model.exit_gate.parameters())
    raise ConfigError(f"train.stage={stage!r} has no parameters to select")


def apply_train_stage(model: nn.Module, t: TrainConfig) -> Optional[str]:
    """Freeze all but the stage's parameters and switch the model to the stage's loss; returns a console
    line (None for pretrain, which changes nothing)."""
    if t.stage == "pretrain":
        return None
    if not hasattr(model, "block"):
        raise ConfigError(f"train.stage={t.stage!r} needs the whole LoopedLM on one pipeline stage "
                          f"(parallel.pipeline_parallel=1)")
    trainable = stage_parameters(model, t.stage)
    keep = {id(p) for p in trainable}
    total = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
        total += p.numel()
    if t.stage == "dsa_warmup":
        from megaloop.model.sparse_attention import set_dsa_dense_warmup
        set_dsa_dense_warmup(model, True)
    model.train_stage = t.stage
    model.stage_params = {"exit_gate_slope": t.exit_gate_slope, "exit_gate_margin": t.exit_gate_margin}
    n = sum(p.numel() for p in trainable)
    return (f"train.stage {t.stage}: training {n:,} of {total:,} parameters (this rank), loss "
            f"{STAGE_LOSS_NAMES[t.stage]}; everything else frozen")
