"""train.harness_interval: lm-evaluation-harness on the current weights every N steps, at each R of
train.eval_loops (megaloop/evaluation/harness.py does the work).

On a harness step every rank gathers the weights to rank 0 (TrainingEngine.gathered_model: TP 1, ZeRO < 3,
refused otherwise at validation); rank 0 exports them to a temporary Hugging Face folder under the run's
output_dir (deleted afterwards), runs lm-eval on its accelerator device and broadcasts the rows, which the
logging rank writes: metrics.jsonl records {"step", "harness_task", "R", <metric>: value, ...}, TensorBoard /
trackers harness/<task>/R<R>/<metric>, one console line per task. The other ranks wait in that broadcast,
so one harness run must finish within train.dist_timeout (use train.harness_limit, or run
tools/eval_harness.py on the checkpoints for long suites).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import List

from megaloop.config import Config


class PeriodicHarness:
    def __init__(self, cfg: Config, te, logger, loops: List[int]):
        from megaloop.evaluation.harness import task_manager
        self.cfg, self.te, self.logger, self.loops = cfg, te, logger, loops
        # lm-eval's task index, on every rank: an unknown task stops the run at start, on every rank alike
        self.manager = task_manager(cfg.train.harness_tasks, cfg.train.harness_include_path)

    def due(self, step: int) -> bool:
        return step % self.cfg.train.harness_interval == 0

    def run(self, step: int) -> List[dict]:
        import deepspeed.comm as dist
        import torch.distributed as tdist
        from megaloop.evaluation.harness import HarnessError
        lm = self.te.gathered_model()  # (a collective with PP > 1; None except on rank 0)
        box, failure = [None], None
        if lm is not None:
            try:
                box[0] = self._evaluate(lm)
            except Exception as exc:  # every rank stops with rank 0's reason, none waits out the timeout
                failure, box[0] = exc, {"error": f"{type(exc).__name__}: {exc}"}
        if dist.get_world_size() > 1:
            tdist.broadcast_object_list(box, src=0)
        if isinstance(box[0], dict):
            raise HarnessError(f"train.harness_interval at step {step}: {box[0]['error']}") from failure
        records = [{"step": step, "harness_task": r["task"], "R": r["R"], **r["metrics"]} for r in box[0]]
        for task in dict.fromkeys(r["harness_task"] for r in records):
            parts = []
            for rec in (r for r in records if r["harness_task"] == task):
                values = {k: v for k, v in rec.items() if k not in ("step", "harness_task", "R")}
                self.logger.scalars(step, values, prefix=f"harness/{task}/R{rec['R']}/")
                self.logger.record(rec)
                parts.append(f"R={rec['R']} " + " ".join(f"{k} {v:.4f}" for k, v in values.items()))
            self.logger.console(f"step {step} | lm-eval {task} | " + " | ".join(parts))
        return records

    def _evaluate(self, lm) -> List[dict]:
        from deepspeed.accelerator import get_accelerator
        from megaloop.evaluation.harness import export_weights, run_harness
        from megaloop.training.data import tokenizer_reference
        t = self.cfg.train
        with tempfile.TemporaryDirectory(prefix=".harness-", dir=t.output_dir) as tmp, _global_rngs_kept():
            folder = export_weights(lm.state_dict(), self.cfg, tokenizer_reference(self.cfg), os.path.join(tmp, "hf"))
            del lm
            return run_harness(folder, t.harness_tasks, self.loops, t.harness_include_path, t.harness_limit,
                               t.micro_batch_size, device=get_accelerator().current_device_name(),
                               manager=self.manager)


@contextlib.contextmanager
def _global_rngs_kept():
    """lm-eval seeds Python's, numpy's and torch's global generators: rank 0's training RNG (dropout, ...)
    continues afterwards as if the harness had not run."""
    import random

    import numpy as np
    import torch
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    device = acc.device_name() != "cpu"
    states = random.getstate(), np.random.get_state(), torch.get_rng_state(), acc.get_rng_state() if device else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if device:
            acc.set_rng_state(states[3])
