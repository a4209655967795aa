"""Evaluation during training: every validation set at each loop count R of train.eval_loops and with each
exit of train.eval_exits, logged per (set, R) to metrics.jsonl, TensorBoard / the trackers and the console.

Test-time compute is what a looped model offers, so validation shows the loss at several R as training
goes. A record names its set and R (the loss key stays `valid_loss`, so a script reading the one-R record
of earlier runs keeps working):

    {"step": 500, "valid_set": "wiki", "R": 4, "valid_loss": 2.91}
    {"step": 500, "valid_set": "wiki", "R": 8, "exit": "kl:1e-3", "avg_loops": 5.2, "valid_loss": 2.93}

plus `exact_match_sequence` / `exact_match_position` on task data (megaloop.tasks.exact_match_counts, the
counts tools/eval_loops.py reports) and `kl_to_teacher` under distillation. TensorBoard tags are
valid/<set>/R<R>/<metric> and valid/<set>/<strategy>_<threshold>/<metric>. Sets: data.split's valid
documents ("valid") or data.valid_data_path's named sets; data.test_data_path's sets are evaluated once after
the last step (records `test_set` / `test_loss`). Each (set, R) reads the same first train.eval_iters
micro-batches every time, so the numbers are comparable across the run.

Layouts: DP (losses averaged over replicas), TP (vocab-parallel logits gathered for exact match; exits use
the vocab-parallel KL), PP through DeepSpeed's eval_batch (the last stage's loss function counts exact
matches; exits are refused at validation, megaloop/config/validation.py). Device values are read once per
(set, R), on evaluation steps only.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megaloop.config import Config, ConfigError
from megaloop.model.loop_schedule import unpack_loops
from megaloop.parallel.device import on_accelerator, zeros_on_accelerator
from megaloop.training.data import EvalBatches


def eval_loop_counts(cfg: Config) -> List[int]:
    """train.eval_loops as a list (an int or a saved config's int is one R; None: model.loops), in the
    order given, without repeats."""
    loops = cfg.train.eval_loops
    if loops is None:
        return [cfg.model.loops]
    return list(dict.fromkeys(int(r) for r in (loops if isinstance(loops, (list, tuple)) else [loops])))


def exit_tag(item: str) -> str:
    """'kl:1e-3' -> 'kl_1e-3' (a TensorBoard tag part)."""
    return item.replace(":", "_")


class Evaluation:
    """The trainer's validation and test evaluation (one per run; `te` is the TrainingEngine)."""

    def __init__(self, cfg: Config, state, te, logger, valid_sets: Dict[str, object],
                 test_sets: Optional[Dict[str, object]] = None, distiller=None):
        from megaloop.evaluation.loops import parse_exit
        self.cfg, self.state, self.te, self.logger, self.distiller = cfg, state, te, logger, distiller
        self.engine, self.module = te.engine, te.module
        self.valid_sets, self.test_sets = valid_sets, test_sets or {}
        self.loops = eval_loop_counts(cfg)
        self.exits = [(str(item), parse_exit(str(item), "train.eval_exits", ConfigError))
                      for item in cfg.train.eval_exits]

    def validate(self, step: int) -> List[dict]:
        return [r for name, ds in self.valid_sets.items() for r in self.evaluate_set(step, "valid", name, ds)]

    def test(self, step: int) -> List[dict]:
        return [r for name, ds in self.test_sets.items() for r in self.evaluate_set(step, "test", name, ds)]

    def evaluate_set(self, step: int, kind: str, name: str, dataset) -> List[dict]:
        """One set at every R and exit: logs and returns the records."""
        records = []
        for r in self.loops:
            records.append({"step": step, f"{kind}_set": name, "R": r, **self._metrics(kind, dataset, r)})
        r_max = max(self.loops)
        for item, (strategy, _, threshold) in self.exits:
            m = self._metrics(kind, dataset, r_max, strategy, threshold)
            records.append({"step": step, f"{kind}_set": name, "R": r_max, "exit": item, **m})
        self._log(step, kind, name, records)
        return records

    # ------------------------------------------------------------------------------------------
    def _metrics(self, kind: str, dataset, loops: int, exit: Optional[str] = None,
                 threshold: Optional[float] = None) -> dict:
        """{f"{kind}_loss", exact match on tasks, kl_to_teacher when distilling, avg_loops with an exit}."""
        import deepspeed.comm as dist
        cfg, t, dp = self.cfg, self.cfg.train, self.state.dp_size
        batches = EvalBatches(dataset, cfg, self.state.dp_rank, dp, t.eval_iters, loops)
        counts = zeros_on_accelerator(4, dtype=torch.float64)  # exact match on task data
        if cfg.parallel.pipeline_parallel > 1:
            # The last stage's loss function sees the final logits: it counts exact matches there.
            loss_fn = self.module.loss_fn
            if cfg.data.task:
                loss_fn.eval_hook = lambda logits, labels: counts.add_(self._exact_match_counts(logits, labels))
            try:
                total = self.engine.eval_batch(batches, num_micro_batches=t.eval_iters)
            finally:
                loss_fn.eval_hook = None
            self.engine.train()
            if cfg.data.task and dp > 1:
                dist.all_reduce(counts, group=self.state.dp_group)
            return {f"{kind}_loss": float(total), **self._accuracy(counts)}
        self.engine.eval()
        # [loss sum, KL-to-teacher sum, exit loops over answer tokens, answer tokens]
        sums = zeros_on_accelerator(4)
        with torch.no_grad():
            for (tokens, lp), labels in batches:
                tokens, labels = tokens.to(self.engine.device), labels.to(self.engine.device)
                r = unpack_loops(lp)[0]
                if exit is None:
                    out = self.engine(tokens, labels=labels, loops=r)
                    loss = out.loss
                else:  # the loss of each token's exit-selected logits
                    out = self.engine(tokens, loops=r, exit=exit, exit_threshold=threshold)
                    loss = self.module.loss(out.logits, labels)
                    answer = labels >= 0
                    sums[2] += (out.exit_loops * answer).sum().float()
                    sums[3] += answer.sum().float()
                sums[0] += loss.detach().float()
                if self.distiller is not None:
                    teacher = self.distiller.teacher_logits(tokens, r, None, per_loop=False)[0]
                    sums[1] += self.distiller.kl(out.logits, teacher, labels).float()
                if cfg.data.task:
                    counts += self._exact_match_counts(out.logits, labels)
        self.engine.train()
        if dp > 1:
            dist.all_reduce(sums, group=self.state.dp_group)
            dist.all_reduce(counts, group=self.state.dp_group)
        loss_sum, kl_sum, loop_sum, answers = sums.tolist()  # the one host read of this (set, R)
        n = t.eval_iters * dp
        out = {f"{kind}_loss": loss_sum / n, **self._accuracy(counts)}
        if exit is not None:
            out["avg_loops"] = loop_sum / max(answers, 1)
        if self.distiller is not None:
            out["kl_to_teacher"] = kl_sum / n
        return out

    def _accuracy(self, counts) -> dict:
        if not self.cfg.data.task:
            return {}
        sr, sn, pr, pn = counts.tolist()
        return {"exact_match_sequence": sr / max(sn, 1), "exact_match_position": pr / max(pn, 1)}

    def _exact_match_counts(self, logits, labels):
        """(sequences right, sequences, answer positions right, answer positions) of one micro-batch
        (megaloop.tasks.exact_match_counts); under TP the vocab-parallel logits are gathered first."""
        from megaloop.tasks.base import exact_match_counts
        if self.state.tp_size > 1:
            from megaloop.parallel.comm import TPComm
            from megaloop.parallel.cross_entropy import gather_vocab_logits
            logits = gather_vocab_logits(logits, TPComm.coerce(self.state), self.cfg.model.vocab_size)
        return on_accelerator(exact_match_counts(logits, labels), dtype=torch.float64)

    # ------------------------------------------------------------------------------------------
    def _log(self, step: int, kind: str, name: str, records: List[dict]) -> None:
        parts = []
        for rec in records:
            where = f"{exit_tag(rec['exit'])}" if "exit" in rec else f"R{rec['R']}"
            values = {k: v for k, v in rec.items() if k not in ("step", f"{kind}_set", "R", "exit")}
            values["loss"] = values.pop(f"{kind}_loss")
            self.logger.scalars(step, values, prefix=f"{kind}/{name}/{where}/")
            self.logger.record(rec)
            head = (f"{rec['exit']} (R={rec['R']}, avg loops {rec['avg_loops']:.2f})" if "exit" in rec
                    else f"R={rec['R']}")
            parts.append(f"{head} loss {values['loss']:.4f}" + "".join(
                f" {k.replace('_', ' ')} {v:.3f}" for k, v in values.items() if k not in ("loss", "avg_loops")))
        label = "validation" if kind == "valid" else "test"
        self.logger.console(f"step {step} | {label} {name} | " + " | ".join(parts))
