"""The config's schema: one dataclass per section, the names a config may use, and ConfigError."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from megaloop.errors import MegaloopError


class ConfigError(MegaloopError, ValueError):
    """A config value, key or combination that cannot work. The message names the fields."""


ARCHITECTURES = ("recurrent", "flt", "lt_i", "lt_ia", "flt_res")
FLT_FAMILY = ("flt", "lt_i", "lt_ia", "flt_res")
INJECTIONS = ("none", "add", "concat_adapter", "parcae")


@dataclass
class ModelConfig:
    # Named preset of the init and block details below (megaloop/config/recipes.py): megaloop (these
    # defaults) | flt_reference | parcae_reference. Applied under the keys the config sets (explicit keys win);
    # config.yaml records the resolved values. docs/looped_models.md section 11.
    recipe: str = "megaloop"

    # --- vocabulary and embedding ---
    vocab_size: int = 258
    # Megatron's make-vocab-size-divisible-by: the embedding is padded so that every TP rank gets an
    # equal, aligned slice. Padded rows never receive a real token.
    pad_vocab_multiple: int = 64
    tie_embeddings: bool = True
    embed_norm: bool = True  # nanochat-style norm(e): the stream starts from a unit-RMS embedding
    # The token embedding is multiplied by this (before embed_norm, which would undo it). Huginn: sqrt(d_model)
    # with embed_norm off, so with init_std = sqrt(2/(5 d)) the embedding starts at RMS sqrt(2/5).
    embed_scale: float = 1.0
    max_seq_len: int = 256

    # --- layer shape ---
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (no grouping)
    head_dim: Optional[int] = None  # None: d_model // n_heads
    ffn_hidden: Optional[int] = None  # None: 4*d (relu2) or 8/3*d rounded up to 64 (swiglu)
    mlp: str = "swiglu"  # swiglu | relu2
    # pre: x + f(N x) | sandwich (Ouro): x + N'(f(N x)) | huginn: x = N'(x + f(N x)), the stream itself normalised
    norm_style: str = "pre"
    norm_eps: float = 1e-6
    norm_scale: bool = True  # learned RMSNorm scale, or parameter-free
    qk_norm: bool = False
    rope_theta: float = 10000.0
    logit_softcap: Optional[float] = None
    zero_init_out: bool = False  # zero-init attention/MLP output projections
    init_std: float = 0.02
    # normal: every matrix N(0, init_std) (GPT-2 / Megatron) | nanochat: the FLT / nanochat reference's init:
    # token embedding N(0, 1), untied head N(0, 0.001), other matrices uniform with std 1/sqrt(fan_in),
    # output projections zero when zero_init_out (other embedding tables uniform with std 1/sqrt(d)).
    init_scheme: str = "normal"
    dropout: float = 0.0
    # Token mixer of each looped layer (megaloop/model/mixers.py): one name for all ("attn", "gdn",
    # "swa", "dsa"), a comma list tiled along depth ("gdn,gdn,gdn,attn"), or a ratio "N:M" = N layers
    # of `linear_mixer` per M softmax-attention layers, spread along depth.
    mixer: str = "attn"
    # false: bidirectional softmax attention (every position sees the whole sequence; Sudoku). Softmax
    # attention ('attn') only; refused with other mixers, generation and corpus (next-token) data.
    causal: bool = True
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
    # The indexer's form: "v3.2" = DeepSeek-V3.2's (RoPE on part of q_I/k_I, LayerNorm on k_I, scores scaled
    # by H_I^-1/2 * d_I^-1/2) | "legacy" = megaloop's earlier form (no RoPE, no LayerNorm, H_I^-1/2 only),
    # for checkpoints trained with it (their saved configs, which predate this field, read as "legacy").
    dsa_indexer_form: str = "v3.2"
    # Channels of q_I / k_I rotated by RoPE (the first ones, halves layout, as V3.2's non-interleaved
    # indexer RoPE); None: dsa_index_dim // 2 (V3.2: 64 of 128), 0: none. "v3.2" form only.
    dsa_index_rope_dim: Optional[int] = None

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
    # Parcae's (nanochat's) value embeddings: every other layer of prelude + loop + coda (the last always) has a
    # token table gated into its attention values (megaloop/model/value_embeddings.py). Off by default.
    value_embeddings: bool = False
    # RMSNorm on the prelude's output, i.e. on the signal e injected every loop (Parcae: e = norm(P(emb(x)))).
    # None: on for injection=parcae, unless n_prelude=0 and embed_norm already makes e = norm(emb(x));
    # off otherwise. See `use_prelude_norm`.
    prelude_norm: Optional[bool] = None
    # RMSNorm on the loop's output before the coda (Huginn applies its final norm there as well as after
    # the coda; here it is a norm of its own, see docs/looped_models.md section 10).
    coda_norm: bool = False

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
    def dsa_rope_dim(self) -> int:
        """Channels of the DSA indexer's q_I / k_I that RoPE rotates (`dsa_index_rope_dim`, None resolved)."""
        if self.dsa_indexer_form == "legacy":
            return 0
        return self.dsa_index_dim // 2 if self.dsa_index_rope_dim is None else int(self.dsa_index_rope_dim)

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
    # micro_batch: one R per micro-batch; sequence: one R per row (Parcae's per-sequence draw), the block
    # runs the largest and a row past its own depth keeps its state (megaloop/model/loop_schedule.py).
    granularity: str = "micro_batch"


def named_blends(spec, default_name: str) -> Dict[str, list]:
    """data.valid_data_path / test_data_path -> {set name: blend}: a blend (a list, or one path) is one set
    called default_name; a mapping names its sets (a set's blend may be one path)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return {str(k): (v if isinstance(v, list) else [v]) for k, v in spec.items()}
    return {default_name: spec if isinstance(spec, list) else [spec]}


@dataclass
class DataConfig:
    # Megatron-style weighted list: [path] or [w1, path1, w2, path2, ...] (paths without .bin/.idx)
    data_path: list = field(default_factory=list)
    split: str = "969,30,1"
    # Megatron's --valid-data-path / --test-data-path: validation (test) sets of their own instead of data.split's
    # valid (test) documents. A blend like data_path (one set, named "valid" / "test"), or named sets, each a
    # blend: {wiki: [wiki_text_document], code: [0.5, py_text_document, 0.5, c_text_document]}. Every document
    # of these datasets is used; each set is validated (at every train.eval_loops R) and logged under its name.
    # Test sets are evaluated once, after the last step.
    valid_data_path: Union[list, dict] = field(default_factory=list)
    test_data_path: Union[list, dict] = field(default_factory=list)
    seq_len: int = 128
    # byte | sentencepiece | hf (Megatron's HuggingFaceTokenizer: a tokenizer.json or a model folder holding
    # one) | tiktoken (a local .tiktoken file); megaloop/data/tokenizer.py
    tokenizer_type: str = "byte"
    tokenizer_model: Optional[str] = None  # the model file (sentencepiece .model, tokenizer.json / folder, .tiktoken)
    # hf / tiktoken: the end-of-document token when the tokenizer does not name one (tokenizer_config.json's
    # eos_token, else <|endoftext|>, <|end_of_text|>, </s>, <eos>)
    tokenizer_eod: Optional[str] = None
    cache_dir: Optional[str] = None  # index cache; None: next to the data
    num_workers: int = 0
    # A synthetic task (megaloop.tasks: parity, prefix_sum, mqar, s5, a5, z5, z60, state_tracking, sudoku)
    # instead of data_path: examples generated from (train.seed, index), answer-only labels, exact-match
    # accuracy in validation. task_params: the task's keyword arguments, e.g. {length: 16}.
    task: Optional[str] = None
    task_params: dict = field(default_factory=dict)
    # Packed documents (Megatron-LM's flags of the same names; a sample is a window of documents, each ended
    # by the tokenizer's end-of-document token, which belongs to the document it ends):
    # reset_attention_mask: no token attends across a document start, in every layer and loop iteration and in
    #   every mixer (softmax attention block-diagonal causal, the sliding window and DSA's top-k within the
    #   document, Gated DeltaNet's conv and state restarting at each document); megaloop/model/documents.py
    # reset_position_ids: RoPE positions (DSA's indexer's too) restart at 0 at each document start
    # eod_mask_loss: no loss on the prediction made at an end-of-document token (the next document's first token)
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False


@dataclass
class DistillConfig:
    """train.distill: a frozen teacher beside the student on the same tokens (megaloop/training/distill.py).
    Off while `teacher` is null."""

    teacher: Optional[str] = None  # any checkpoint megaloop.checkpoint.load_model reads (run folder, tag, plain)
    # per_loop_kl_then_last: the mean over loops of KL(teacher(t) || student(t)) for warmup_steps steps, then
    # the final loop's KL (+ ce_weight x the run's loop.loss cross-entropy)
    schedule: str = "per_loop_kl_then_last"
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0  # both distributions at softmax(z / T); the KL is multiplied by T^2
    warmup_steps: int = 0  # steps of the per-loop phase


@dataclass
class WandbConfig:
    """train.wandb: Weights & Biases, when train.loggers names wandb (megaloop/training/trackers.py)."""

    project: str = "megaloop"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: the output folder's name
    # online | offline (no network: `wandb sync` later) | disabled; None: wandb's own default (WANDB_MODE)
    mode: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class MlflowConfig:
    """train.mlflow: MLflow, when train.loggers names mlflow (megaloop/training/trackers.py)."""

    # None: $MLFLOW_TRACKING_URI, else a local file store at <output_dir>/mlruns (no server, no network)
    tracking_uri: Optional[str] = None
    experiment: str = "megaloop"
    run_name: Optional[str] = None  # None: the output folder's name


@dataclass
class ProfileConfig:
    """train.profile: a torch.profiler trace of steps start .. start+steps-1 (megaloop/training/profiling.py)."""

    start: int = 5  # the first profiled step (1-based, as the console counts)
    steps: int = 0  # 0 = off (costs nothing)
    ranks: List[int] = field(default_factory=lambda: [0])  # global ranks that write a trace
    memory_snapshot: bool = True  # CUDA only: also the allocator's memory history (pytorch.org/memory_viz)


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
    # adamw | muon: Muon (torch.optim.Muon: orthogonalised Nesterov momentum, lr scaled by sqrt(max(1, rows/cols)))
    # for the layers' 2-D weight matrices, AdamW at train.lr for embeddings, head and 1-D parameters; the same
    # schedule and train.weight_decay for both (megaloop/training/optim.py). ZeRO 0, fp32 weights, TP 1.
    optimizer: str = "adamw"
    muon_lr: float = 0.02  # Muon's peak learning rate (the schedule scales it as it scales train.lr)
    muon_momentum: float = 0.95
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
    # write checkpoints in the background: a save step waits only for the device -> host copy, `latest`
    # moves once every rank's write is done (megaloop/checkpoint/async_save.py); the run's end waits for it
    async_save: bool = False
    # the loop counts R of validation: one (4) or several ([1, 4, 8]: each logged as its own record, R named);
    # None: model.loops
    eval_loops: Optional[list] = None
    # exit strategies validated too, at the largest eval_loops R ("strategy:threshold": kl:1e-3 Huginn's
    # KL-convergence exit, q_exit:0.5 Ouro's exit gate); each record names its exit and the average loops used
    eval_exits: list = field(default_factory=list)
    # every N steps (0 = off): lm-evaluation-harness on the current weights at each eval_loops R, on rank 0
    # between steps (the weights are exported to a temporary HF folder; megaloop/training/harness.py)
    harness_interval: int = 0
    harness_tasks: list = field(default_factory=list)  # lm-eval task names (or a local task's name)
    harness_include_path: Optional[str] = None  # a folder of your own lm-eval task YAMLs
    harness_limit: Optional[int] = None  # at most this many examples per task (None: all)
    # check a checkpoint's files against the checksums recorded when it was saved before reading it (resume: a
    # damaged tag is skipped for the previous intact one; init.from, the distillation teacher: refused); one
    # read pass, on rank 0 only; false: huge trusted checkpoints
    verify_checkpoints: bool = True
    # a step with non-finite gradients is skipped (weights and AdamW state unchanged) and counted; this many
    # skipped in a row stop the run (exit code 3) naming the newest good checkpoint
    max_consecutive_skips: int = 10
    loss_scale: float = 0.0  # fp16 only: 0 = dynamic loss scaling, > 0 = static scale
    initial_scale_power: int = 16  # fp16 dynamic loss scaling starts at 2**this
    peak_flops: Optional[float] = None  # peak FLOP/s of ONE device, for the achieved-FLOP/s share
    dist_timeout: float = 600.0  # seconds: bounds every collective (all groups, NCCL watchdog); names a silent rank
    # Where the logged numbers go (megaloop/training/trackers.py): tensorboard (<output_dir>/tensorboard), jsonl
    # (<output_dir>/metrics.jsonl), wandb, mlflow (the `track` extra; imported only when named here)
    loggers: List[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])
    tensorboard: bool = True  # false drops tensorboard from train.loggers (older configs)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # Stop before the job's allocation ends (megaloop/training/time_limit.py): minutes of wall clock from this
    # process's start, or "slurm" (the job's end time, $SLURM_JOB_END_TIME). time_limit_margin minutes before
    # it every rank saves a checkpoint and exits with code 75 (EX_TEMPFAIL: "time's up, requeue me").
    time_limit: Optional[str] = None
    time_limit_margin: float = 5.0
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # every N steps: fixed-point and per-loop gradient diagnostics of the looped block on the step's first
    # micro-batch (megaloop/training/diagnostics.py; extra passes, see there); 0 = off (costs nothing)
    diag_interval: int = 0
    # DeepSpeed's activation checkpointing for the looped block's per-loop / per-layer checkpoints
    # (need activation_checkpointing 'loop' or 'layer'):
    partition_activations: bool = False  # split checkpointed activations across TP ranks (TP > 1)
    cpu_checkpointing: bool = False  # offload checkpointed activations to CPU (a no-op on the cpu accelerator)
    sample_tokens: int = 0  # after training, generate this many tokens from sample_prompt (TP = 1 only)
    sample_prompt: str = "The "
    sample_temperature: float = 0.8  # 0 = greedy
    sample_top_k: int = 40
    # Training stage (megaloop/training/stages.py): pretrain | dsa_warmup (DeepSeek-V3.2's dense warm-up: only
    # the DSA indexers train, on the KL to the dense attention; the model attends densely) | exit_gate (Ouro's
    # stage II: only the exit gate trains, BCE against the loss-improvement target).
    stage: str = "pretrain"
    # exit_gate stage: target w(t) = sigmoid(slope * (max(0, L(t-1) - L(t)) - margin)) for continuing past
    # loop t (Ouro: slope k = 50, margin gamma = 0.005 nats of token loss).
    exit_gate_margin: float = 0.005
    exit_gate_slope: float = 50.0
    distill: DistillConfig = field(default_factory=DistillConfig)
    # all | converted: during train.distill.warmup_steps only the token mixers of the layers init.convert_mixers
    # converted change (the others' learning rate is 0); all parameters train afterwards
    trainable: str = "all"


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    # how pipeline stages are balanced: loop_weighted (layers weighted by FLOPs, the looped block by
    # its loop count) | uniform (layer count) | parameters (DeepSpeed's default; wrong for a looped block)
    pipeline_partition: str = "loop_weighted"
    # the number of ranks this config is meant for (0: not checked). The deepspeed launcher given a hostfile
    # it cannot read (`--hostfile /nonexistent`) warns and runs on this machine's GPUs alone; with this set,
    # every rank refuses a launch of any other world size at start-up.
    expected_world_size: int = 0


@dataclass
class InitConfig:
    """Where a new run's weights come from (as opposed to train.load / auto-resume, which continue a run)."""

    # `init.from` in YAML and overrides (`from` is a Python keyword): a run folder, a checkpoint root,
    # one tag folder (any TP x PP x ZeRO layout) or a plain checkpoint (tools/import_hf.py writes one).
    # The model's weights are loaded from it into this run's layout, with a fresh optimizer at step 0.
    # Applied only when the run starts; a resume of this run continues from its own checkpoints.
    from_: Optional[str] = field(default=None, metadata={"yaml": "from"})
    # Convert the source's softmax-attention looped layers into other mixers (LT2): the new per-layer
    # pattern, in model.mixer's syntax ("gdn,gdn,gdn,attn" or "3:1"); model.mixer must give the same pattern.
    # The rule (q/k/v/o from the attention, new parts at their own init): megaloop/checkpoint/convert_mixers.py.
    convert_mixers: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loop: LoopScheduleConfig = field(default_factory=LoopScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def to_dict(self) -> dict:
        """The config as YAML writes it (field names as the YAML spells them: init.from, not from_)."""
        return _yaml_dict(self)


def flat_dict(tree: dict, prefix: str = "") -> dict:
    """A nested dict (Config.to_dict()) as {"section.key": value}, the names overrides use."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def yaml_key(f: dataclasses.Field) -> str:
    """The name a config field has in YAML / overrides (its own name unless it is a Python keyword)."""
    return f.metadata.get("yaml", f.name)


def _yaml_dict(obj):
    if dataclasses.is_dataclass(obj):
        return {yaml_key(f): _yaml_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_yaml_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _yaml_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


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


