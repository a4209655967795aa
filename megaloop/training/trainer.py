"""The pretraining run: `deepspeed pretrain_looped.py --config PATH [section.key=value ...]`.

One code path for every layout: PP = 1 uses `deepspeed.initialize` on the LoopedLM itself (ZeRO 0-3);
PP > 1 wraps the model into a `deepspeed.pipe.PipelineModule` (megaloop.parallel.pipeline) and trains
with the pipeline engine (ZeRO 0-1). The loop count R of every micro-batch comes with the data
(megaloop.training.data), so all stages / TP ranks agree and a resumed run redraws the same R.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from typing import List, Optional

import torch

from megaloop.config import Config, ConfigError, load_config, save_config
from megaloop import checkpoint as ckpt
from megaloop.training.data import (EvalBatches, TrainBatches, build_split_datasets, build_tokenizer_for,
                                    samples_needed, tokenizer_reference)
from megaloop.parallel.device import on_accelerator, zeros_on_accelerator
from megaloop.training.distributed import build_state, init_distributed, is_logging_rank
from megaloop.training.ds_config import build_ds_config, check_supported
from megaloop.model.flops import train_flops_per_token
from megaloop.training.optim import build_optimizer, build_scheduler
from megaloop.training.run_logging import RunLogger, fmt_bytes, memory_bytes


class TrainingError(RuntimeError):
    pass


EXIT_NONFINITE = 3


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain a looped LM with DeepSpeed",
                                 epilog="overrides: section.key=value, e.g. train.steps=200 parallel.zero_stage=1")
    ap.add_argument("--config", required=False, default=None, help="YAML config")
    ap.add_argument("--load", default=None, help="checkpoint root or tag directory to resume from")
    ap.add_argument("--no-auto-resume", action="store_true", help="ignore checkpoints in the output directory")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.load:
        cfg.train.load = args.load
    if args.no_auto_resume:
        cfg.train.auto_resume = False
    try:
        result = Trainer(cfg).run()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as exc:
        print(f"training stopped: {exc}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    return 0 if result.get("ok", True) else 1


# ----------------------------------------------------------------------------------------------
def _fault(kind: str) -> Optional[List[str]]:
    """Test-only fault injection: MEGALOOP_FAULT=kind:arg[:arg]."""
    spec = os.environ.get("MEGALOOP_FAULT", "")
    if not spec.startswith(kind + ":"):
        return None
    return spec.split(":")[1:]


def _quiet_deepspeed():
    """Keep the console to megaloop's lines: DeepSpeed's INFO chatter off (MEGALOOP_DS_LOG=info keeps
    it), and the known-harmless autograd warning from the pipeline's tied-weight broadcast muted."""
    import logging
    import warnings
    if os.environ.get("MEGALOOP_DS_LOG", "warning").lower() != "info":
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")


class _StopFlag:
    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ------------------------------------------------------------------------------------------
    def setup(self):
        import deepspeed
        import deepspeed.comm as dist
        from deepspeed.accelerator import get_accelerator

        cfg, t, p = self.cfg, self.cfg.train, self.cfg.parallel
        _quiet_deepspeed()
        init_distributed(t.dist_timeout)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
        acc = get_accelerator()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_supported(cfg, self.world, acc.device_name(),
                        fp16_supported=acc.is_fp16_supported(), bf16_supported=acc.is_bf16_supported())
        self.state = build_state(p)
        st = self.state
        self.pp, self.dp = st.pp_size, st.dp_size
        self.log_rank = is_logging_rank(st)
        self.out_dir = t.output_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        if self.rank == 0:
            os.makedirs(self.ckpt_root, exist_ok=True)
            save_config(cfg, os.path.join(self.out_dir, "config.yaml"))
        self.logger = RunLogger(self.out_dir, self.log_rank, t.tensorboard)
        self.logger.console(f"world {self.world}: pp {st.pp_size} x dp {st.dp_size} x tp {st.tp_size}"
                            f"{' (sequence parallel)' if st.sequence_parallel else ''}, "
                            f"zero {p.zero_stage}, {t.precision}, accelerator {acc.device_name()}, "
                            f"activation checkpointing {t.activation_checkpointing}")

        # Data (rank 0 builds the index caches first, the others then read them).
        self.tokenizer = build_tokenizer_for(cfg)
        n_train, n_valid = samples_needed(cfg, self.dp)
        if self.rank == 0:
            datasets = build_split_datasets(cfg, n_train, n_valid, self.tokenizer)
        dist.barrier()
        if self.rank != 0:
            datasets = build_split_datasets(cfg, n_train, n_valid, self.tokenizer)
        self.train_ds, self.valid_ds = datasets["train"], datasets.get("valid")
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} ids but model.vocab_size="
                              f"{cfg.model.vocab_size}")

        # Model: identical initial weights on every rank (seeded), whatever the layout.
        prepare = self._tensor_parallel_hook()
        if t.compile:  # torch.compile every transformer layer after TP, before DeepSpeed (both PP branches)
            from megaloop.model.compile import compile_after
            prepare = compile_after(prepare, cfg)

        def build_lm():
            from megaloop.model import build_model
            torch.manual_seed(t.seed)
            # Initialised on the host (the same weights on any machine), then moved to this rank's
            # device before tensor parallelism shards it: TP's set-up collectives (the replica
            # checksum, the initial-state broadcast) must see device tensors.
            return build_model(cfg).to(acc.current_device_name())

        if self.pp > 1:
            from megaloop.parallel.pipeline import build_pipeline_module
            module = build_pipeline_module(cfg, build_lm, st.topology, t.activation_checkpointing, prepare)
            if self.rank == 0:
                from megaloop.parallel.pipeline import layer_names
                names, parts = layer_names(cfg.model), module.parts
                plan = " | ".join(", ".join(names[parts[s]:parts[s + 1]]) for s in range(self.pp))
                print(f"[megaloop] pipeline stages ({p.pipeline_partition}): {plan}", flush=True)
        else:
            module = build_lm()
            module.block.activation_checkpointing = t.activation_checkpointing
            if prepare is not None:
                prepare(module)
        ckpt_fn, note = deepspeed_checkpoint_fn(t, st, acc.device_name())
        if ckpt_fn is not None:
            block = module.block if self.pp == 1 else getattr(looped_layer_of(module), "block", None)
            if block is not None:  # (a pipeline stage without the looped block has nothing to checkpoint)
                block.checkpoint_fn = ckpt_fn
            self.logger.console(note)
        # Per-rank RNG (dropout, Huginn's noise start) after init: differs across data-parallel
        # replicas, identical across TP ranks and stages of one replica.
        from megaloop.parallel.random import set_parallel_seed
        set_parallel_seed(t.seed, st)

        optimizer = build_optimizer(module, t, acc.device_name())
        scheduler = build_scheduler(optimizer, t)
        # DeepSpeed clips fp32 / ZeRO-0 gradients without recording the norm: clip ourselves there.
        self.self_clip = p.zero_stage == 0 and (t.precision == "fp32" or
                                                (t.precision == "bf16" and t.bf16_impl == "autocast"))
        self._last_norm = None
        self._aux_scale = None
        if self.self_clip and t.grad_clip > 0:
            optimizer.register_step_pre_hook(self._clip_hook)
        ds_config = build_ds_config(cfg, self.dp, clip_in_engine=not self.self_clip)
        mpu = st.grid if (st.tp_size > 1 and self.pp == 1) else None
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config, mpu=mpu)
        self.module = module
        self.model_params = sum(p.numel() for p in module.parameters())
        from megaloop.training.optim import optimizer_kernel
        recipe = {"bf16": f"bf16 ({t.bf16_impl})"}.get(t.precision, t.precision)
        self.logger.console(f"precision {recipe}, AdamW {optimizer_kernel(t.optimizer_impl, acc.device_name())}"
                            f"{', torch.compile per layer' if t.compile else ''}")
        # Kernel choices, made (and probed) now on every rank, so a fallback warns before step 1.
        from megaloop.ops.fused import describe_norm_choice
        from megaloop.ops.gated_delta import describe_kernel_choice
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
        device = acc.current_device_name()
        self.logger.console(f"{describe_kernel_choice(cfg, device, compute)}; {describe_norm_choice(device, compute)}")

    def _tensor_parallel_hook(self):
        if self.state.tp_size == 1:
            return None
        try:
            from megaloop.parallel.apply_tp import apply_tensor_parallel
        except ImportError as exc:
            raise ConfigError(f"parallel.tensor_parallel={self.state.tp_size} needs megaloop.parallel.apply_tp "
                              f"(not available: {exc}); use tensor_parallel 1") from None
        state = self.state

        def prepare(lm):
            apply_tensor_parallel(lm, state)  # (also installs the TP gradient reduction)
        return prepare

    # ------------------------------------------------------------------------------------------
    def _clip_hook(self, optimizer, args, kwargs):
        """Pre-clip global grad norm over this replica (all pipeline stages / TP ranks, each distinct
        element once: megaloop.parallel.grad_norm), then clip. Gradients are already averaged over data
        parallel. On the device: the norm is read on logging steps only."""
        from megaloop.parallel.grad_norm import grad_norm_
        params, seen = [], set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        group = self.state.mp_group if (self.pp > 1 or self.state.tp_size > 1) else None
        skip = self._is_tied_duplicate if self.pp > 1 else None
        self._last_norm = grad_norm_(params, self.cfg.train.grad_clip, self.state.tp_rank, group, skip)

    def _is_tied_duplicate(self, p) -> bool:
        """The tied embedding lives on the first and the last stage with identical (all-reduced)
        gradients: count it on the first of its stages only."""
        if not hasattr(self, "_tied_dups"):
            self._tied_dups = set()
            mod = self.module
            for key, tied in getattr(mod, "tied_modules", {}).items():
                ranks = mod.tied_comms[key]["ranks"] if key in getattr(mod, "tied_comms", {}) else []
                if ranks and self.rank != min(ranks):
                    for q in tied.parameters():
                        self._tied_dups.add(id(q))
        return id(p) in self._tied_dups

    def grad_norm(self):
        """This step's pre-clip global grad norm: a device tensor (read on logging steps), a float or None."""
        n = self._last_norm if self.self_clip else self.engine.get_global_grad_norm()
        return n.detach().clone() if isinstance(n, torch.Tensor) else n

    def loss_scale(self) -> Optional[float]:
        if self.cfg.train.precision != "fp16":
            return None
        opt = self.engine.optimizer
        for name in ("cur_scale", "loss_scale"):
            v = getattr(opt, name, None)
            if isinstance(v, (int, float, torch.Tensor)):
                return float(v)
        return None

    # ------------------------------------------------------------------------------------------
    def resume(self) -> dict:
        t = self.cfg.train
        tag_dir = None
        if t.load:
            try:
                tag_dir = ckpt.resolve(t.load)
            except ckpt.CheckpointError as exc:
                raise ConfigError(f"--load {t.load}: {exc}") from exc
        elif t.auto_resume:
            tag_dir = ckpt.resolve(self.ckpt_root, required=False)
        if tag_dir is None:
            return {"step": 0, "consumed_samples": 0}
        client = ckpt.load_training(self.engine, tag_dir, self.rank)
        self.last_good = os.path.abspath(tag_dir)
        self.logger.console(f"resumed from {self.last_good} at step {client.get('step')}")
        return client

    def save(self, step: int, consumed: int) -> str:
        t = self.cfg.train
        client = {"step": step, "consumed_samples": consumed, "config": self.cfg.to_dict(),
                  "tokenizer": tokenizer_reference(self.cfg), "loop_sampling": {"seed": t.seed, "step": step},
                  "megaloop_format": 1}
        hook = None
        fault = _fault("die_in_save")
        if fault and int(fault[0]) == step:
            def hook(tag):
                os._exit(17)
        self.last_good = ckpt.save_training(self.engine, self.ckpt_root, step, client, self.rank, t.keep_checkpoints,
                                            hook)
        self.logger.console(f"saved checkpoint {self.last_good}")
        return self.last_good

    # ------------------------------------------------------------------------------------------
    def _looped_layer(self):
        if self.pp > 1:
            return looped_layer_of(self.module)
        return None

    def train_step(self, batches: TrainBatches, step: int, want_diag: bool):
        """One optimizer step. Returns (loss averaged over the global batch, R list, diagnostics|None)."""
        import deepspeed.comm as dist
        from megaloop.model.sparse_attention import AuxLossInjector
        t = self.cfg.train
        # Aux losses injected in backward (DSA's indexer loss) follow the main loss's gradient scale
        # (1/gas x the fp16 loss scale; constant within a step: the scale only changes in step()).
        # Constant unless fp16 loss scaling moves it: computed once (each computation is a host sync).
        if self._aux_scale is None or t.precision == "fp16":
            self._aux_scale = main_loss_backward_scale(self.engine)
        AuxLossInjector.set_main_loss_backward_scale(self._aux_scale)
        if self.pp > 1:
            layer = self._looped_layer()
            if layer is not None:
                layer.want_diagnostics = want_diag
                layer.last_diagnostics = None
            rs = []
            it = _Recording(batches, rs)
            loss = self.engine.train_batch(data_iter=it)
            diag = layer.last_diagnostics if layer is not None else None
            if layer is not None:
                layer.want_diagnostics = False
            return loss.detach().float().reshape(()), rs, diag
        losses, rs, diag = [], [], None
        for m in range(t.grad_accum_steps):
            (tokens, loops), labels = next(batches)
            total, grad = int(loops[0]), int(loops[1])
            rs.append(total)
            device = self.engine.device
            out = self.engine(tokens.to(device, non_blocking=True), labels=labels.to(device, non_blocking=True),
                              loops=total, grad_loops=grad,
                              return_diagnostics=want_diag and m == t.grad_accum_steps - 1)
            self.engine.backward(out.loss)
            self.engine.step()
            losses.append(out.loss.detach().float())
            if out.diagnostics is not None:
                diag = out.diagnostics
        loss = torch.stack(losses).mean()  # on the device: read on logging steps only
        if self.dp > 1:
            dist.all_reduce(loss, group=self.state.dp_group)
            loss = loss / self.dp
        return loss, rs, diag

    def evaluate(self) -> Optional[float]:
        import deepspeed.comm as dist
        t = self.cfg.train
        if self.valid_ds is None:
            return None
        loops = t.eval_loops or self.cfg.model.loops
        batches = EvalBatches(self.valid_ds, self.cfg, self.state.dp_rank, self.dp, t.eval_iters, loops)
        if self.pp > 1:
            loss = self.engine.eval_batch(batches, num_micro_batches=t.eval_iters)
            self.engine.train()
            return float(loss)
        self.engine.eval()
        total = zeros_on_accelerator(1)
        with torch.no_grad():
            for (tokens, lp), labels in batches:
                out = self.engine(tokens.to(self.engine.device), labels=labels.to(self.engine.device),
                                  loops=int(lp[0]))
                total += out.loss.detach().float()
        self.engine.train()
        total /= t.eval_iters
        if self.dp > 1:
            dist.all_reduce(total, group=self.state.dp_group)
            total /= self.dp
        return float(total)

    def _gather_stats(self, diag, rs) -> dict:
        """Collective at log steps: per-loop diagnostics from the stage holding the looped block, and
        every rank's memory, to the logging rank."""
        import deepspeed.comm as dist
        K = max(self.cfg.loop.max, self.cfg.model.loops, self.cfg.train.eval_loops or 1)
        keys = ("residual_norm", "state_norm", "state_delta")
        # [n loops | K per key | has injection_spectral_norm, its value | memory per rank]
        sn = 1 + 3 * K
        mem = sn + 2
        vec = zeros_on_accelerator(mem + self.world, dtype=torch.float64)
        holds_block = self.pp == 1 or self._looped_layer() is not None
        if diag is not None and holds_block and self.state.dp_rank == 0 and self.state.tp_rank == 0:
            n = int(diag["residual_norm"].numel())
            vec[0] = n
            for i, k in enumerate(keys):
                vec[1 + i * K: 1 + i * K + min(n, K)] = diag[k][:K].double()
            if "injection_spectral_norm" in diag:  # Parcae: one number (max |A_bar|), shape (1,)
                vec[sn] = 1.0
                vec[sn + 1] = float(diag["injection_spectral_norm"].reshape(-1)[0])
        vec[mem + self.rank] = memory_bytes()
        dist.all_reduce(vec)
        vec = vec.cpu()  # (one host read per logging step)
        n = int(vec[0])
        out = {"memory": vec[mem:].tolist()}
        if n:
            out["diag"] = {k: vec[1 + i * K: 1 + i * K + min(n, K)].tolist() for i, k in enumerate(keys)}
        if vec[sn] > 0:
            out["injection_spectral_norm"] = float(vec[sn + 1])
        return out

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.setup()
        cfg, t = self.cfg, self.cfg.train
        self.last_good = None
        client = self.resume()
        step = int(client.get("step", 0))
        consumed = int(client.get("consumed_samples", 0))
        global_batch = t.micro_batch_size * t.grad_accum_steps * self.dp
        batches = TrainBatches(self.train_ds, cfg, self.state.dp_rank, self.dp, consumed)
        stop = _StopFlag()
        stop.install()
        tokens_per_step = global_batch * cfg.data.seq_len
        interval_t0, interval_tokens, interval_flops = time.time(), 0, 0.0
        losses, pending, ok = [], [], True
        try:
            while step < t.steps:
                die = _fault("die_at_step")
                if die and int(die[0]) == step and int(die[1]) == self.rank:
                    os._exit(13)
                want_diag = (step + 1) % t.log_interval == 0
                skipped_before = getattr(self.engine, "skipped_steps", 0)
                loss, rs, diag = self.train_step(batches, step, want_diag)
                nan = _fault("nan_at_step")
                if nan and int(nan[0]) == step:
                    loss = loss * float("nan")
                skipped = getattr(self.engine, "skipped_steps", 0) > skipped_before
                step += 1
                consumed += global_batch
                r_mean = sum(rs) / max(1, len(rs))
                if self.log_rank:
                    grads = min(r_mean, cfg.loop.backprop_loops or r_mean)
                    interval_flops += tokens_per_step * train_flops_per_token(cfg, r_mean, grads, cfg.data.seq_len)
                interval_tokens += tokens_per_step
                pending.append({"step": step, "loss": loss, "lr": self.engine.get_lr()[0], "R": rs,
                                "grad_norm": self.grad_norm(), "loss_scale": self.loss_scale(), "skipped": skipped})
                evaluate = bool(t.eval_interval and step % t.eval_interval == 0)
                save = bool(t.save_interval and step % t.save_interval == 0 and step < t.steps)
                if not (want_diag or evaluate or save or step == t.steps):
                    continue  # no host sync on this step: the GPU keeps running ahead
                # Settle the steps since the last sync: one device->host read of their losses and grad
                # norms, and one all-reduce of (stop signal on any rank, non-finite loss on any rank).
                rows, stopping = self._settle(pending, stop)
                pending = []
                losses.extend(r["loss"] for r in rows)
                if want_diag:
                    stats = self._gather_stats(diag, rs)
                    elapsed = time.time() - interval_t0
                    self._log(step, rows[-1], stats, interval_tokens / elapsed, interval_flops / elapsed, r_mean)
                    interval_t0, interval_tokens, interval_flops = time.time(), 0, 0.0
                if evaluate:
                    vl = self.evaluate()
                    if vl is not None:
                        self.logger.console(f"step {step} | validation loss {vl:.4f} (R={t.eval_loops or cfg.model.loops})")
                        self.logger.scalars(step, {"loss": vl}, prefix="valid/")
                        self.logger.record({"step": step, "valid_loss": vl})
                if stopping:
                    self.save(step, consumed)
                    self.logger.console(f"stopped by signal at step {step}; checkpoint saved")
                    return {"ok": True, "losses": losses, "step": step, "stopped": True}
                if save:
                    self.save(step, consumed)
            if t.save_interval or t.steps > 0:
                if self.last_good is None or not self.last_good.endswith(ckpt.tag_for(step)):
                    self.save(step, consumed)
            if t.sample_tokens:
                self.sample()
        finally:
            stop.restore()
            self.logger.close()
        return {"ok": ok, "losses": losses, "step": step}

    def _settle(self, pending: list, stop: "_StopFlag"):
        """Read the pending steps' device values in one transfer and agree across ranks on stopping.

        Called on logging, evaluation and checkpoint steps and at the end (never per step): a stop
        signal is acted on at the next of those steps, and a non-finite loss stops the run there,
        naming the first bad step, before any checkpoint could save it. Returns (rows with floats,
        stop requested on some rank)."""
        import deepspeed.comm as dist
        losses = torch.stack([r["loss"].detach().float().reshape(()) for r in pending])
        norms = [r["grad_norm"] for r in pending]
        norm_t = [i for i, n in enumerate(norms) if isinstance(n, torch.Tensor)]
        flags = torch.stack([on_accelerator(1.0 if stop.signum is not None else 0.0),
                             (~torch.isfinite(losses)).any().float()])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        parts = [flags, losses] + ([torch.stack([norms[i].detach().float().reshape(()) for i in norm_t])]
                                   if norm_t else [])
        host = torch.cat(parts).tolist()  # the one host sync
        stopping, any_nonfinite = host[0] > 0, host[1] > 0
        loss_vals = host[2:2 + len(pending)]
        for i, v in zip(norm_t, host[2 + len(pending):]):
            norms[i] = v
        rows = []
        for r, lv, gn in zip(pending, loss_vals, norms):
            row = dict(r, loss=lv, grad_norm=None if gn is None else float(gn))
            rows.append(row)
            self.logger.record(row)
            if math.isfinite(lv):
                continue
            if self.cfg.train.precision == "fp16" and row["skipped"]:
                self.logger.console(f"step {row['step']}: non-finite loss, step skipped by fp16 loss scaling "
                                    f"(scale now {row['loss_scale']})")
                continue
            raise TrainingError(f"non-finite loss ({lv}) at step {row['step']}; last good checkpoint: "
                                f"{self.last_good or 'none (no checkpoint saved yet)'}")
        if any_nonfinite and all(math.isfinite(v) for v in loss_vals):
            raise TrainingError(f"non-finite loss on another rank by step {pending[-1]['step']}; last good "
                                f"checkpoint: {self.last_good or 'none (no checkpoint saved yet)'}")
        return rows, stopping

    def _log(self, step, row, stats, tok_s, flop_s, r_mean):
        t = self.cfg.train
        share = (flop_s / self.world / t.peak_flops) if t.peak_flops else None
        mem = stats["memory"]
        scalars = {"loss": row["loss"], "lr": row["lr"], "grad_norm": row["grad_norm"],
                   "loss_scale": row["loss_scale"], "tokens_per_s": tok_s, "flops_per_s": flop_s,
                   "flops_per_s_per_device": flop_s / self.world, "peak_flops_share": share,
                   "loops_R": r_mean, "memory_max_bytes": max(mem)}
        self.logger.scalars(step, scalars)
        self.logger.record({"step": step, "tokens_per_s": tok_s, "flops_per_s": flop_s, "peak_flops_share": share,
                            "memory_max_bytes": max(mem)})
        for r, m in enumerate(mem):
            self.logger.scalars(step, {f"rank{r}": m}, prefix="memory/")
        diag = stats.get("diag")
        if diag:
            for k, vals in diag.items():
                for i, v in enumerate(vals):
                    self.logger.scalars(step, {f"{k}/loop{i + 1:02d}": v}, prefix="loops/")
        sn = stats.get("injection_spectral_norm")
        if sn is not None:
            self.logger.scalars(step, {"injection_spectral_norm": sn}, prefix="loops/")
            self.logger.record({"step": step, "injection_spectral_norm": sn})
        gn = row["grad_norm"]
        parts = [f"step {step}/{t.steps}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
                 f"gnorm {gn:.3f}" if gn is not None else "gnorm -", f"R {r_mean:g}",
                 f"tok/s {tok_s:,.0f}", f"FLOP/s {flop_s:.3g}" + (f" ({100 * share:.1f}% of peak)" if share else ""),
                 f"mem max {fmt_bytes(max(mem))}"]
        if row["loss_scale"] is not None:
            parts.append(f"scale {row['loss_scale']:g}")
        if diag:
            parts.append("|x(k)| " + " ".join(f"{v:.1f}" for v in diag["residual_norm"]))
        if sn is not None:
            parts.append(f"inj spectral norm {sn:.4f}")  # Parcae: max |A_bar| (< 1: a stable recurrence)
        self.logger.console(" | ".join(parts))

    # ------------------------------------------------------------------------------------------
    def sample(self):
        """Continue train.sample_prompt with the trained weights (gathered to rank 0): top-k sampling at
        train.sample_temperature (seeded), or greedy with temperature 0."""
        import torch.distributed as tdist
        cfg = self.cfg
        if self.state.tp_size > 1 or cfg.parallel.zero_stage == 3:
            self.logger.console("sample skipped: needs tensor_parallel 1 and zero_stage < 3")
            return
        if self.pp > 1:
            from megaloop.parallel.pipeline import full_state_dict_of_stage
            mine = full_state_dict_of_stage(self.module) if self.state.dp_rank == 0 else {}
            mine = {k: v.detach().float().cpu() for k, v in mine.items()}
            gathered = [None] * self.world if self.rank == 0 else None
            tdist.gather_object(mine, gathered, dst=0)
            if self.rank != 0:
                return
            sd = {}
            for part in gathered:
                sd.update(part)
        else:
            if self.rank != 0:
                return
            sd = {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        from megaloop.model import build_model
        lm = build_model(cfg)
        missing, unexpected = lm.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "head.weight" and cfg.model.tie_embeddings)]
        if missing:
            print(f"[megaloop] sample: missing weights {missing[:4]}...", flush=True)
        lm.eval()
        ids = self.tokenizer.encode(cfg.train.sample_prompt)
        loops = cfg.train.eval_loops or cfg.model.loops
        t = cfg.train
        gen = torch.Generator().manual_seed(t.seed)
        with torch.no_grad():
            for _ in range(t.sample_tokens):
                window = torch.tensor([ids[-cfg.data.seq_len:]])
                logits = lm(window, loops=loops).logits[0, -1].float()
                if t.sample_temperature <= 0:
                    ids.append(int(logits.argmax()))
                    continue
                if t.sample_top_k > 0:
                    kth = torch.topk(logits, min(t.sample_top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits / t.sample_temperature, dim=-1)
                ids.append(int(torch.multinomial(probs, 1, generator=gen)))
        text = self.tokenizer.decode(ids)
        print(f"[megaloop] sample (R={loops}): {text!r}", flush=True)
        with open(os.path.join(self.out_dir, "sample.txt"), "w") as f:
            f.write(text + "\n")


def looped_layer_of(module):
    from megaloop.parallel.pipeline import looped_layer
    return looped_layer(module)


class _TensorParallelMPU:
    """The `mpu` API deepspeed.checkpointing reads (it prefers get_tensor_model_parallel_*), from
    megaloop's ParallelState. DeepSpeed's PipelineParallelGrid has the rank and world-size getters
    but no get_tensor_model_parallel_group, and its get_model_parallel_* span pipe x tensor."""

    def __init__(self, state):
        self.state = state

    def get_tensor_model_parallel_rank(self):
        return self.state.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.state.tp_size

    def get_tensor_model_parallel_group(self):
        return self.state.tp_group

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_data_parallel_rank(self):
        return self.state.dp_rank

    def get_data_parallel_world_size(self):
        return self.state.dp_size

    def get_data_parallel_group(self):
        return self.state.dp_group


def deepspeed_checkpoint_fn(train_cfg, state, device_name: str):
    """(checkpoint function, console note) for the looped block when train.partition_activations or
    train.cpu_checkpointing is on, else (None, None): the block keeps torch.utils.checkpoint.

    Configures DeepSpeed's activation checkpointing (module-level state in
    deepspeed.checkpointing) with the run's tensor-parallel group as its `mpu` (activations are
    partitioned over the TP ranks only, never over pipeline stages) and returns its
    `non_reentrant_checkpoint`.

    RNG: DeepSpeed's checkpoint saves and restores the CPU and the accelerator default generators
    around recomputation (on the cpu accelerator both are torch's default generator) plus its own
    model-parallel tracker, which megaloop leaves empty: megaloop.parallel.random derives its
    model-parallel stream from the default generator, so recomputed dropout replays exactly.

    cpu_checkpointing on the cpu accelerator: activations already live in host memory, and
    DeepSpeed's blocking offload path (the one a synchronized device takes) would hand the
    checkpoint the very tensor it then empties (`.to('cpu')` of a CPU tensor is itself), losing the
    saved input. So there it is a no-op (DeepSpeed's checkpoint without offload); with
    partition_activations the partitions are copies, and DeepSpeed's cpu_checkpointing is kept.
    """
    t = train_cfg
    if not (t.partition_activations or t.cpu_checkpointing):
        return None, None
    import deepspeed
    partition = bool(t.partition_activations)
    offload = bool(t.cpu_checkpointing)
    what = []
    if partition:
        what.append(f"activations partitioned over the {state.tp_size} tensor-parallel ranks")
    if offload and device_name == "cpu" and not partition:
        offload = False
        what.append("cpu_checkpointing is a no-op on the cpu accelerator (activations are host memory already)")
    elif offload:
        what.append("checkpointed activations offloaded to CPU")
    deepspeed.checkpointing.configure(mpu_=_TensorParallelMPU(state), partition_activations=partition,
                                      checkpoint_in_cpu=offload)
    return deepspeed.checkpointing.non_reentrant_checkpoint, "DeepSpeed activation checkpointing: " + "; ".join(what)


def main_loss_backward_scale(engine) -> float:
    """The factor on the main loss's gradient when DeepSpeed runs its backward: what
    DeepSpeedEngine.backward(loss) (scale_wrt_gas=True; the pipeline engine's last stage calls it
    too, and earlier stages receive gradients already so scaled) applies - 1 / gradient_accumulation_steps,
    then the ZeRO / bf16 optimizer's `scale_if_loss` (the fp16 loss scale) or ZeRO 0's torch-autocast
    GradScaler - computed by running DeepSpeed's own scaling on a probe loss of 1."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    probe = torch.ones((), device=engine.device, requires_grad=True) * 1.0  # a scalar "loss" with a grad_fn
    scaled = probe / engine.gradient_accumulation_steps()
    opt = engine.optimizer
    if isinstance(opt, ZeROOptimizer):
        scaled = opt.scale_if_loss(scaled)
    elif getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        scaled = engine.torch_autocast_z0_gradscaler.scale(scaled)
    return float(scaled.detach().float().cpu())


class _Recording:
    """Passes batches through, recording each micro-batch's R (for the logs)."""

    def __init__(self, it, rs: list):
        self.it, self.rs = it, rs

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.rs.append(int(batch[0][1][0]))
        return batch
