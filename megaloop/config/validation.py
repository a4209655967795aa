"""Validation: every impossible value or combination fails in `validate`, up front, naming the fields."""
from __future__ import annotations

import difflib
import functools
import math
import typing
from typing import List, Optional, Union

from megaloop.config.evaluation import check_evaluation
from megaloop.config.operations import check_operations
from megaloop.config.recipes import recipe_values
from megaloop.config.schema import (ARCHITECTURES, FLT_FAMILY, INJECTIONS, Config, ConfigError, ModelConfig,
                                    mixer_pattern)


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ----------------------------------------------------------------------------------------------
# Validation: every impossible value or combination fails here, naming the fields.


def _choice(value, options, name):
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not one of {list(options)}{_suggest(str(value), options)}")


# The allowed range of every int / float field, checked before any combination: (low, high, low
# inclusive, high inclusive), None = unbounded. Floats must also be finite; an Optional field may be null.
# tests/test_config_strict.py fails for a numeric field missing here.
_GT0, _GE0, _GE1 = (0, None, False, False), (0, None, True, False), (1, None, True, False)
_UNIT_HALF_OPEN = (0, 1, True, False)  # [0, 1)
NUMERIC_RANGES = {
    "model.vocab_size": _GT0, "model.pad_vocab_multiple": _GE1, "model.max_seq_len": _GT0,
    "model.d_model": _GT0, "model.n_heads": _GT0, "model.n_kv_heads": _GT0, "model.head_dim": _GT0,
    "model.ffn_hidden": _GT0, "model.norm_eps": _GT0, "model.rope_theta": _GT0, "model.logit_softcap": _GT0,
    "model.init_std": _GT0, "model.dropout": _UNIT_HALF_OPEN, "model.conv_size": _GT0, "model.gdn_expand_v": _GT0,
    "model.gdn_chunk_size": _GT0, "model.window": _GT0, "model.dsa_topk": _GT0, "model.dsa_index_heads": _GT0,
    "model.dsa_index_dim": _GT0, "model.dsa_indexer_loss_coef": _GE0,
    "model.dsa_index_rope_dim": _GE0, "model.n_prelude": _GE0,
    "model.n_loop": _GT0, "model.n_coda": _GE0, "model.loops": _GT0, "model.max_loops": _GT0,
    "model.state_init_std": _GT0, "model.parcae_init_decay": (0, 1, False, False), "model.embed_scale": _GT0,
    "loop.mean": _GE1, "loop.sigma": _GE0, "loop.min": _GE1, "loop.max": _GE1, "loop.backprop_loops": _GE1,
    "loop.exit_entropy_weight": _GE0,
    "data.seq_len": _GT0, "data.num_workers": _GE0, "parallel.expected_world_size": _GE0,
    "train.seed": (0, 2 ** 32 - 1, True, True),  # numpy's RandomState takes [0, 2**32)
    "train.steps": _GT0, "train.micro_batch_size": _GT0, "train.grad_accum_steps": _GT0, "train.lr": _GT0,
    "train.min_lr": _GE0, "train.warmup_steps": _GE0, "train.wsd_decay_fraction": (0, 1, False, True),
    "train.weight_decay": _GE0, "train.beta1": _UNIT_HALF_OPEN, "train.beta2": _UNIT_HALF_OPEN,
    "train.eps": _GT0, "train.grad_clip": _GE0,  # 0 = no clipping
    "train.muon_lr": _GT0, "train.muon_momentum": _UNIT_HALF_OPEN,
    "train.log_interval": _GT0, "train.eval_interval": _GE0, "train.eval_iters": _GE0,
    "train.save_interval": _GE0, "train.keep_checkpoints": _GE0, "train.max_consecutive_skips": _GT0,
    "train.loss_scale": _GE0, "train.initial_scale_power": (0, 64, True, True), "train.peak_flops": _GT0,
    "train.dist_timeout": _GT0, "train.sample_tokens": _GE0, "train.sample_temperature": _GE0,  # 0 = greedy
    "train.sample_top_k": _GE0,  # 0 = no top-k
    "train.exit_gate_margin": _GE0, "train.exit_gate_slope": _GT0,
    "train.distill.kl_weight": _GE0, "train.distill.ce_weight": _GE0, "train.distill.temperature": _GT0,
    "train.distill.warmup_steps": _GE0,
    "train.diag_interval": _GE0,  # 0 = off
    "train.time_limit_margin": _GE0, "train.profile.start": _GE1, "train.profile.steps": _GE0,  # 0 = off
    "train.harness_interval": _GE0, "train.harness_limit": _GT0,  # (train.eval_loops: check_evaluation)
    "parallel.tensor_parallel": _GT0, "parallel.pipeline_parallel": _GT0, "parallel.zero_stage": (0, 3, True, True),
}



def _check_optimizer(t, p) -> None:
    _choice(t.optimizer, ("adamw", "muon"), "train.optimizer")
    if t.optimizer != "muon":
        return
    if p.tensor_parallel > 1:
        raise ConfigError(f"train.optimizer=muon with parallel.tensor_parallel={p.tensor_parallel}: Muon "
                          f"orthogonalises each whole weight matrix, and a TP rank holds a shard (orthogonalising "
                          f"shards is another optimizer, not TP=1's); use tensor_parallel 1 (pipeline and data "
                          f"parallelism work)")
    if p.zero_stage != 0:
        raise ConfigError(f"train.optimizer=muon with parallel.zero_stage={p.zero_stage}: ZeRO hands the optimizer "
                          f"flat partitions, not matrices; use zero_stage 0")
    if not (t.precision == "fp32" or (t.precision == "bf16" and t.bf16_impl == "autocast")):
        raise ConfigError(f"train.optimizer=muon with train.precision={t.precision!r}"
                          + (f" (bf16_impl {t.bf16_impl!r})" if t.precision == "bf16" else "")
                          + ": DeepSpeed wraps the optimizer there in its own mixed-precision optimizer; use fp32 or "
                          "bf16 with bf16_impl autocast")

def _range_text(low, high, low_in, high_in) -> str:
    if low is not None and high is not None:
        return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
    if low is not None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"{'<=' if high_in else '<'} {high}"


@functools.lru_cache(maxsize=None)
def _optional_fields(cls) -> frozenset:
    return frozenset(k for k, v in typing.get_type_hints(cls).items() if typing.get_origin(v) is Union)


def _check_ranges(cfg: Config) -> None:
    for dotted, (low, high, low_in, high_in) in NUMERIC_RANGES.items():
        *path, name = dotted.split(".")
        section = functools.reduce(getattr, path, cfg)
        value = getattr(section, name)
        optional = name in _optional_fields(type(section))
        if value is None and optional:
            continue
        finite = not isinstance(value, float) or math.isfinite(value)
        ok = finite and (low is None or (value >= low if low_in else value > low)) and \
            (high is None or (value <= high if high_in else value < high))
        if not ok:
            what = "a finite number " if isinstance(value, float) else ""
            raise ConfigError(f"{dotted} must be {what}{_range_text(low, high, low_in, high_in)}"
                              f"{' or null' if optional else ''}, got {value!r}")


def check_converted_pattern(spec: str, m: ModelConfig) -> None:
    """init.convert_mixers must give the looped layers the pattern the run's model.mixer gives (the converted
    model is the run's model; megaloop/checkpoint/convert_mixers.py)."""
    try:
        want = mixer_pattern(str(spec), m.n_loop, m.linear_mixer)
    except ConfigError as exc:
        raise ConfigError(f"init.convert_mixers={spec!r}: {exc}") from None
    have = mixer_pattern(m.mixer, m.n_loop, m.linear_mixer)
    if want != have:
        raise ConfigError(f"init.convert_mixers={spec!r} gives the looped layers {','.join(want)}, but model.mixer="
                          f"{m.mixer!r} gives {','.join(have)}: set model.mixer to {','.join(want)!r} (the "
                          f"converted model is the run's model)")


def validate(cfg: Config) -> None:
    m, lp, t, p = cfg.model, cfg.loop, cfg.train, cfg.parallel
    _check_ranges(cfg)
    check_operations(t)  # loggers, trackers, time limit, profiler (megaloop/config/operations.py)
    _choice(m.mlp, ("swiglu", "relu2"), "model.mlp")
    _choice(m.norm_style, ("pre", "sandwich", "huginn"), "model.norm_style")
    _choice(m.arch, ARCHITECTURES, "model.arch")
    _choice(m.injection, INJECTIONS, "model.injection")
    _choice(m.recall, ("standard", "internal"), "model.recall")
    _choice(m.internal_recall_site, ("pre_attn", "pre_mlp"), "model.internal_recall_site")
    _choice(m.internal_recall_layers, ("first", "all"), "model.internal_recall_layers")
    _choice(m.normalization, ("inner", "outer"), "model.normalization")
    _choice(m.state_init, ("embed", "zeros", "noise"), "model.state_init")
    _choice(m.gdn_kernel, ("auto", "fla", "torch"), "model.gdn_kernel")
    _choice(m.init_scheme, ("normal", "nanochat"), "model.init_scheme")
    recipe_values(m.recipe)  # an unknown name: one line naming the recipes
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
                          f"set model.head_dim explicitly")
    if m.attn_head_dim % 2:
        raise ConfigError(f"head dim {m.attn_head_dim} must be even for RoPE (model.d_model/model.n_heads)")
    if not float(m.attn_head_dim * m.gdn_expand_v).is_integer():
        raise ConfigError(f"model.gdn_expand_v={m.gdn_expand_v} must give an integer value head dim "
                          f"(head dim {m.attn_head_dim})")
    if m.loops > m.max_loops and m.loop_residual_gate:
        raise ConfigError(f"model.loops={m.loops} exceeds model.max_loops={m.max_loops} (per-loop gate table)")
    # Combinations that do not apply to the chosen architecture.
    if m.arch in FLT_FAMILY:
        if m.injection != "none":
            raise ConfigError(
                f"model.injection={m.injection!r} does not apply to model.arch={m.arch!r}: the FLT family "
                f"injects the previous loop itself (attention/residual injection); use injection: none")
        if m.recall != "standard":
            raise ConfigError(f"model.recall={m.recall!r} does not apply to model.arch={m.arch!r}")
        if m.normalization != "outer":
            raise ConfigError(f"model.arch={m.arch!r} always carries h(k) = norm(x(k)); "
                              f"model.normalization must be 'outer'")
        if m.state_init != "embed":
            raise ConfigError(f"model.state_init={m.state_init!r} does not apply to model.arch={m.arch!r} "
                              f"(every loop restarts from norm(e))")
    if m.recall == "internal" and m.injection not in ("add",):
        raise ConfigError(f"model.recall='internal' adds e inside the block; it needs model.injection='add' "
                          f"(got {m.injection!r})")
    if m.injection == "parcae" and m.normalization == "outer":
        raise ConfigError("model.injection='parcae' is a stable linear recurrence on an un-normalised state; "
                          "set model.normalization='inner'")
    if m.share_outer_final_norm and m.normalization != "outer":
        raise ConfigError("model.share_outer_final_norm needs model.normalization='outer'")
    if m.share_outer_final_norm and m.n_coda:
        raise ConfigError("model.share_outer_final_norm (Ouro) feeds the final norm back into the loop; "
                          f"it needs model.n_coda=0, got {m.n_coda}")
    if m.embed_scale != 1 and m.embed_norm:
        raise ConfigError(f"model.embed_scale={m.embed_scale} has no effect with model.embed_norm=true (the norm "
                          f"undoes the scale); set model.embed_norm=false (Huginn) or model.embed_scale=1")
    if m.coda_norm and m.share_outer_final_norm:
        raise ConfigError("model.coda_norm: with model.share_outer_final_norm (Ouro) the loop's output already "
                          "carries the final norm; set model.coda_norm=false")
    if isinstance(m.mixer, str) and m.mixer.strip().isdigit():
        raise ConfigError(f"model.mixer={m.mixer!r} looks like a number: quote ratios in YAML (mixer: \"4:1\"), "
                          f"which YAML 1.1 otherwise reads as a base-60 integer")
    causal_problem = noncausal_problem(m, cfg)
    if causal_problem:
        raise ConfigError(causal_problem)
    _choice(m.dsa_indexer_form, ("v3.2", "legacy"), "model.dsa_indexer_form")
    if m.dsa_indexer_form == "legacy" and m.dsa_index_rope_dim:
        raise ConfigError(f"model.dsa_index_rope_dim={m.dsa_index_rope_dim} applies to model.dsa_indexer_form="
                          f"'v3.2' only (the legacy indexer has no RoPE)")
    if m.dsa_rope_dim % 2 or m.dsa_rope_dim > m.dsa_index_dim:
        raise ConfigError(f"model.dsa_index_rope_dim={m.dsa_rope_dim} must be even and at most "
                          f"model.dsa_index_dim={m.dsa_index_dim}")
    if m.value_embeddings:
        _check_value_embeddings(m, p)
    # Loop schedule.
    _choice(lp.sampling, ("fixed", "poisson", "lognormal_poisson"), "loop.sampling")
    _choice(lp.loss, ("last", "mean", "last_third", "exit_weighted"), "loop.loss")
    if lp.sampling == "fixed" and not float(lp.mean).is_integer():
        raise ConfigError(f"loop.sampling='fixed' needs an integer loop.mean, got {lp.mean}")
    if not 1 <= lp.min <= lp.max:
        raise ConfigError(f"need 1 <= loop.min <= loop.max, got loop.min={lp.min}, loop.max={lp.max}")
    if lp.sampling == "fixed" and not lp.min <= lp.mean <= lp.max:
        raise ConfigError(f"loop.sampling='fixed' runs R = loop.mean={lp.mean:g} loops, outside [loop.min, loop.max] = "
                          f"[{lp.min}, {lp.max}] (it would be clipped silently)")
    if lp.loss == "exit_weighted" and not m.exit_gate:
        raise ConfigError("loop.loss='exit_weighted' needs model.exit_gate=true")
    _choice(lp.granularity, ("micro_batch", "sequence"), "loop.granularity")
    if lp.granularity == "sequence":
        _check_per_sequence_loops(m, lp)
    if m.loop_residual_gate and lp.max > m.max_loops:
        raise ConfigError(f"loop.max={lp.max} exceeds model.max_loops={m.max_loops} (per-loop gate table)")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    from megaloop.data.tokenizer import TOKENIZER_TYPES, normalize_tokenizer_type
    tokenizer_kind = normalize_tokenizer_type(cfg.data.tokenizer_type)
    if tokenizer_kind is None:
        raise ConfigError(f"data.tokenizer_type={cfg.data.tokenizer_type!r} is not one of "
                          f"{', '.join(TOKENIZER_TYPES)} (Megatron's HuggingFaceTokenizer, SentencePieceTokenizer "
                          f"work too)")
    if not isinstance(cfg.data.task_params, dict):
        raise ConfigError(f"data.task_params must be a mapping of the task's parameters, e.g. {{length: 16}}, "
                          f"got {cfg.data.task_params!r}")
    if cfg.data.task_params and not cfg.data.task:
        raise ConfigError("data.task_params is set but data.task is not: name the task (e.g. data.task=parity)")
    if tokenizer_kind != "byte" and not cfg.data.tokenizer_model:
        raise ConfigError(f"data.tokenizer_type={cfg.data.tokenizer_type!r} needs data.tokenizer_model")
    if cfg.data.tokenizer_eod and tokenizer_kind not in ("hf", "tiktoken"):
        raise ConfigError(f"data.tokenizer_eod applies to hf and tiktoken tokenizers, not "
                          f"data.tokenizer_type={cfg.data.tokenizer_type!r}")
    _check_document_packing(cfg)
    # Training.
    _choice(t.lr_schedule, ("cosine", "wsd", "constant"), "train.lr_schedule")
    _choice(t.precision, ("fp32", "bf16", "fp16"), "train.precision")
    _choice(t.bf16_impl, ("autocast", "master_weights"), "train.bf16_impl")
    _choice(t.optimizer_impl, ("auto", "fused", "foreach", "for_loop"), "train.optimizer_impl")
    _check_optimizer(t, p)
    _choice(t.activation_checkpointing, ("none", "loop", "layer"), "train.activation_checkpointing")
    _choice(t.compile_mode, ("default", "max-autotune-no-cudagraphs"), "train.compile_mode")
    if t.compile and p.zero_stage == 3:
        raise ConfigError("train.compile with parallel.zero_stage=3: ZeRO-3's parameter-gathering hooks on every "
                          "sub-module break each compiled layer into one graph per linear layer (slower than eager, "
                          "long compile); use zero_stage 1 or 2 with train.compile, or train.compile=false")
    _stage_problems(cfg)
    if t.diag_interval:
        _check_diag_interval(t, p, bool(getattr(cfg.model, "value_embeddings", False)))
    if t.min_lr > t.lr:
        raise ConfigError(f"need train.min_lr <= train.lr, got lr={t.lr}, min_lr={t.min_lr}")
    # Parallel layout.
    _choice(p.zero_stage, (0, 1, 2, 3), "parallel.zero_stage")
    tp = p.tensor_parallel
    problems = tensor_parallel_problems(m, tp, cfg.data.seq_len if p.sequence_parallel else None)
    if problems:
        raise ConfigError("; ".join(problems))
    if p.zero_stage == 3 and tp > 1:
        raise ConfigError("parallel.zero_stage=3 with parallel.tensor_parallel>1 is not supported by megaloop's "
                          "tensor-parallel layers; use zero_stage 1 or 2 with TP")
    # Allowed on purpose: ZeRO 3 with activation checkpointing (non-reentrant recompute re-gathers the
    # parameters), and fp16 with PP and ZeRO 0 (DeepSpeed's FP16 optimizer handles it).
    if p.sequence_parallel and tp > 1:
        if p.pipeline_parallel > 1:
            raise ConfigError(f"parallel.sequence_parallel with parallel.pipeline_parallel={p.pipeline_parallel} is "
                              f"not supported (sequence parallelism is implemented for pipeline_parallel 1 only); "
                              f"set parallel.sequence_parallel=false or parallel.pipeline_parallel=1")
        if t.partition_activations:
            raise ConfigError("train.partition_activations splits checkpointed activations that are identical on the "
                              "tensor-parallel ranks; under parallel.sequence_parallel they are already sequence "
                              "shards (different per rank): set one of them false")
    _choice(p.pipeline_partition, ("loop_weighted", "uniform", "parameters"), "parallel.pipeline_partition")
    if t.eval_interval and t.eval_iters < 1:
        raise ConfigError(f"train.eval_interval={t.eval_interval} needs train.eval_iters >= 1")
    check_evaluation(cfg)  # eval_loops / exits, validation / test sets, harness (megaloop/config/evaluation.py)
    if t.loss_scale and t.precision != "fp16":
        raise ConfigError(f"train.loss_scale={t.loss_scale} applies to fp16 only (train.precision={t.precision!r})")
    if t.partition_activations and p.tensor_parallel == 1:
        raise ConfigError("train.partition_activations splits the looped block's checkpointed activations across "
                          "tensor-parallel ranks (DeepSpeed's checkpoint); it needs parallel.tensor_parallel > 1")
    if (t.partition_activations or t.cpu_checkpointing) and t.activation_checkpointing == "none":
        raise ConfigError("train.partition_activations / train.cpu_checkpointing act on the looped block's "
                          "checkpointed activations; they need train.activation_checkpointing 'loop' or 'layer'")
    max_stages = 3 + m.n_prelude + m.n_coda
    if p.pipeline_parallel > max_stages:
        raise ConfigError(f"parallel.pipeline_parallel={p.pipeline_parallel}: the looped block is one indivisible "
                          f"pipeline layer, so this model (model.n_prelude={m.n_prelude}, model.n_coda={m.n_coda}) "
                          f"splits into at most {max_stages} stages (embedding | prelude layers | looped block | "
                          f"coda layers | head)")
    src = cfg.init.from_
    if src is not None and not str(src).strip():
        raise ConfigError("init.from is empty: name a run folder, checkpoint root or tag folder (or leave it null)")
    dc = t.distill
    _choice(dc.schedule, ("per_loop_kl_then_last",), "train.distill.schedule")
    _choice(t.trainable, ("all", "converted"), "train.trainable")
    if dc.teacher is not None and not str(dc.teacher).strip():
        raise ConfigError("train.distill.teacher is empty: name the teacher's checkpoint (or leave it null)")
    if dc.teacher and p.pipeline_parallel > 1:
        raise ConfigError(f"train.distill with parallel.pipeline_parallel={p.pipeline_parallel}: distillation runs "
                          f"the teacher beside the whole student on one stage; use pipeline_parallel 1 (TP, DP and "
                          f"ZeRO work)")
    if dc.teacher and lp.granularity != "micro_batch":
        raise ConfigError(f"train.distill with loop.granularity={lp.granularity!r}: the per-loop KL matches loop t of "
                          f"teacher and student over the whole micro-batch; use loop.granularity='micro_batch'")
    if dc.teacher and t.stage != "pretrain":
        raise ConfigError(f"train.distill with train.stage={t.stage!r}: a stage has its own loss and trainable "
                          f"parameters; distil in train.stage='pretrain'")
    if dc.teacher and dc.kl_weight == 0 and dc.ce_weight == 0:
        raise ConfigError("train.distill.kl_weight and train.distill.ce_weight are both 0: nothing to train on")
    if t.trainable == "converted" and not (dc.teacher and cfg.init.convert_mixers and dc.warmup_steps > 0):
        raise ConfigError("train.trainable='converted' freezes all but the converted mixers during the distillation "
                          "warm-up: it needs train.distill.teacher, init.convert_mixers and train.distill.warmup_steps > 0")
    if cfg.init.convert_mixers is not None:
        if src is None:
            raise ConfigError(f"init.convert_mixers={cfg.init.convert_mixers!r} needs init.from (the checkpoint whose "
                              f"attention layers it converts)")
        check_converted_pattern(cfg.init.convert_mixers, m)
    if src is not None and t.load:
        raise ConfigError(f"init.from={src!r} and train.load={t.load!r} are both set: train.load continues a run "
                          f"(weights, optimizer, step), init.from starts a new one from weights only; set one")
    if p.pipeline_parallel > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pipeline_parallel="
                          f"{p.pipeline_parallel}: DeepSpeed's pipeline engine supports ZeRO 0 and 1 only. "
                          f"Use zero_stage 1 with pipeline parallelism, or pipeline_parallel 1 for ZeRO 2/3")


def _check_document_packing(cfg: Config) -> None:
    """data.reset_attention_mask / reset_position_ids / eod_mask_loss: documents packed into a corpus sample."""
    d = cfg.data
    on = [f"data.{n}" for n in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss") if getattr(d, n)]
    if not on:
        return
    if d.task:
        raise ConfigError(f"{', '.join(on)}: data.task={d.task!r} generates one example per sequence, with no "
                          f"end-of-document tokens to cut at; set them to false for tasks")
    # (model.causal=false is refused for corpora already, and tasks here: the block-diagonal mask is causal.)


def noncausal_problem(m: ModelConfig, cfg: Optional[Config] = None) -> Optional[str]:
    """Why model.causal=false cannot work with this config (None: it can, or the model is causal). Also
    validates model.mixer. With `cfg`, the training settings that assume a causal model are checked too.
    The one implementation: `validate` and megaloop.model.mixers.build_mixer (models built in code)."""
    names = mixer_pattern(m.mixer, m.n_loop, m.linear_mixer)
    if getattr(m, "causal", True):
        return None
    causal_only = sorted(set(names) - {"attn"})
    if causal_only:
        return (f"model.causal=false (bidirectional attention) is implemented for softmax attention ('attn') only; "
                f"model.mixer={m.mixer!r} puts {causal_only} layers in the looped block, which are causal by "
                f"construction: use model.mixer=attn or model.causal=true")
    if cfg is None:
        return None
    if cfg.train.sample_tokens:
        return (f"train.sample_tokens={cfg.train.sample_tokens} generates text left to right, which needs a causal "
                f"model; with model.causal=false set train.sample_tokens=0")
    if not cfg.data.task:
        return ("model.causal=false lets every position see the next token, its own target on a language-modelling "
                "corpus (data.data_path): train a bidirectional model on a task (data.task, e.g. sudoku) "
                "or set model.causal=true")
    return None


def _stage_problems(cfg: Config) -> None:
    """train.stage: each stage needs the module it trains, and runs with PP = 1 (its loss is computed from
    the looped block's internals, which the pipeline's last stage does not hold)."""
    m, t = cfg.model, cfg.train
    _choice(t.stage, ("pretrain", "dsa_warmup", "exit_gate"), "train.stage")
    if t.stage == "pretrain":
        return
    if t.stage == "dsa_warmup" and "dsa" not in mixer_pattern(m.mixer, m.n_loop, m.linear_mixer):
        raise ConfigError(f"train.stage='dsa_warmup' trains the DSA indexers, but model.mixer={m.mixer!r} has no "
                          f"'dsa' layer")
    if t.stage == "exit_gate" and not m.exit_gate:
        raise ConfigError("train.stage='exit_gate' trains Ouro's exit gate: it needs model.exit_gate=true")
    if cfg.parallel.pipeline_parallel > 1:
        raise ConfigError(f"train.stage={t.stage!r} is not supported with parallel.pipeline_parallel="
                          f"{cfg.parallel.pipeline_parallel}: run the stage with pipeline_parallel=1 (its weights "
                          f"load into any layout afterwards)")
    if t.activation_checkpointing != "none":
        raise ConfigError(f"train.stage={t.stage!r} keeps no activations of the frozen model (it runs without "
                          f"gradients); set train.activation_checkpointing=none")


def _check_value_embeddings(m: ModelConfig, p) -> None:
    """model.value_embeddings: the chosen looped layers must be attention layers, and the token ids do not
    travel between pipeline stages (yet); tensor parallelism: `tensor_parallel_problems`."""
    names = mixer_pattern(m.mixer, m.n_loop, m.linear_mixer)
    n_layers = m.n_prelude + m.n_loop + m.n_coda  # layer i has a table iff i = n_layers - 1 (mod 2)
    chosen = [names[i] for i in range(m.n_loop) if (m.n_prelude + i) % 2 == (n_layers - 1) % 2]
    bad = sorted(set(chosen) - {"attn", "swa", "dsa"})
    if bad:
        raise ConfigError(f"model.value_embeddings gates a table into attention values, but looped layers with "
                          f"mixer {bad} (model.mixer={m.mixer!r}) would get one; use attention mixers or turn "
                          f"model.value_embeddings off")
    if p.pipeline_parallel > 1:
        raise ConfigError(f"model.value_embeddings is not supported with parallel.pipeline_parallel="
                          f"{p.pipeline_parallel} yet (the token ids do not travel between pipeline stages); set "
                          f"parallel.pipeline_parallel=1 or model.value_embeddings=false")


def _check_per_sequence_loops(m: ModelConfig, lp) -> None:
    """loop.granularity='sequence' runs every row to its own depth inside one batched loop (rows past
    their depth keep their state); what needs one loop index or one set of per-loop outputs for the
    whole batch is refused."""
    why = None
    if m.arch != "recurrent":
        why = (f"model.arch={m.arch!r} treats the first loop apart (no previous loop), which a row that "
               f"starts later cannot share; use model.arch='recurrent' (Parcae)")
    elif lp.loss != "last":
        why = f"loop.loss={lp.loss!r} combines per-loop outputs, which rows of different depth do not share"
    elif m.exit_gate:
        why = "model.exit_gate scores every loop's output, which rows of different depth do not share"
    elif m.loop_residual_gate:
        why = "model.loop_residual_gate indexes its gate by the loop number, which differs between rows"
    elif "dsa" in mixer_pattern(m.mixer, m.n_loop, m.linear_mixer):
        why = "the dsa mixer's indexer loss would also train on rows already past their depth"
    if why:
        raise ConfigError(f"loop.granularity='sequence' is not supported here: {why}; "
                          f"or use loop.granularity='micro_batch'")


def tensor_parallel_problems(m: ModelConfig, tp: int, seq_len: Optional[int] = None) -> List[str]:
    """What a tensor-parallel degree fails to divide, one message per problem (empty: it fits).

    seq_len: the sequence length, when sequence parallelism splits it over the TP ranks. The one
    implementation of these checks: `validate` and `megaloop.parallel.apply_tp.validate_tensor_parallel`
    (for models built in code) both call it."""
    if tp == 1:
        return []
    problems = []
    if m.n_heads % tp:
        problems.append(f"model.n_heads={m.n_heads} is not divisible by parallel.tensor_parallel={tp}")
    if m.kv_heads % tp and tp % m.kv_heads:
        problems.append(f"model.n_kv_heads={m.kv_heads} and parallel.tensor_parallel={tp}: one must divide the "
                        f"other (kv heads are split when n_kv_heads >= tp, replicated when fewer)")
    if m.ffn_dim % tp:
        problems.append(f"the MLP hidden size {m.ffn_dim} (model.ffn_hidden, or derived from model.d_model="
                        f"{m.d_model}) is not divisible by parallel.tensor_parallel={tp}")
    if m.padded_vocab_size % tp:
        good = m.pad_vocab_multiple * tp // math.gcd(m.pad_vocab_multiple, tp)
        problems.append(f"the padded vocabulary {m.padded_vocab_size} (model.vocab_size={m.vocab_size} padded to a "
                        f"multiple of model.pad_vocab_multiple={m.pad_vocab_multiple}) is not divisible by "
                        f"parallel.tensor_parallel={tp}; set model.pad_vocab_multiple={good}")
    if seq_len is not None and seq_len % tp:
        problems.append(f"parallel.sequence_parallel splits the sequence over the tensor-parallel ranks: "
                        f"data.seq_len={seq_len} is not divisible by parallel.tensor_parallel={tp}")
    if getattr(m, "value_embeddings", False):
        problems.append(f"model.value_embeddings is not supported with parallel.tensor_parallel={tp} yet (the "
                        f"tables are not sharded over the kv heads); set model.value_embeddings=false")
    return problems


def _check_diag_interval(t, p, value_embeddings: bool) -> None:
    """train.diag_interval > 0: the layouts the training diagnostics (megaloop/training/diagnostics.py) run on."""
    why = None
    if p.zero_stage == 3:
        why = "parallel.zero_stage=3 (the diagnostics call the model outside DeepSpeed's parameter gathering)"
    elif t.compile:
        why = "train.compile (forward-mode AD and per-loop parameter copies through compiled layers are untested)"
    elif value_embeddings:
        why = "model.value_embeddings (the loop map of megaloop/model/fixed_point.py does not pass the token ids on)"
    if why:
        raise ConfigError(f"train.diag_interval={t.diag_interval} is not supported with {why}; "
                          f"set train.diag_interval=0 or change the layout")
