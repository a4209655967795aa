"""Static checks of what the trainer evaluates: train.eval_loops (one R or a list), train.eval_exits, the
validation / test sets of data.valid_data_path / test_data_path, and train.harness_* (lm-evaluation-harness
every N steps). Called by megaloop.config.validation.validate; the trainer's side is
megaloop/training/evaluation.py and harness.py."""
from __future__ import annotations

import re

from megaloop.config.schema import Config, ConfigError, named_blends
from megaloop.evaluation.loops import parse_exit


def check_evaluation(cfg: Config) -> None:
    """train.eval_loops / eval_exits / harness_*, data.valid_data_path / test_data_path (the trainer's
    evaluation: megaloop/training/evaluation.py, harness.py)."""
    t, d, p = cfg.train, cfg.data, cfg.parallel
    if t.eval_loops is not None:
        if not t.eval_loops or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in t.eval_loops):
            raise ConfigError(f"train.eval_loops must be a loop count > 0 or a list of them (e.g. [1, 4, 8]) or null, "
                              f"got {t.eval_loops!r}")
    for item in t.eval_exits:
        strategy = parse_exit(str(item), "train.eval_exits", ConfigError)[0]
        if strategy == "q_exit" and not cfg.model.exit_gate:
            raise ConfigError(f"train.eval_exits {item!r}: the q_exit strategy reads Ouro's exit gate; set "
                              f"model.exit_gate=true or drop it")
    if t.eval_exits and (p.pipeline_parallel > 1 or cfg.loop.granularity != "micro_batch"):
        raise ConfigError("train.eval_exits needs parallel.pipeline_parallel=1 and loop.granularity='micro_batch' "
                          "(an exit picks each token's loop from all loops' logits); evaluate exits of a checkpoint "
                          "with tools/eval_loops.py --exits")
    if d.test_data_path and t.eval_iters < 1:
        raise ConfigError("data.test_data_path is evaluated after the last step on train.eval_iters micro-batches "
                          "per set: set train.eval_iters >= 1")
    for key in ("valid_data_path", "test_data_path"):
        spec = getattr(d, key)
        if spec and d.task:
            raise ConfigError(f"data.{key} names datasets, but data.task={d.task!r} generates its examples; drop one")
        if spec is not None and not isinstance(spec, (list, dict)):
            raise ConfigError(f"data.{key} must be a blend like data.data_path or a mapping of names to blends")
        for name, blend in named_blends(spec, key.split("_")[0]).items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ConfigError(f"data.{key}: the set name {name!r} may hold only letters, digits, '_', '.', '-' "
                                  f"(it names the set in metrics.jsonl and TensorBoard tags)")
            if not blend:
                raise ConfigError(f"data.{key}: the set {name!r} names no dataset")
    if t.harness_interval:
        if not t.harness_tasks:
            raise ConfigError(f"train.harness_interval={t.harness_interval} needs train.harness_tasks (lm-eval task "
                              f"names, e.g. [lambada_openai])")
        if p.tensor_parallel > 1 or p.zero_stage == 3 or not cfg.model.causal:
            raise ConfigError("train.harness_interval gathers the weights on rank 0 and exports them to Hugging Face: "
                              "it needs parallel.tensor_parallel=1, zero_stage < 3 and model.causal=true; run "
                              "tools/eval_harness.py on the run's checkpoints instead")
