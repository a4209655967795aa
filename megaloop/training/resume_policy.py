"""What a resumed run may change in its config, decided per field before anything is loaded.

A resume compares the config saved in the checkpoint with the one the run was started with now:

- **applied** (the new value rules from the resumed step on): the length and shape of the schedule
  (`train.steps`, `lr`, `min_lr`, `warmup_steps`, `lr_schedule`, `wsd_decay_fraction`; the learning rate
  is recomputed from the new config at the resumed step), the optimizer's hyper-parameters (`weight_decay`,
  `beta1`, `beta2`, `eps`, `grad_clip`), logging / evaluation / checkpoint intervals and their options
  (trackers, `time_limit`, `profile` too),
  speed settings that do not change the function computed (`compile`, `activation_checkpointing`,
  `optimizer_impl`, ...), the loop-count schedule (`loop.*`: a curriculum over R is legitimate; R stays a
  pure function of (seed, step, micro-batch)), and where the run reads and writes (`output_dir`, `load`,
  the index cache, the validation / test sets `data.valid_data_path` / `test_data_path`), and `init.*`
  (where a new run took its first weights from: a resume continues from the run's own checkpoint, so
  init.from is never re-applied);
- **refused** unless `--override-resume-config` is given: everything else, in particular the model
  (`model.*`), the tokenizer and the data (`data.*`: another corpus, split or sequence length would not
  continue the same stream), `train.seed`, the batch (`micro_batch_size`, `grad_accum_steps`) and the
  numeric format (`precision`, `bf16_impl`), and the training stage (`train.stage`: a resume continues
  one stage; a new stage (dsa_warmup, exit_gate) trains other parameters with another optimizer state,
  so it starts as a new run from the previous run's weights - a weights-only initialisation - and
  never as a resume). The stage-II target's `train.exit_gate_margin` / `exit_gate_slope` are applied.
- the parallel layout (`parallel.*`) is the checkpoint loader's business: `check_resumable` accepts any
  TP x PP x DP x ZeRO change that megaloop.checkpoint.relayout loads (with `grad_accum_steps` changed so
  that the global batch stays the same when DP changes) and refuses the rest before loading, with both
  layouts side by side.
"""
from __future__ import annotations

from typing import Any, List, Tuple

from megaloop.config import Config, ConfigError
from megaloop.config.schema import flat_dict

APPLIED_PREFIXES = ("loop.", "init.",  # init.*: applied when a run starts, never on a resume
                    "train.wandb.", "train.mlflow.", "train.profile.",  # trackers and profiler: this job's
                    "data.valid_data_path", "data.test_data_path")  # validation / test sets (a mapping: keys)
APPLIED = {
    "train.steps", "train.lr", "train.min_lr", "train.warmup_steps", "train.lr_schedule", "train.wsd_decay_fraction",
    "train.weight_decay", "train.beta1", "train.beta2", "train.eps", "train.grad_clip", "train.muon_lr",
    "train.muon_momentum",
    "train.log_interval", "train.eval_interval", "train.eval_iters", "train.eval_loops", "train.save_interval",
    "train.keep_checkpoints", "train.async_save", "train.verify_checkpoints", "train.max_consecutive_skips",
    "train.output_dir", "train.load", "train.auto_resume", "train.tensorboard",
    "train.peak_flops", "train.dist_timeout", "train.sample_tokens", "train.sample_prompt",
    "train.sample_temperature", "train.sample_top_k", "train.compile", "train.compile_mode",
    "train.optimizer_impl", "train.activation_checkpointing", "train.partition_activations",
    "train.cpu_checkpointing", "data.cache_dir", "data.num_workers", "train.exit_gate_margin", "train.exit_gate_slope",
    "train.loggers", "train.time_limit", "train.time_limit_margin",
    "train.eval_exits", "train.harness_interval", "train.harness_tasks", "train.harness_include_path",
    "train.harness_limit",
}
LAYOUT_PREFIX = "parallel."


class ResumeConfigError(ConfigError):
    """The resumed run's config changes fields a resume cannot apply."""


def differences(saved: Config, now: Config) -> List[Tuple[str, Any, Any]]:
    """(field, value in the checkpoint, value now) for every field that differs, layout excluded."""
    a, b = flat_dict(saved.to_dict()), flat_dict(now.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(LAYOUT_PREFIX)]


def is_applied(field: str) -> bool:
    return field in APPLIED or field.startswith(APPLIED_PREFIXES)


def check_resume_config(saved: Config, now: Config, where: str, override: bool = False) -> List[str]:
    """Raise ResumeConfigError listing the refused differences (unless override); return one line per
    difference that the resume applies (for the log)."""
    diffs = differences(saved, now)
    refused = [d for d in diffs if not is_applied(d[0])]
    if refused and not override:
        listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in refused)
        raise ResumeConfigError(f"resuming {where} with a config that changes what a resume cannot apply: {listed}. "
                                f"Restore those values, start a new run (--no-auto-resume or another "
                                f"train.output_dir), or accept them with --override-resume-config")
    model_changes = [d for d in refused if d[0].startswith("model.")]
    if model_changes:  # (only reached with --override-resume-config)
        _check_weight_shapes(saved, now, model_changes, where)
    return [f"{k}: {old!r} -> {new!r}" + ("" if is_applied(k) else " (accepted by --override-resume-config)")
            for k, old, new in diffs]


def _check_weight_shapes(saved: Config, now: Config, changes, where: str) -> None:
    """--override-resume-config accepts a model change only where the checkpoint's weights still fit the model
    (e.g. model.loops, rope_theta); a change of shapes or parameters (d_model, heads, layers, mixer, ...) is
    refused here, naming the fields, instead of a size-mismatch traceback from the loader."""
    from megaloop.checkpoint.reader import expected_shapes
    a, b = expected_shapes(saved.model), expected_shapes(now.model)
    if a == b:
        return
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    first = diff[0]
    shown = f"{first}: {list(a[first]) if first in a else 'absent'} in the checkpoint, " \
            f"{list(b[first]) if first in b else 'absent'} now"
    listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in changes)
    raise ResumeConfigError(f"resuming {where}: --override-resume-config cannot change {listed}: the checkpoint's "
                            f"weights do not fit that model ({len(diff)} tensor(s) differ, e.g. {shown}). Restore "
                            f"those values, or start a new run from the weights where they fit (init.from)")


def check_steps(step, cfg: Config, tag_dir) -> None:
    """train.steps is the run's total length: below the checkpoint's step there is nothing left to train (and
    the data built for train.steps would not reach the checkpoint's position)."""
    if step is not None and cfg.train.steps < int(step):
        raise ConfigError(f"train.steps={cfg.train.steps} is below the step of the checkpoint this run resumes "
                          f"({tag_dir}, step {step}): train.steps counts from the start of the run, so set it above "
                          f"{step} to train further, or start a new run (--no-auto-resume or another "
                          f"train.output_dir)")


def check_resumable(tag_dir, cfg: Config, state, override: bool = False) -> List[str]:
    """Before anything loads: the checkpoint's TP x PP x DP x ZeRO layout must be this run's or one that
    megaloop.checkpoint.relayout loads (refused otherwise, both layouts side by side), and the config may
    change only what a resume applies. Returns the applied changes (one line each)."""
    import copy
    from pathlib import Path

    from megaloop.checkpoint.reader import read_info
    from megaloop.checkpoint.relayout import layout_of, supported_change
    info = read_info(Path(tag_dir))
    check_steps(info.step, cfg, tag_dir)
    then = (info.tp, info.pp, info.dp, info.zero_stage)
    now = (state.tp_size, state.pp_size, state.dp_size, cfg.parallel.zero_stage)
    saved, notes = info.config, []
    if then != now:
        st, nt = info.config.train, cfg.train
        why = supported_change(info.config, cfg, then[3], now[3])
        batch_then = st.micro_batch_size * st.grad_accum_steps * then[2]
        batch_now = nt.micro_batch_size * nt.grad_accum_steps * now[2]
        if why is None and batch_then != batch_now:
            why = (f"the global batch (micro_batch_size x grad_accum_steps x data parallel) would change from "
                   f"{st.micro_batch_size} x {st.grad_accum_steps} x {then[2]} = {batch_then} to "
                   f"{nt.micro_batch_size} x {nt.grad_accum_steps} x {now[2]} = {batch_now}, and the data "
                   f"position would not continue; set train.grad_accum_steps="
                   f"{batch_then // (nt.micro_batch_size * now[2])} to keep it"
                   if batch_then % (nt.micro_batch_size * now[2]) == 0 else
                   f"the global batch {batch_then} ({st.micro_batch_size} x {st.grad_accum_steps} x {then[2]}) "
                   f"cannot be kept with micro_batch_size {nt.micro_batch_size} on {now[2]} data-parallel ranks")
        if why is not None:
            raise ConfigError(f"checkpoint {tag_dir} was saved with {layout_of(*then)}; this run is "
                              f"{layout_of(*now)}. This change is not supported: {why}. Relaunch with the "
                              f"checkpoint's layout (or export it and start a new run from the weights)")
        notes.append(f"layout: {layout_of(*then)} -> {layout_of(*now)} (weights and optimizer state resharded; "
                     f"RNG re-seeded from (seed, step))")
        if st.grad_accum_steps != nt.grad_accum_steps:  # the global batch is the same: not a batch change
            saved = copy.deepcopy(info.config)
            saved.train.grad_accum_steps = nt.grad_accum_steps
            notes.append(f"train.grad_accum_steps: {st.grad_accum_steps} -> {nt.grad_accum_steps} (the same "
                         f"global batch of {batch_now} on {now[2]} data-parallel rank(s))")
            if cfg.loop.sampling != "fixed":
                notes.append("loop counts: drawn per (step, micro-batch), so with another grad_accum_steps "
                             "the samples of a step meet other draws of R")
    return notes + check_data_fingerprint(info.data_fingerprint, cfg, str(tag_dir), override) + \
        check_resume_config(saved, cfg, str(tag_dir), override)


def check_data_fingerprint(saved_fp, cfg: Config, where: str, override: bool = False) -> List[str]:
    """The datasets behind the same data.data_path must be the ones the checkpoint was trained on (sizes,
    document count, index hash: megaloop.data.fingerprint); raise ResumeConfigError naming each changed one
    unless override (then one note line). A checkpoint saved before fingerprints were recorded is not checked."""
    from megaloop.data.fingerprint import data_fingerprint, fingerprint_changes

    if not saved_fp:
        return []
    changed = fingerprint_changes(saved_fp, data_fingerprint(cfg))
    if not changed:
        return []
    listed = "; ".join(changed)
    if not override:
        raise ResumeConfigError(f"resuming {where}: the dataset behind data.data_path is not the one the checkpoint "
                                f"was trained on: {listed}. Point data.data_path at the original files, start a new "
                                f"run (--no-auto-resume or another train.output_dir), or accept it with "
                                f"--override-resume-config")
    return [f"dataset changed: {listed} (accepted by --override-resume-config)"]


def resume_tag(t, ckpt_root, rank: int, world: int, console):
    """The tag a run continues from (train.load, else auto-resume from ckpt_root), or None: a new run.
    Collective: rank 0 verifies the checksums (megaloop.checkpoint.integrity; train.verify_checkpoints) and
    every rank gets its answer; a damaged tag of a run folder is skipped for the previous intact one, with
    a note (console); a damaged tag named by train.load is refused naming the file."""
    from megaloop.checkpoint import CheckpointError
    from megaloop.checkpoint.integrity import resolve_intact_agreed
    if not (t.load or t.auto_resume):
        return None
    try:
        tag, notes = resolve_intact_agreed(t.load or ckpt_root, required=bool(t.load), verify=t.verify_checkpoints,
                                           rank=rank, world=world)
    except CheckpointError as exc:
        if t.load:
            raise ConfigError(f"--load {t.load}: {exc}") from exc
        raise
    for note in notes:
        console(note)
    return tag
