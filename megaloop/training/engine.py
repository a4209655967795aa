"""The DeepSpeed engine of a run: the model built, parallelised and wrapped, with its optimizer.

`build_engine` is the one place that turns a Config and a ParallelState into something to train:
    build the LoopedLM on the meta device -> tensor parallelism (megaloop.parallel.apply_tp) -> torch.compile
    per layer (train.compile) -> the pipeline split (PP > 1) -> each rank's parameters materialised on its
    device (megaloop.parallel.materialize: seeded, the same weights in any layout) -> DeepSpeed activation
    checkpointing for the looped block
    -> AdamW + LR schedule (+ megaloop's own clipping where DeepSpeed would not record the norm)
    -> deepspeed.initialize.
PP = 1 uses `deepspeed.initialize` on the LoopedLM itself (ZeRO 0-3); PP > 1 wraps the model into a
`deepspeed.pipe.PipelineModule` and trains with the pipeline engine (ZeRO 0-1).
"""
from __future__ import annotations

from typing import Optional

import torch

from megaloop.config import Config
from megaloop.training.ds_config import build_ds_config
from megaloop.training.optim import build_optimizer, build_scheduler, optimizer_kernel


def looped_layer_of(module):
    from megaloop.parallel.pipeline import looped_layer
    return looped_layer(module)


class SelfClip:
    """Gradient clipping as an optimizer pre-step hook, for the layouts where DeepSpeed clips without
    recording the norm (ZeRO 0 with fp32 weights: fp32, and bf16 under autocast). The norm counts every
    distinct element once over TP ranks and pipeline stages (megaloop.parallel.grad_norm) and stays on
    the device: it is read on logging steps only."""

    def __init__(self, cfg: Config, state, module):
        self.clip, self.state, self.module = cfg.train.grad_clip, state, module
        self.last_norm = None
        self._tied_dups = None

    def __call__(self, optimizer, args, kwargs):
        from megaloop.parallel.grad_norm import grad_norm_
        params, seen = [], set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        st = self.state
        group = st.mp_group if (st.pp_size > 1 or st.tp_size > 1) else None
        skip = self._is_tied_duplicate if st.pp_size > 1 else None
        self.last_norm = grad_norm_(params, self.clip, st.tp_rank, group, skip)

    def _is_tied_duplicate(self, p) -> bool:
        """The tied embedding lives on the first and the last stage with identical (all-reduced)
        gradients: count it on the first of its stages only."""
        if self._tied_dups is None:
            import deepspeed.comm as dist
            self._tied_dups, rank = set(), dist.get_rank()
            for key, tied in getattr(self.module, "tied_modules", {}).items():
                ranks = self.module.tied_comms[key]["ranks"] if key in getattr(self.module, "tied_comms", {}) else []
                if ranks and rank != min(ranks):
                    self._tied_dups.update(id(q) for q in tied.parameters())
        return id(p) in self._tied_dups


class TrainingEngine:
    """The DeepSpeed engine plus what the loop reads from it: the grad norm, the fp16 loss scale, the
    pipeline layer holding the looped block."""

    def __init__(self, cfg: Config, state, engine, module, clip: Optional[SelfClip], skip=None):
        self.cfg, self.state, self.engine, self.module, self.clip = cfg, state, engine, module, clip
        self.skip = skip  # megaloop.training.nonfinite.SkipNonFinite where megaloop skips non-finite steps

    def grad_norm(self):
        """This step's pre-clip global grad norm: a device tensor (read on logging steps), a float or None."""
        n = self.clip.last_norm if self.clip is not None else self.engine.get_global_grad_norm()
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

    def looped_layer(self):
        """The pipeline layer holding the looped block on this stage, or None (PP = 1, or another stage)."""
        return looped_layer_of(self.module) if self.cfg.parallel.pipeline_parallel > 1 else None

    def gathered_model(self):
        """The full, unsharded LoopedLM on the host of rank 0 (None elsewhere): the pipeline stages' weights
        gathered (collective over the world with PP > 1). Needs TP 1 and ZeRO < 3."""
        import deepspeed.comm as dist
        import torch.distributed as tdist
        from megaloop.model import build_model
        if self.cfg.parallel.pipeline_parallel > 1:
            from megaloop.parallel.pipeline import full_state_dict_of_stage
            first_replica = self.state.dp_rank == 0
            mine = full_state_dict_of_stage(self.module) if first_replica else {}
            mine = {k: v.detach().float().cpu() for k, v in mine.items()}
            gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            tdist.gather_object(mine, gathered, dst=0)
            if dist.get_rank() != 0:
                return None
            sd = {k: v for part in gathered for k, v in part.items()}
        else:
            if dist.get_rank() != 0:
                return None
            sd = {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        lm = build_model(self.cfg)
        missing, _ = lm.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "head.weight" and self.cfg.model.tie_embeddings)]
        if missing:
            raise RuntimeError(f"gathering the trained weights: missing {missing[:4]}")
        return lm.eval()


def _check_same_group_count_on_every_stage(optimizer, state, zero_stage: int) -> None:
    """ZeRO all-reduces the gradient norm once per optimizer group over all pipeline stages (DeepSpeed drops
    empty groups), so a stage with fewer groups than the others leaves them waiting forever in the first
    step: e.g. a last stage holding the tied head alone has no norm, hence no no-decay group. Refused here,
    on every rank, with one line instead of a hang."""
    import torch.distributed as tdist

    from megaloop.config import ConfigError
    from megaloop.parallel.device import on_accelerator, zeros_on_accelerator

    mine = on_accelerator([sum(1 for g in optimizer.param_groups if g["params"])], dtype=torch.long)
    counts = zeros_on_accelerator(state.world_size, dtype=torch.long)
    tdist.all_gather_into_tensor(counts, mine)
    counts = counts.tolist()  # once, at start-up
    if len(set(counts)) > 1:
        raise ConfigError(
            f"parallel.zero_stage={zero_stage} with pipeline_parallel={state.pp_size}: the pipeline stages hold "
            f"different numbers of AdamW groups (decay / no-decay; per global rank: {counts}), on which DeepSpeed's "
            f"ZeRO hangs in the first step (one gradient-norm all-reduce per group over all stages); use "
            f"parallel.zero_stage=0, or a split whose every stage holds a norm (e.g. model.share_outer_final_norm"
            f"=false, or fewer pipeline stages)")


def build_engine(cfg: Config, state, console, device: str, init_state: Optional[dict] = None) -> TrainingEngine:
    """console: a function printing one set-up line (the trainer prints on rank 0). init_state: the full
    LoopedLM state dict a new run starts from (init.from; megaloop.checkpoint.init_weights), loaded into the
    full model before it is sharded, split and wrapped, so it lands in any layout; or (init.convert_mixers) a
    function of the freshly initialised model's state dict returning that state dict."""
    import deepspeed
    t, p = cfg.train, cfg.parallel
    prepare = None
    if state.tp_size > 1:
        from megaloop.parallel.apply_tp import apply_tensor_parallel

        def prepare(lm):
            apply_tensor_parallel(lm, state)  # (also installs the TP gradient reduction)
    if t.compile:  # torch.compile every transformer layer after TP, before DeepSpeed (both PP branches)
        from megaloop.model.compile import compile_after
        prepare = compile_after(prepare, cfg)

    from megaloop.training.documents import document_packing
    packing = document_packing(cfg)

    def build_lm():
        # On the meta device: each rank materialises only the parameters it holds, after tensor parallelism
        # and the pipeline split (megaloop/parallel/materialize.py): no rank holds the whole model.
        from megaloop.model import build_model
        torch.manual_seed(t.seed)  # (the model's init seed: the same weights on every rank and machine)
        with torch.device("meta"):
            lm = build_model(cfg)
        lm.packing = packing  # data.reset_attention_mask / reset_position_ids (before TP / the pipeline split)
        return lm

    source = init_state  # init.from: the full state dict (read per tensor), or None: the initial values
    if callable(init_state):  # init.convert_mixers: the converted source over the run's own initial values
        from megaloop.parallel.materialize import InitialStateDict, meta_reference
        source = init_state(InitialStateDict(meta_reference(build_lm())))
    if state.pp_size > 1:
        from megaloop.parallel.pipeline import build_pipeline_module, layer_names
        module = build_pipeline_module(cfg, build_lm, state.topology, t.activation_checkpointing, prepare,
                                       device=device, initial_state=source)
        names, parts = layer_names(cfg.model), module.parts
        plan = " | ".join(", ".join(names[parts[s]:parts[s + 1]]) for s in range(state.pp_size))
        console(f"pipeline stages ({p.pipeline_partition}): {plan}")
    else:
        from megaloop.parallel.materialize import materialize_all
        module = build_lm()
        module.block.activation_checkpointing = t.activation_checkpointing
        if prepare is not None:
            prepare(module)
        materialize_all(module, device, source)
    if state.tp_size > 1:  # (the ranks of a TP group must have drawn the same replicated weights)
        from megaloop.parallel.apply_tp import check_replicated_parameters
        from megaloop.parallel.comm import TPComm
        check_replicated_parameters(module, TPComm.coerce(state))
    ckpt_fn, note = deepspeed_checkpoint_fn(t, state, torch.device(device).type)
    if ckpt_fn is not None:
        block = module.block if state.pp_size == 1 else getattr(looped_layer_of(module), "block", None)
        if block is not None:  # (a pipeline stage without the looped block has nothing to checkpoint)
            block.checkpoint_fn = ckpt_fn
        console(note)
    # Per-rank RNG (dropout, Huginn's noise start) after init: differs across data-parallel replicas,
    # identical across TP ranks and stages of one replica.
    from megaloop.parallel.random import set_parallel_seed
    set_parallel_seed(t.seed, state)

    # train.stage: freeze all but what the stage trains, before the optimizer and DeepSpeed see the parameters.
    from megaloop.training.stages import apply_train_stage
    stage_note = apply_train_stage(module, t)
    if stage_note:
        console(stage_note)
    device_type = torch.device(device).type
    held, hold_steps = (), 0
    if t.trainable == "converted":  # only the converted mixers train during the distillation warm-up
        from megaloop.training.distill import converted_mixer_parameter_names
        trainable = converted_mixer_parameter_names(module, cfg)
        held = {n for n, _ in module.named_parameters() if n not in trainable}
        hold_steps = t.distill.warmup_steps
        console(f"train.trainable=converted: {len(trainable)} parameter tensors train from step 0, the other "
                f"{len(held)} from step {hold_steps}")
    optimizer = build_optimizer(module, t, device_type, held, hold_steps)
    if state.pp_size > 1 and p.zero_stage >= 1:
        _check_same_group_count_on_every_stage(optimizer, state, p.zero_stage)
    scheduler = build_scheduler(optimizer, t)
    # DeepSpeed clips fp32-weight ZeRO-0 gradients without recording the norm, and steps torch's AdamW
    # there even when the norm is not finite: megaloop computes the norm (clipping if grad_clip > 0) and
    # skips a non-finite step itself (megaloop/training/nonfinite.py; DeepSpeed skips on its other paths).
    self_clip = p.zero_stage == 0 and (t.precision == "fp32" or (t.precision == "bf16" and t.bf16_impl == "autocast"))
    clip = skip = None
    if self_clip:
        from megaloop.training.nonfinite import SkipNonFinite
        clip = SelfClip(cfg, state, module)
        skip = SkipNonFinite(clip)
        optimizer.register_step_pre_hook(clip)
        optimizer.register_step_pre_hook(skip)  # (after the norm: hooks run in registration order)
    ds_config = build_ds_config(cfg, state.dp_size, clip_in_engine=not self_clip)
    mpu = state.grid if (state.tp_size > 1 and state.pp_size == 1) else None
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu)
    if state.pp_size > 1:
        # DeepSpeed reuses receive buffers by tuple position whatever their dtype: a middle looped stage
        # would receive the long loop counts into a float gradient buffer (megaloop/parallel/pipe_buffers.py)
        from megaloop.parallel.pipe_buffers import key_receive_buffers_by_dtype
        key_receive_buffers_by_dtype(engine)

    from megaloop.model.loop_schedule import clipping_warning
    clipped = clipping_warning(cfg.loop, t.seed)
    if clipped:
        console(f"warning: {clipped}")
    from megaloop.config.recipes import collapse_warning
    collapse = collapse_warning(cfg)
    if collapse:
        console(f"warning: {collapse}")
    recipe = {"bf16": f"bf16 ({t.bf16_impl})"}.get(t.precision, t.precision)
    console(f"precision {recipe}, {'Muon + ' if t.optimizer == 'muon' else ''}AdamW "
            f"{optimizer_kernel(t.optimizer_impl, device_type)}"
            f"{', torch.compile per layer' if t.compile else ''}")
    # Kernel choices, made (and probed) now on every rank, so a fallback warns before step 1.
    from megaloop.ops.fused import describe_norm_choice
    from megaloop.ops.gated_delta import describe_kernel_choice
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    console(f"{describe_kernel_choice(cfg, device, compute)}; {describe_norm_choice(device, compute)}")
    return TrainingEngine(cfg, state, engine, module, clip, skip)


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
    GradScaler - computed by running DeepSpeed's own scaling on a probe loss of 1 (a host sync)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    probe = torch.ones((), device=engine.device, requires_grad=True) * 1.0  # a scalar "loss" with a grad_fn
    scaled = probe / engine.gradient_accumulation_steps()
    opt = engine.optimizer
    if isinstance(opt, ZeROOptimizer):
        scaled = opt.scale_if_loss(scaled)
    elif getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        scaled = engine.torch_autocast_z0_gradscaler.scale(scaled)
    return float(scaled.detach().float().cpu())
