"""One typed configuration for a megaloop run, loaded from YAML with `section.key=value` overrides.

The config is a tree of dataclasses. `load_config` reads the YAML file, applies command-line overrides,
converts every value to the field's declared type and validates the whole tree up front, so a bad
config fails before any process group or model is built, with a message that names the fields.
Nothing here is global: the returned object is passed explicitly to whatever needs it.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union

import yaml

from megaloop.errors import MegaloopError


class ConfigError(MegaloopError, ValueError):
    """A config value, key or combination that cannot work. The message names the fields."""


ARCHITECTURES = ("recurrent", "flt", "lt_i", "lt_ia", "flt_res")
FLT_FAMILY = ("flt", "lt_i", "lt_ia", "flt_res")
INJECTIONS = ("none", "add", "concat_adapter", "parcae")


@dataclass
class ModelConfig:
    # --- vocabulary and embedding ---
    vocab_size: int = 258
    # Megatron's make-vocab-size-divisible-by: the embedding is padded so that every TP rank gets an
    # equal, aligned slice. Padded rows never receive a real token.
    pad_vocab_multiple: int = 64
    tie_embeddings: bool = True
    embed_norm: bool = True  # nanochat-style norm(e): the stream starts from a unit-RMS embedding
    max_seq_len: int = 256

    # --- layer shape ---
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (no grouping)
    head_dim: Optional[int] = None  # None: d_model // n_heads
    ffn_hidden: Optional[int] = None  # None: 4*d (relu2) or 8/3*d rounded up to 64 (swiglu)
    mlp: str = "swiglu"  # swiglu | relu2
    norm_style: str = "pre"  # pre | sandwich (Ouro, Huginn: norm before and after each sub-layer)
    norm_eps: float = 1e-6
    norm_scale: bool = True  # learned RMSNorm scale, or parameter-free
    qk_norm: bool = False
    rope_theta: float = 10000.0
    logit_softcap: Optional[float] = None
    zero_init_out: bool = False  # zero-init attention/MLP output projections
    init_std: float = 0.02
    dropout: float = 0.0
    # Token mixer of each looped layer (megaloop/model/mixers.py): one name for all ("attn", "gdn",
    # "swa", "dsa"), a comma list tiled along depth ("gdn,gdn,gdn,attn"), or a ratio "N:M" = N layers
    # of `linear_mixer` per M softmax-attention layers, spread along depth.
    mixer: str = "attn"
    linear_mixer: str = "gdn"
    conv_size: int = 4  # GDN's causal short convolution on q, k, v
    gdn_expand_v: float = 1.0  # GDN value head dim = head_dim * expand_v
    gdn_chunk_size: int = 64
    # GDN scan kernel: auto (flash-linear-attention's Triton kernel if it imports and passes a tiny
    # forward+backward probe on the run's device/dtype, else the torch chunked form) | fla | torch
    gdn_kernel: str = "auto"
    window: int = 64  # sliding-window attention ("swa"): query t sees keys (t - window, t]
    dsa_topk: int = 64  # DeepSeek sparse attention ("dsa"): keys kept per query
    dsa_index_heads: int = 4
    dsa_index_dim: int = 32
    dsa_indexer_loss_coef: float = 0.01  # weight of the indexer's KL-to-dense-attention loss

    # --- prelude -> looped block x R -> coda ---
    n_prelude: int = 0
    n_loop: int = 2
    n_coda: int = 0
    loops: int = 4  # default R at forward time; any R >= 1 can be passed to model(tokens, loops=R)
    max_loops: int = 64  # size of per-loop parameter tables (gates); larger R reuses the last row

    # --- how loops connect ---
    arch: str = "recurrent"  # recurrent | flt | lt_i | lt_ia | flt_res
    injection: str = "none"  # none | add | concat_adapter | parcae (recurrent arch only)
    recall: str = "standard"  # standard (block input) | internal (inside the block)
    internal_recall_site: str = "pre_mlp"  # pre_attn | pre_mlp
    internal_recall_layers: str = "first"  # first | all  (which looped layers receive the recall)
    normalization: str = "outer"  # outer: state = norm(block output) between loops | inner
    state_init: str = "embed"  # embed | zeros | noise  (Huginn/Parcae start from noise)
    # std of the truncated-normal noise start; None = init_std (Parcae). Huginn: sqrt(2/5) (= sigma*sqrt(d)).
    state_init_std: Optional[float] = None
    share_outer_final_norm: bool = False  # Ouro: the final norm is applied every step and fed back
    parcae_init_decay: float = math.sqrt(0.2)  # exp(-Delta) at init: Abar = 0.447
    # RMSNorm on the prelude's output, i.e. on the signal e injected every loop (Parcae: e = norm(P(emb(x)))).
    # None: on for injection=parcae, unless n_prelude=0 and embed_norm already makes e = norm(emb(x));
    # off otherwise. See `use_prelude_norm`.
    prelude_norm: Optional[bool] = None

    # --- gates ---
    exit_gate: bool = False  # Ouro's learned exit gate lambda(t) = sigmoid(w.h(t) + b)
    loop_residual_gate: bool = False  # LT2: h(t) <- h(t) + rho(t) * h(t-1), rho zero-init
    attn_output_gate: bool = False  # LT2: attention output * sigmoid(W_g x), W_g zero-init

    @property
    def use_prelude_norm(self) -> bool:
        """Whether the model has the norm after the prelude (`prelude_norm`, None resolved)."""
        if self.prelude_norm is not None:
            return bool(self.prelude_norm)
        return self.injection == "parcae" and (self.n_prelude > 0 or not self.embed_norm)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return m * math.ceil(self.vocab_size / m) if m > 1 else self.vocab_size


@dataclass
class LoopScheduleConfig:
    """How many loops each training micro-batch runs, and through how many gradients flow."""

    sampling: str = "fixed"  # fixed | poisson (Parcae) | lognormal_poisson (Huginn)
    mean: float = 4.0  # the fixed R, or the mean of the sampled R
    sigma: float = 0.5  # LogNormal spread (Huginn)
    min: int = 1
    max: int = 32  # sampled R is clipped to [min, max]
    backprop_loops: Optional[int] = None  # gradients through the last k loops only; None = all
    loss: str = "last"  # last | mean | last_third | exit_weighted (Ouro stage I)
    exit_entropy_weight: float = 0.05  # beta of Ouro's entropy regulariser


@dataclass
class DataConfig:
    # Megatron-style weighted list: [path] or [w1, path1, w2, path2, ...] (paths without .bin/.idx)
    data_path: list = field(default_factory=list)
    split: str = "969,30,1"
    seq_len: int = 128
    tokenizer_type: str = "byte"  # byte | sentencepiece
    tokenizer_model: Optional[str] = None
    cache_dir: Optional[str] = None  # index cache; None: next to the data
    num_workers: int = 0


@dataclass
class TrainConfig:
    seed: int = 1234
    steps: int = 100
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    lr_schedule: str = "cosine"  # cosine | wsd | constant
    wsd_decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # bf16 recipe: autocast (fp32 weights, gradients and optimizer; matmuls in bf16 under torch.autocast,
    # DeepSpeed's torch_autocast) | master_weights (DeepSpeed's bf16 engine: bf16 weights + fp32 master copy)
    bf16_impl: str = "autocast"
    # AdamW kernel: auto (fused on CUDA / XPU, foreach elsewhere) | fused | foreach | for_loop
    optimizer_impl: str = "auto"
    activation_checkpointing: str = "none"  # none | loop | layer
    # torch.compile each transformer layer (not the loop: no recompile per R); see megaloop/model/compile.py
    compile: bool = False
    compile_mode: str = "default"  # default | max-autotune-no-cudagraphs (CUDA-graph modes are refused)
    log_interval: int = 10
    eval_interval: int = 0
    eval_iters: int = 4
    save_interval: int = 0
    output_dir: str = "runs/default"
    load: Optional[str] = None
    auto_resume: bool = True  # resume from the latest complete checkpoint in output_dir
    keep_checkpoints: int = 0  # keep only the newest N complete checkpoints; 0 = keep all
    eval_loops: Optional[int] = None  # R used for validation; None: model.loops
    loss_scale: float = 0.0  # fp16 only: 0 = dynamic loss scaling, > 0 = static scale
    initial_scale_power: int = 16  # fp16 dynamic loss scaling starts at 2**this
    peak_flops: Optional[float] = None  # peak FLOP/s of ONE device, for the achieved-FLOP/s share
    dist_timeout: float = 600.0  # seconds: a collective waiting longer (dead rank) fails the run
    tensorboard: bool = True
    # DeepSpeed's activation checkpointing for the looped block's per-loop / per-layer checkpoints
    # (need activation_checkpointing 'loop' or 'layer'):
    partition_activations: bool = False  # split checkpointed activations across TP ranks (TP > 1)
    cpu_checkpointing: bool = False  # offload checkpointed activations to CPU (a no-op on the cpu accelerator)
    sample_tokens: int = 0  # after training, generate this many tokens from sample_prompt (TP = 1 only)
    sample_prompt: str = "The "
    sample_temperature: float = 0.8  # 0 = greedy
    sample_top_k: int = 40


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    # how pipeline stages are balanced: loop_weighted (layers weighted by FLOPs, the looped block by
    # its loop count) | uniform (layer count) | parameters (DeepSpeed's default; wrong for a looped block)
    pipeline_partition: str = "loop_weighted"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loop: LoopScheduleConfig = field(default_factory=LoopScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Token mixers: which names a config may use, and the mixer of each looped layer.

# The built-in token mixers plus every mixer registered with megaloop.model.mixers.register_mixer (which
# adds its name here), so that validation needs no model code. The classes are in megaloop/model/mixers.py.
MIXER_NAMES = {"attn", "gdn", "swa", "dsa"}


def mixer_pattern(spec: str, n_layers: int, linear_mixer: str = "gdn") -> List[str]:
    """Mixer name for each of n_layers layers.

    `spec` is one name ("attn"), a comma list ("gdn,gdn,gdn,attn") repeated along depth (its length
    must divide n_layers so the pattern tiles the block exactly), or a ratio "N:M": N layers of
    `linear_mixer` then M softmax-attention layers, repeated (LT2's "4:1" hybrid puts one full
    attention layer after every four linear ones).
    """
    if ":" in spec:
        try:
            n_lin, n_attn = (int(v) for v in spec.split(":"))
        except ValueError:
            raise ConfigError(f"model.mixer ratio {spec!r} must look like 'N:M' with integers") from None
        if n_lin < 0 or n_attn < 0 or n_lin + n_attn == 0:
            raise ConfigError(f"model.mixer ratio {spec!r} needs non-negative counts, not both zero")
        spec = ",".join([linear_mixer] * n_lin + ["attn"] * n_attn)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("model.mixer is empty")
    if n_layers % len(names):
        raise ConfigError(f"model.mixer pattern {spec!r} has {len(names)} entries, which does not tile "
                          f"the {n_layers} layers it applies to")
    for n in names:
        if n not in MIXER_NAMES:
            raise ConfigError(f"unknown mixer '{n}' in model.mixer={spec!r}; known mixers: {sorted(MIXER_NAMES)}")
    return names * (n_layers // len(names))


# ----------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> dataclasses, with type conversion and near-miss suggestions.


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML / command-line value to the declared field type, or fail naming the field."""
    origin = typing.get_origin(annotation)
    if origin is Union:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _convert(value, args[0], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if annotation is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
        if not isinstance(value, list):
            value = [value]
        return value
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        if where:
            raise ConfigError(f"config section '{where}' must be a mapping (key: value), got {data!r}")
        raise ConfigError(f"config: the top level must be a mapping of sections (model:, train:, ...), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, fields)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, {} if value is None else value, path)  # `model:` alone = empty
        else:
            kwargs[key] = _convert(value, annotation, path)
    return cls(**kwargs)


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node_cls, node = Config, tree
    for i, key in enumerate(keys):
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        hints = typing.get_type_hints(node_cls)
        prefix = ".".join(keys[:i])
        if key not in fields:
            place = f"'{prefix}'" if prefix else "the top level"
            raise ConfigError(f"override '{override}': unknown key '{key}' in {place}{_suggest(key, fields)}")
        if i == len(keys) - 1:
            if dataclasses.is_dataclass(hints[key]):
                raise ConfigError(f"override '{override}': '{dotted}' is a section; set one of its keys")
            # Strings stay verbatim (YAML would read "4:1" as the base-60 integer 241).
            node[key] = raw if hints[key] is str else (yaml.safe_load(raw) if raw.strip() else "")
        else:
            if not dataclasses.is_dataclass(hints[key]):
                raise ConfigError(f"override '{override}': '{'.'.join(keys[:i + 1])}' is not a section")
            if node.get(key) is None:
                node[key] = {}
            elif not isinstance(node[key], dict):
                raise ConfigError(f"override '{override}': config section '{'.'.join(keys[:i + 1])}' must be a "
                                  f"mapping (key: value), got {node[key]!r}")
            node = node[key]
            node_cls = hints[key]


def config_from_dict(data: dict, overrides: Optional[list] = None) -> Config:
    if data is not None and not isinstance(data, dict):  # dict() would silently accept a list of pairs
        _build(Config, data, "")
    tree = dict(data or {})
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for override in overrides or []:
        _apply_override(tree, override)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list] = None) -> Config:
    """Read a YAML config (or defaults when path is None), apply overrides, validate, return it."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = read_config_yaml(path)
    return config_from_dict(data, overrides)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, mark, first_mark):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.mark, self.first_mark = key, mark, first_mark


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges; its keys may be overridden on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, key_node.start_mark, seen[key])
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it itself
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_kind(value) -> str:
    return {list: "a list", str: "a string", type(None): "nothing"}.get(type(value), repr(value))


def read_config_yaml(path: Union[str, Path]) -> dict:
    """The mapping of a YAML config file. Refuses, in one line naming file and line: invalid YAML, a key
    given twice in one mapping, a top level that is not a mapping, a section that is not a mapping
    (`model: 0`; `model:` with nothing under it is an empty section)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read it: {e}") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        data = loader.construct_document(node)
    except _DuplicateKey as e:
        raise ConfigError(f"config file {path}:{e.mark.line + 1}: duplicate key {e.key!r} (first given at line "
                          f"{e.first_mark.line + 1}); YAML would silently keep the last one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        cmark = getattr(e, "context_mark", None)
        if context and cmark is not None and cmark is not mark:
            problem = f"{problem} ({context} at line {cmark.line + 1})"
        raise ConfigError(f"config file {where}: invalid YAML: {' '.join(str(problem).split())}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections (model:, train:, ...), "
                          f"got {_yaml_kind(data)} (line {node.start_mark.line + 1})")
    sections = {f.name for f in dataclasses.fields(Config)}
    for key_node, value_node in node.value:
        key = getattr(key_node, "value", None)
        if key in sections and data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"config file {path}: section '{key}' must be a mapping (key: value lines), got "
                              f"{data[key]!r} (line {value_node.start_mark.line + 1})")
    return data


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


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
    "model.dsa_index_dim": _GT0, "model.dsa_indexer_loss_coef": _GE0, "model.n_prelude": _GE0,
    "model.n_loop": _GT0, "model.n_coda": _GE0, "model.loops": _GT0, "model.max_loops": _GT0,
    "model.state_init_std": _GT0, "model.parcae_init_decay": (0, 1, False, False),
    "loop.mean": _GE1, "loop.sigma": _GE0, "loop.min": _GE1, "loop.max": _GE1, "loop.backprop_loops": _GE1,
    "loop.exit_entropy_weight": _GE0,
    "data.seq_len": _GT0, "data.num_workers": _GE0,
    "train.seed": (0, 2 ** 32 - 1, True, True),  # numpy's RandomState takes [0, 2**32)
    "train.steps": _GT0, "train.micro_batch_size": _GT0, "train.grad_accum_steps": _GT0, "train.lr": _GT0,
    "train.min_lr": _GE0, "train.warmup_steps": _GE0, "train.wsd_decay_fraction": (0, 1, False, True),
    "train.weight_decay": _GE0, "train.beta1": _UNIT_HALF_OPEN, "train.beta2": _UNIT_HALF_OPEN,
    "train.eps": _GT0, "train.grad_clip": _GE0,  # 0 = no clipping
    "train.log_interval": _GT0, "train.eval_interval": _GE0, "train.eval_iters": _GE0,
    "train.save_interval": _GE0, "train.keep_checkpoints": _GE0, "train.eval_loops": _GT0,
    "train.loss_scale": _GE0, "train.initial_scale_power": (0, 64, True, True), "train.peak_flops": _GT0,
    "train.dist_timeout": _GT0, "train.sample_tokens": _GE0, "train.sample_temperature": _GE0,  # 0 = greedy
    "train.sample_top_k": _GE0,  # 0 = no top-k
    "parallel.tensor_parallel": _GT0, "parallel.pipeline_parallel": _GT0, "parallel.zero_stage": (0, 3, True, True),
}


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
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        optional = name in _optional_fields(type(getattr(cfg, section)))
        if value is None and optional:
            continue
        finite = not isinstance(value, float) or math.isfinite(value)
        ok = finite and (low is None or (value >= low if low_in else value > low)) and \
            (high is None or (value <= high if high_in else value < high))
        if not ok:
            what = "a finite number " if isinstance(value, float) else ""
            raise ConfigError(f"{dotted} must be {what}{_range_text(low, high, low_in, high_in)}"
                              f"{' or null' if optional else ''}, got {value!r}")


def validate(cfg: Config) -> None:
    m, lp, t, p = cfg.model, cfg.loop, cfg.train, cfg.parallel
    _check_ranges(cfg)
    _choice(m.mlp, ("swiglu", "relu2"), "model.mlp")
    _choice(m.norm_style, ("pre", "sandwich"), "model.norm_style")
    _choice(m.arch, ARCHITECTURES, "model.arch")
    _choice(m.injection, INJECTIONS, "model.injection")
    _choice(m.recall, ("standard", "internal"), "model.recall")
    _choice(m.internal_recall_site, ("pre_attn", "pre_mlp"), "model.internal_recall_site")
    _choice(m.internal_recall_layers, ("first", "all"), "model.internal_recall_layers")
    _choice(m.normalization, ("inner", "outer"), "model.normalization")
    _choice(m.state_init, ("embed", "zeros", "noise"), "model.state_init")
    _choice(m.gdn_kernel, ("auto", "fla", "torch"), "model.gdn_kernel")
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
    if isinstance(m.mixer, str) and m.mixer.strip().isdigit():
        raise ConfigError(f"model.mixer={m.mixer!r} looks like a number: quote ratios in YAML (mixer: \"4:1\"), "
                          f"which YAML 1.1 otherwise reads as a base-60 integer")
    mixer_pattern(m.mixer, m.n_loop, m.linear_mixer)
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
    if m.loop_residual_gate and lp.max > m.max_loops:
        raise ConfigError(f"loop.max={lp.max} exceeds model.max_loops={m.max_loops} (per-loop gate table)")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _choice(cfg.data.tokenizer_type, ("byte", "sentencepiece"), "data.tokenizer_type")
    if cfg.data.tokenizer_type == "sentencepiece" and not cfg.data.tokenizer_model:
        raise ConfigError("data.tokenizer_type='sentencepiece' needs data.tokenizer_model")
    # Training.
    _choice(t.lr_schedule, ("cosine", "wsd", "constant"), "train.lr_schedule")
    _choice(t.precision, ("fp32", "bf16", "fp16"), "train.precision")
    _choice(t.bf16_impl, ("autocast", "master_weights"), "train.bf16_impl")
    _choice(t.optimizer_impl, ("auto", "fused", "foreach", "for_loop"), "train.optimizer_impl")
    _choice(t.activation_checkpointing, ("none", "loop", "layer"), "train.activation_checkpointing")
    _choice(t.compile_mode, ("default", "max-autotune-no-cudagraphs"), "train.compile_mode")
    if t.compile and p.zero_stage == 3:
        raise ConfigError("train.compile with parallel.zero_stage=3: ZeRO-3's parameter-gathering hooks on every "
                          "sub-module break each compiled layer into one graph per linear layer (slower than eager, "
                          "long compile); use zero_stage 1 or 2 with train.compile, or train.compile=false")
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
    if p.pipeline_parallel > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pipeline_parallel="
                          f"{p.pipeline_parallel}: DeepSpeed's pipeline engine supports ZeRO 0 and 1 only. "
                          f"Use zero_stage 1 with pipeline parallelism, or pipeline_parallel 1 for ZeRO 2/3")


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
    return problems
