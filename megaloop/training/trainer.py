"""The training loop: steps, validation, checkpoints, stopping, logging. Nothing else.

The engine (model, parallelism, optimizer, DeepSpeed) comes from megaloop.training.engine, the data from
megaloop.training.data, the logging steps' numbers from megaloop.training.progress, what stops a run early
from megaloop.training.stopping. The loop count R of every micro-batch comes with the data, so all stages /
TP ranks agree and a resumed run redraws the same R. Device values (loss, grad norm, stop flags) are read
on logging / eval / save steps only, in one transfer (megaloop.training.settle), so a GPU never waits for
the host between steps.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from megaloop.config import Config, ConfigError
from megaloop.model.loop_schedule import logged_loops, unpack_loops
from megaloop import checkpoint as ckpt
from megaloop.training.end_sample import sample_after_training
from megaloop.training.data import (TrainBatches, build_run_datasets, build_tokenizer_for, samples_needed,
                                    tokenizer_reference)
from megaloop.training.distributed import build_state, init_distributed, is_logging_rank, quiet_deepspeed
from megaloop.training.ds_config import check_supported
from megaloop.training.engine import build_engine, main_loss_backward_scale
from megaloop.training.evaluation import Evaluation
from megaloop.training.faults import FaultPlan
from megaloop.training.nonfinite import SkipLedger, step_skipped
from megaloop.training.pipeline_step import pipeline_train_batch
from megaloop.training.init_from import initial_weights
from megaloop.training.optim import apply_schedule, logged_lr
from megaloop.training.peers import PeerWatch
from megaloop.training.profiling import StepProfiler
from megaloop.training.progress import Progress
from megaloop.training.resume_policy import check_resumable, resume_tag
from megaloop.data.fingerprint import data_fingerprint
from megaloop.training.run_dir import lock_output_dir, write_run_config, write_run_status
from megaloop.training.run_logging import RunLogger
from megaloop.training.settle import TrainingError, settle  # noqa: F401 (TrainingError: re-exported)
from megaloop.training.stages import stage_fields
from megaloop.training.stopping import TIME_UP, RunStops
from megaloop.training.time_limit import EXIT_TIME_LIMIT
from megaloop.training.trackers import run_description


class Trainer:
    def __init__(self, cfg: Config, faults: Optional[FaultPlan] = None, override_resume_config: bool = False):
        self.cfg = cfg
        self.faults = faults or FaultPlan()
        self.override_resume_config = override_resume_config
        self.lock, self.peers = None, PeerWatch()

    # ------------------------------------------------------------------------------------------
    def setup(self):
        import deepspeed.comm as dist
        from deepspeed.accelerator import get_accelerator

        cfg, t, p = self.cfg, self.cfg.train, self.cfg.parallel
        quiet_deepspeed()
        init_distributed(t.dist_timeout)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
        acc = get_accelerator()
        self.rank, self.world = self.peers.start(t.dist_timeout)  # (rank, world); a heartbeat names a lost rank
        check_supported(cfg, self.world, acc.device_name(),
                        fp16_supported=acc.is_fp16_supported(), bf16_supported=acc.is_bf16_supported())
        self.state = st = build_state(p)
        self.pp, self.dp = st.pp_size, st.dp_size
        self.log_rank = is_logging_rank(st)
        self.out_dir = t.output_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.lock = lock_output_dir(self.out_dir, self.rank)
        if self.rank == 0:
            os.makedirs(self.ckpt_root, exist_ok=True)
        self.logger = RunLogger(self.out_dir, self.log_rank, cfg,  # + the config, git commit, layout, once
                                lambda: run_description(cfg, st, self.world, acc.device_name()))
        write_run_status(self.out_dir, self.rank, "running", 0, 0)
        if self.lock is not None and self.lock.note:
            self.logger.console(self.lock.note)
        self.logger.console(f"world {self.world}: pp {st.pp_size} x dp {st.dp_size} x tp {st.tp_size}"
                            f"{' (sequence parallel)' if st.sequence_parallel else ''}, "
                            f"zero {p.zero_stage}, {t.precision}, accelerator {acc.device_name()}, "
                            f"activation checkpointing {t.activation_checkpointing}")

        # Data (rank 0 builds the index caches first, the others then read them).
        self.tokenizer = build_tokenizer_for(cfg)
        counts = samples_needed(cfg, self.dp)  # (train, per validation set, per test set)
        if self.rank == 0:
            datasets = build_run_datasets(cfg, *counts, self.tokenizer)
        dist.barrier()
        if self.rank != 0:
            datasets = build_run_datasets(cfg, *counts, self.tokenizer)
        self.train_ds, valid_sets, test_sets = datasets
        self.data_fingerprint = data_fingerprint(cfg)  # saved with each checkpoint, compared on resume
        if not cfg.data.task and self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} ids but model.vocab_size="
                              f"{cfg.model.vocab_size}")

        def console(text):  # engine set-up notes, once (rank 0)
            if self.rank == 0:
                print(f"[megaloop {time.strftime('%H:%M:%S')}] {text}", flush=True)
        # Continue a run (train.load, or this output folder's own checkpoint) or start one, from
        # init.from's weights if set (weights only; never re-applied on a resume).
        self.resume_tag = self._resume_tag()
        init_state, self.init_note = initial_weights(cfg, self.rank, self.world) if self.resume_tag is None else (None, None)
        self.te = build_engine(cfg, st, console, acc.current_device_name(), init_state)
        del init_state
        self.engine, self.module = self.te.engine, self.te.module
        from megaloop.checkpoint.async_save import CheckpointSaver  # (train.async_save: background writes)
        self.saver = CheckpointSaver(self.engine, self.ckpt_root, self.rank, t, self.logger.console)
        self.self_clip = self.te.clip is not None
        self.grad_norm = self.te.grad_norm
        self._aux_scale = None
        self.distiller = None
        if t.distill.teacher:  # (re-loaded on every start: a resume recomputes the same losses)
            from megaloop.training.distill import Distiller
            self.distiller = Distiller(cfg, self.module, acc.current_device_name(), console, self.rank, self.world)
        self.diagnostics = None  # train.diag_interval: megaloop/training/diagnostics.py (None: off, no cost)
        if t.diag_interval:
            from megaloop.training.diagnostics import TrainingDiagnostics
            self.diagnostics = TrainingDiagnostics(cfg, st, self.module, self.logger, console)
        self.profiler = StepProfiler.from_config(t.profile, self.out_dir, self.rank, print)  # train.profile
        # validation / test sets at each train.eval_loops R and exit (megaloop/training/evaluation.py)
        self.evaluation = Evaluation(cfg, st, self.te, self.logger, valid_sets, test_sets, self.distiller)
        self.harness = None  # train.harness_interval: lm-eval every N steps (megaloop/training/harness.py)
        if t.harness_interval:
            from megaloop.training.harness import PeriodicHarness
            self.harness = PeriodicHarness(cfg, self.te, self.logger, self.evaluation.loops)

    # ------------------------------------------------------------------------------------------
    def _resume_tag(self):
        """The checkpoint this run continues from (train.load, else auto-resume), or None: a new run."""
        return resume_tag(self.cfg.train, self.ckpt_root, self.rank, self.world, self.logger.console)

    def resume(self) -> dict:
        tag_dir = self.resume_tag
        if tag_dir is None:
            if self.init_note:
                self.logger.console(self.init_note)
            write_run_config(self.cfg, self.out_dir, self.rank, None)
            return {"step": 0, "consumed_samples": 0}
        applied = check_resumable(tag_dir, self.cfg, self.state, self.override_resume_config)
        from megaloop.checkpoint.relayout import load_training as load_any_layout  # (another layout too)
        client = load_any_layout(self.te, tag_dir, self.state, self.cfg, self.rank)
        self.saver.last_good = os.path.abspath(tag_dir)
        apply_schedule(self.engine, self.cfg.train)  # the schedule of the config given now, at this step
        self.logger.console(f"resumed from {self.saver.last_good} at step {client.get('step')}"
                            + (f"; applied: {'; '.join(applied)}" if applied else "")
                            + ("; init.from is not re-applied on a resume" if self.cfg.init.from_ else ""))
        write_run_config(self.cfg, self.out_dir, self.rank, client.get("step"))
        return client

    def save(self, step: int, consumed: int, wait: bool = False):
        t = self.cfg.train
        client = {"step": step, "consumed_samples": consumed, "config": self.cfg.to_dict(),
                  "tokenizer": tokenizer_reference(self.cfg), "loop_sampling": {"seed": t.seed, "step": step},
                  "megaloop_format": 1, "data_fingerprint": self.data_fingerprint}
        try:  # (weights that are not finite are never saved: the newest good checkpoint stays the last one)
            self.saver.save(step, client, wait, self.faults.save_hook(step, self.rank), self.faults.slow_hook(step))
        except ckpt.NonFiniteState as exc:
            raise TrainingError(f"{exc}; last good checkpoint: {self.saver.last_good or 'none'}") from exc

    # ------------------------------------------------------------------------------------------
    def train_step(self, batches: TrainBatches, step: int, want_diag: bool):
        """One optimizer step. Returns (loss averaged over the global batch as a device tensor, R list,
        diagnostics | None)."""
        import deepspeed.comm as dist
        from megaloop.model.sparse_attention import set_aux_loss_backward_scale
        t = self.cfg.train
        # Aux losses injected in backward (DSA's indexer loss) follow the main loss's gradient scale
        # (1/gas x the fp16 loss scale; constant within a step: the scale only changes in step()).
        # Constant unless fp16 loss scaling moves it: computed once (each computation is a host sync).
        if self._aux_scale is None or t.precision == "fp16":
            self._aux_scale = main_loss_backward_scale(self.engine)
            set_aux_loss_backward_scale(self.module, self._aux_scale)
        block = self.module.block if self.pp == 1 else getattr(self.te.looped_layer(), "block", None)
        if block is not None:  # noise start keyed by (seed, step, micro-batch), as R is: any layout, resume
            block.set_noise_key(t.seed, step, self.state.dp_rank, self.dp)
        if self.pp > 1:  # DeepSpeed's pipeline engine runs the micro-batches
            return pipeline_train_batch(self.te, batches, self.diagnostics, step, want_diag)
        losses, rs, diag = [], [], None
        device = self.engine.device
        for m in range(t.grad_accum_steps):
            (tokens, loops), labels = next(batches)
            total, grad = unpack_loops(loops)  # per-row (B,) tensors under loop.granularity=sequence
            rs.append(logged_loops(loops))
            tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if m == 0 and self.diagnostics is not None and self.diagnostics.due(step + 1):
                self.diagnostics.run(step + 1, tokens, labels, total, grad)
            want = want_diag and m == t.grad_accum_steps - 1
            if self.distiller is not None:  # teacher beside the student (megaloop/training/distill.py)
                loss, out, self.distill_logged = self.distiller.loss(self.engine, tokens, labels, total, grad, step,
                                                                     want)
            else:
                out = self.engine(tokens, labels=labels, loops=total, grad_loops=grad, return_diagnostics=want)
                loss = out.loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
            if out.diagnostics is not None:
                diag = out.diagnostics
        loss = torch.stack(losses).mean()  # on the device: read on logging steps only
        if self.dp > 1:
            dist.all_reduce(loss, group=self.state.dp_group)
            loss = loss / self.dp
        return loss, rs, diag

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            with self.peers.name_lost_ranks(lambda: getattr(getattr(self, "saver", None), "last_good", None)):
                return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> dict:
        self.setup()
        cfg, t = self.cfg, self.cfg.train
        skips = SkipLedger(t.max_consecutive_skips, t.precision, self.logger.console)  # (nonfinite.py)
        client = self.resume()
        step = int(client.get("step", 0))
        consumed = int(client.get("consumed_samples", 0))
        global_batch = t.micro_batch_size * t.grad_accum_steps * self.dp
        batches = TrainBatches(self.train_ds, cfg, self.state.dp_rank, self.dp, consumed)
        stops = RunStops(t, self.engine.device, self.logger.console)  # signals, launcher watchdog, time limit
        progress = Progress(cfg, self.state, self.rank, self.world, self.logger,
                            self.pp == 1 or self.te.looped_layer() is not None, global_batch)
        losses, pending = [], []
        try:
            while step < t.steps:
                self.faults.before_step(step, self.rank)
                self.profiler.before_step(step + 1)  # (train.profile; a no-op when off)
                want_diag = (step + 1) % t.log_interval == 0
                skipped_before = getattr(self.engine, "skipped_steps", 0)
                loss, rs, diag = self.train_step(batches, step, want_diag)
                loss = self.faults.loss(step, loss)
                skipped = step_skipped(self.te, skipped_before)  # (a device flag or a bool)
                step += 1
                consumed += global_batch
                r_mean = progress.after_step(rs)
                self.profiler.after_step(step)
                lr = logged_lr(self.engine.get_lr(), self.engine.optimizer, t)  # (train.lr's scale)
                pending.append({"step": step, "loss": loss, "lr": lr, "R": rs,
                                "grad_norm": self.grad_norm(), "loss_scale": self.te.loss_scale(), "skipped": skipped,
                                **stage_fields(t.stage)})
                if self.distiller is not None:  # [final-loop KL, per-loop KLs during the warm-up] (device)
                    pending[-1]["distill"] = self.distill_logged
                evaluate = bool(t.eval_interval and step % t.eval_interval == 0)
                save = bool(t.save_interval and step % t.save_interval == 0 and step < t.steps)
                harness = self.harness is not None and self.harness.due(step)
                stop_now = stops.after_step(step)  # (a request from 2 steps ago, agreed by all ranks)
                if not (want_diag or evaluate or harness or save or stop_now or step == t.steps):
                    continue  # no host sync on this step: the GPU keeps running ahead
                rows, stopping = settle(pending, stops.flag.code, skips, self.logger, self.saver.last_good)
                stopping = max(stopping, stop_now)  # (the stop code: TIME_UP outranks a signal's)
                pending = []
                losses.extend(r["loss"] for r in rows)
                if want_diag:
                    progress.log(step, rows[-1], diag, r_mean, consumed)
                if evaluate:
                    self.evaluation.validate(step)
                if harness:
                    self.harness.run(step)
                self.saver.poll(step)  # async_save: the previous write, if every rank is done
                if stopping:
                    self.save(step, consumed, wait=True)
                    time_up = stopping >= TIME_UP  # -> exit code 75 (megaloop/training/time_limit.py)
                    self.logger.console(f"stopped ({stops.reason()}) at "
                                        f"step {step}; checkpoint saved" + ("; exit code 75" if time_up else ""))
                    write_run_status(self.out_dir, self.rank, "time_limit" if time_up else "stopped", step,
                                     EXIT_TIME_LIMIT if time_up else 0)
                    return {"ok": True, "losses": losses, "step": step, "stopped": True, "time_limit": time_up}
                if save:
                    self.save(step, consumed)
            self.saver.wait(step)
            if t.save_interval or t.steps > 0:
                if not (self.saver.last_good or "").endswith(ckpt.tag_for(step)):
                    self.save(step, consumed, wait=True)
            self.evaluation.test(step)  # data.test_data_path's sets, once
            if t.sample_tokens and not cfg.data.task:
                sample_after_training(cfg, self.te, self.tokenizer, self.state, self.logger, self.out_dir)
            write_run_status(self.out_dir, self.rank, "finished", step, 0)
        finally:
            stops.close()
            self.profiler.close()
            self.logger.close()
        return {"ok": True, "losses": losses, "step": step}
