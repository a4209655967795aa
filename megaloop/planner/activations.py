"""Activation memory of one training micro-batch, per pipeline layer, from what the model saves.

Everything is in bytes per token of the micro-batch (B x T tokens), counted as the tensors autograd
keeps alive between forward and backward (each storage once; views and tensors shared across layers
or loops are not counted twice). Symbols: d = d_model, q = n_heads x head_dim and k = kv_heads x
head_dim and f = ffn_dim and V = the padded vocabulary (V' unpadded), all per TP rank (kv heads
replicated when kv_heads < TP); H = heads per rank. Dtype bytes: s for the residual stream and weights
(4 under fp32 and under bf16 `autocast`; 2 under bf16 `master_weights` / fp16), c for the matmul
outputs (2 under any bf16/fp16 recipe, 4 under fp32). "Composite" norms (CPU: torch's rms_norm is
decomposed) also save the normalised x (s.d) for the weight gradient; the fused CUDA kernels (torch's
fused rms_norm, Apex) save only the input and the 1/rms (4 bytes). The plan uses the CUDA terms.

RMSNorm feeding n linears:  input s.d + 4 [+ s.d composite] + inputs of the linears, which are
    autocast: one cast copy per linear, n.c.d (autocast casts the input again for each linear);
    otherwise the norm output, s.d, shared by the n linears (under sequence parallelism the norm and
    the residual stream hold T / tp tokens, s.d / tp, and the linears share one all-gathered
    full-sequence copy, s.d).
Transformer layer (pre-norm), attention mixer, its input included:
    attn norm feeding wq, wk, wv (+ the LT2 output gate)
    + SDPA: c.(q + 2k) (q, k after RoPE; v) + c.q (its output, wo's input) + 4.H (logsumexp);
      sliding window < T (blockwise): c.(2q + 4k + 4.window.H) (grouped q, k/v blocks, probabilities)
    [+ qk-norm: c.(q + k) + 4.(heads + kv heads) (+ s.(q + k) composite)] [+ output gate: 2.c.q]
    + MLP norm feeding w1, w3 (swiglu) or w1 (relu2)
    + swiglu 4.c.f (w1 out, silu out, w3 out, their product) or relu2 2.c.f (relu out, its square)
    [+ sandwich: each post norm saves its input c.d + 4 (+ s.d composite); huginn: the post norms
      on the stream save the residual sums, s.d + 4 (+ s.d composite) each]
    FLT query stream (every layer of flt, layer 0 of lt_ia, loops t >= 1): 4 (+ s.d composite)
    (+ s.d: its own norm output, when the q/k/v inputs are not autocast copies);
    flt_res: rms_norm(x + h) before every layer (t >= 1): 4.d + 4.
    Layer 0 of a loop that reads e itself (FLT, lt_ia; loop 0 of flt_res / lt_i / a plain recurrent
    loop starting from e) does not count its input again.
GatedDeltaNet mixer, as megaloop's torch chunked scan saves it (k' = heads x head_dim, v' = k' x
    gdn_expand_v, C = gdn_chunk_size): norm feeding six projections + c.(3.(2k' + v') (convolution
    input, output, silu) + 2k' (normalised q, k) + 5v' (output norm and gate)) + the scan, in fp32:
    4.(6.H.C (the per-chunk C x C matrices) + 2k' + 3v' (triangular solve, k.beta, output)) [+ 4.(2k'
    + v'): the fp32 copies of half q, k, v] + 40.H. flash-linear-attention's kernel (CUDA, when it is
    used) saves less: there the figure is an upper bound.
    DeepSeek sparse attention: as attention plus the indexer's inputs (approximate).
Per loop that carries gradients, outside the layers: the outer norm between loops (when
    normalization=outer; not after the last loop unless Ouro shares it with the final norm):
    loop output s.d + 4 [+ s.d composite] [+ the new state s.d where a norm of the next loop saves it:
    flt, lt_ia]; injection concat_adapter 2.c.d (autocast) or 2.s.d, parcae 8.d (B e and h, fp32);
    lt_i's rms_norm(e + h) 4.d + 4; Parcae's W_C saves each block output it projects (s.d or c.d).
Embedding: e (s.d), + embed_norm and prelude_norm as norms (the prelude norm is held by the last
    prelude layer).
Head: [Huginn's coda norm] + final norm feeding the head (Ouro: the block's output is already
    normed) + logits c.V (held by the caller through backward) + log_softmax output 4.V' (cross-entropy
    in fp32); with a per-loop loss every gradient-carrying loop has its own coda, final norm and logits.
Under autocast the bf16 copies of the weights (2 bytes per matrix element) are saved by the matmuls
    that use them, per micro-batch; with checkpointing the looped block's are not saved but re-made
    (all of them for `loop`, one layer's for `layer`) while it is recomputed.

Activation checkpointing, with G = gradient-carrying loops (loop.backprop_loops truncates; loops under
no_grad keep nothing; sampled schedules are sized for loop.max):
  none   the loop layer holds G x (n_loop layers + the per-loop terms);
  loop   G x (the checkpoint's input state + the per-loop terms outside it); the recomputed loop
         (n_loop layers + injection) is alive during its backward;
  layer  G x (n_loop layer inputs s.d + the per-loop terms, which run outside the layer checkpoints);
         one recomputed layer is alive during its backward.
Peak of one micro-batch. Backward runs the layers in reverse and frees each one's saved tensors as it
goes, so at layer i what is alive is: the saved tensors of the layers up to i, the held logits, and
layer i's transient:
  head       8.V' (log_softmax's and its input's gradients, fp32) + c.V (the padded logits' gradient)
             + s.d, and the head's weight gradient (g.V.d, untied head);
  a layer    its recomputation (if checkpointed) + 2.s.d (the stream's gradients) + the weight
             gradients made before they are accumulated: g.3.d.f (the MLP matrices');
  the loop   with G >= 2 the engine sums each shared weight's per-loop gradients in a buffer before
             accumulating them: c x the block's parameters (fp32: 4, autocast: 2, the bf16 copies'
             gradients), full once the last loop's backward is done;
  tied       the tied embedding's gradient from the head waits for the embedding's: g.V.d throughout.
(g: gradient bytes, 4 unless bf16 master_weights / fp16.) Checked against the exact live bytes of real
CPU steps by benchmarks/bench_plan_memory.py; on GPUs the allocator's rounding and the attention
kernels' workspaces come on top.

Pipeline (1F1B): stage s of p keeps the saved activations of up to min(p - s, m) micro-batches in
flight (m = grad_accum_steps), plus the received stage input (s.d per tensor passed, 2 tensors into
a looped stage of the FLT family / with internal recall or injection: the stream and e).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from megaloop.config import Config, mixer_pattern


@dataclass
class _Dims:
    d: float  # stream width per token (d / tp under sequence parallelism for the norm/residual terms)
    d_full: float  # full d (linear inputs after the sequence all-gather)
    q: float
    k: float
    H: float
    Hkv: float
    f: float
    V: float
    Vreal: float  # the unpadded vocabulary (per rank): cross-entropy's log_softmax
    s: int
    c: int
    autocast: bool
    composite: bool  # norms save x * rstd too (CPU's decomposed rms_norm, when the norm has a weight)
    sp: bool


def dims(cfg: Config, tp: int = 1, device: str = "cuda") -> _Dims:
    m, t = cfg.model, cfg.train
    hd = m.attn_head_dim
    sp = bool(cfg.parallel.sequence_parallel) and tp > 1
    autocast = t.precision == "bf16" and t.bf16_impl == "autocast"
    s = 4 if t.precision == "fp32" or autocast else 2
    c = 4 if t.precision == "fp32" else 2
    kv_local = max(1.0, m.kv_heads / tp)
    vocab = m.vocab_size if tp == 1 else m.padded_vocab_size  # the vocab-parallel loss sees the shard
    return _Dims(d=m.d_model / (tp if sp else 1), d_full=m.d_model, q=m.n_heads * hd / tp, k=kv_local * hd,
                 H=m.n_heads / tp, Hkv=kv_local, f=m.ffn_dim / tp, V=m.padded_vocab_size / tp, Vreal=vocab / tp,
                 s=s, c=c, autocast=autocast, composite=device == "cpu" and m.norm_scale, sp=sp)


def _rstd(z: _Dims) -> float:
    return 4.0 * z.d / z.d_full  # one fp32 per token (per sequence shard under SP)


def lin_inputs(z: _Dims, n: int) -> float:
    """The saved inputs of n linears fed by one norm output."""
    if z.autocast:
        return n * z.c * z.d_full
    return z.s * z.d_full  # under SP: the one all-gathered full-sequence copy


def norm(z: _Dims, consumers: int = 0) -> float:
    """An RMSNorm with its input (counted here) feeding `consumers` linears (0: its output is counted
    by whoever saves it)."""
    b = z.s * z.d + _rstd(z) + (z.s * z.d if z.composite else 0.0)
    return b + (lin_inputs(z, consumers) if consumers else 0.0)


def layer(cfg: Config, z: _Dims, mixer: str = "attn", q_source: bool = False) -> float:
    """Bytes per token one transformer layer saves (its input included)."""
    m = cfg.model
    gate = bool(m.attn_output_gate) and mixer != "gdn"
    if mixer == "gdn":
        kk = z.H * m.attn_head_dim
        vv = kk * m.gdn_expand_v
        qkv = (2 * kk + vv) * (3 + (m.conv_size - 1) / cfg.data.seq_len)  # conv in (padded), out, silu
        # the scan runs in fp32 (half inputs are copied up): chunk matrices, solve, k*beta, o
        scan = 4 * (6 * z.H * m.gdn_chunk_size + (kk + vv) + (kk + 2 * vv)) + (4 * (2 * kk + vv) if z.c != 4 else 0)
        b = norm(z, 6) + z.c * (qkv + 2 * kk + 5 * vv) + scan + 40 * z.H
    else:
        b = norm(z, 3 + int(gate))
        if mixer == "swa" and m.window < cfg.data.seq_len:  # blockwise: grouped q, k/v blocks, probs
            b += z.c * (2 * z.q + 4 * z.k + 2 * 2 * m.window * z.H)
        else:  # SDPA saves q, k, v, its output and the logsumexp
            b += z.c * (z.q + 2 * z.k) + z.c * z.q + 4 * z.H
        if m.qk_norm:
            b += z.c * (z.q + z.k) + 4 * (z.H + z.Hkv) + (z.s * (z.q + z.k) if z.composite else 0.0)
        if gate:
            b += 2 * z.c * z.q
        if mixer == "dsa":  # the indexer's (detached) inputs and top-k selection: small, approximate
            b += z.c * (m.dsa_index_heads * m.dsa_index_dim + m.dsa_index_dim) + 8 * m.dsa_topk
    if q_source:
        b += _rstd(z) + (z.s * z.d if z.composite else 0.0) + (0.0 if z.autocast else z.s * z.d_full)
    if m.norm_style == "sandwich":  # post norms on the sub-layer outputs
        b += 2 * (z.c * z.d + _rstd(z) + (z.s * z.d if z.composite else 0.0))
    elif m.norm_style == "huginn":  # post norms on the stream: each saves the residual sum
        b += 2 * (z.s * z.d + _rstd(z) + (z.s * z.d if z.composite else 0.0))
    b += norm(z, 2 if m.mlp == "swiglu" else 1)
    b += z.c * z.f * (4 if m.mlp == "swiglu" else 2)
    return b


def layer_work(cfg: Config, z: _Dims) -> float:
    """Backward transient of one layer beyond what it frees: the stream gradients in flight."""
    return 2 * z.s * z.d


def _q_layers(cfg: Config) -> List[bool]:
    arch, n = cfg.model.arch, cfg.model.n_loop
    if arch == "flt":
        return [True] * n
    if arch == "lt_ia":
        return [True] + [False] * (n - 1)
    return [False] * n


def _shared_input(cfg: Config, t: int) -> bool:
    """Whether layer 0 of loop t reads e itself (saved once, by the embedding) rather than a new tensor."""
    m = cfg.model
    if m.arch in ("flt", "lt_ia"):
        return True
    if m.arch in ("flt_res", "lt_i"):
        return t == 0
    plain_input = m.injection == "none" or m.recall == "internal"
    return t == 0 and plain_input and m.state_init == "embed"


def _state_saved(cfg: Config) -> bool:
    """Whether the carried state h(t) is saved by its consumer outside the next loop's layer 0 input:
    the query-stream norms (flt, lt_ia) or Parcae's injection (Abar * h)."""
    m = cfg.model
    return m.arch in ("flt", "lt_ia") or (m.arch == "recurrent" and m.injection == "parcae"
                                           and m.recall != "internal")


def loop_layers(cfg: Config, z: _Dims, t: int) -> float:
    """The n_loop layers of loop iteration t (the previous loop's query stream when t > 0)."""
    names = mixer_pattern(cfg.model.mixer, cfg.model.n_loop, cfg.model.linear_mixer)
    b = sum(layer(cfg, z, mx, q and t > 0) for mx, q in zip(names, _q_layers(cfg)))
    if cfg.model.arch == "flt_res" and t > 0:  # x = rms_norm(x + h) before every layer
        b += cfg.model.n_loop * (4 * z.d + _rstd(z))
    return b - (z.s * z.d if _shared_input(cfg, t) else 0.0)


def loop_extras(cfg: Config, z: _Dims, t: int, last: bool) -> Dict[str, float]:
    """Per-loop terms outside the layers: the carry norm (and the state it makes, when saved by a
    consumer other than the next loop's layer 0), the injection, lt_i's input norm."""
    m = cfg.model
    carry = 0.0
    if m.normalization == "outer" and (not last or m.share_outer_final_norm):
        carry = z.s * z.d + _rstd(z) + (z.s * z.d if z.composite else 0.0)
        if _state_saved(cfg) and not last:
            carry += z.s * z.d
    inject = 0.0
    if m.arch == "recurrent" and m.recall != "internal":
        if m.injection == "concat_adapter":
            inject = 2 * (z.c if z.autocast else z.s) * z.d_full
        elif m.injection == "parcae":
            inject = 8 * z.d  # delta * (B e) saves B e, Abar * h saves h in fp32
    if m.arch == "lt_i" and t > 0:
        inject = 4 * z.d + _rstd(z)
    return {"carry": carry, "inject": inject}


def loop_block(cfg: Config, z: _Dims, R: int, G: int, mode: str) -> Dict[str, float]:
    """(saved, recompute-at-peak) bytes per token of the looped block, R loops of which the last G
    carry gradients."""
    saved, recompute = 0.0, 0.0
    n = cfg.model.n_loop
    names = mixer_pattern(cfg.model.mixer, n, cfg.model.linear_mixer)
    for t in range(R - G, R):
        ex = loop_extras(cfg, z, t, last=t == R - 1)
        full = loop_layers(cfg, z, t)
        own_input = 0.0 if _shared_input(cfg, t) else z.s * z.d
        if mode == "none":
            saved += full + ex["carry"] + ex["inject"]
        elif mode == "loop":
            # the checkpoint keeps its input state (unless that is e, or saved by the carry already);
            # the carry norm runs outside it, the injection inside
            held = t > 0 and _state_saved(cfg) and cfg.model.normalization == "outer"  # in `carry`
            inp = 0.0 if (t == 0 and _shared_input(cfg, 0)) or held else z.s * z.d
            saved += inp + ex["carry"]
            recompute = max(recompute, full + ex["inject"] - own_input)
        else:  # layer: every layer keeps its input; the injection and the carry run outside
            saved += (n - 1) * z.s * z.d + own_input + ex["carry"] + ex["inject"]
            if cfg.model.arch == "flt_res" and t > 0:
                saved += n * (4 * z.d + _rstd(z))
            one = max(layer(cfg, z, mx, q and t > 0) for mx, q in zip(names, _q_layers(cfg)))
            recompute = max(recompute, one - z.s * z.d)
    return {"saved": saved, "recompute": recompute}


def head_bytes(cfg: Config, z: _Dims) -> float:
    """Final norm feeding the head, the held logits, log_softmax's output."""
    m = cfg.model
    b = z.c * z.V + 4 * z.Vreal
    if m.logit_softcap is not None:
        b += z.c * z.V
    if getattr(m, "coda_norm", False):  # Huginn: the loop output is normed before the coda
        b += norm(z)
    if m.share_outer_final_norm:  # Ouro: the block applied the final norm; its output (the next
        return b + (lin_inputs(z, 1) if z.autocast else 0.0)  # loop's input, or the last) feeds the head
    return b + norm(z, 1)


def layer_bytes(cfg: Config, z: _Dims, R: int, G: int, mode: str) -> Dict[str, dict]:
    """Per pipeline layer name: {'saved', 'work'} bytes per token ('work': the backward transient
    reached while that layer runs backward, on top of everything saved)."""
    m = cfg.model
    per_loss = 1 if cfg.loop.loss == "last" else G
    lay = layer(cfg, z)
    out = {"embedding": {"saved": z.s * z.d, "work": 0.0},
           "embed_norm": {"saved": norm(z) if m.embed_norm else 0.0, "work": 0.0},
           "prelude": {"saved": lay, "work": layer_work(cfg, z)},
           "prelude_norm": {"saved": norm(z), "work": 0.0},
           "coda": {"saved": lay * per_loss, "work": layer_work(cfg, z)},
           "final_norm": {"saved": 0.0, "work": 0.0},
           "head": {"saved": head_bytes(cfg, z) * per_loss, "work": 8 * z.Vreal + z.c * z.V + z.s * z.d,
                    "held": z.c * z.V * per_loss}}
    lb = loop_block(cfg, z, R, G, mode)
    out["loop"] = {"saved": lb["saved"], "work": lb["recompute"] + layer_work(cfg, z)}
    outputs = G if cfg.loop.loss != "last" or m.exit_gate else 1  # loop outputs leaving the block
    if m.injection == "parcae":  # Parcae's W_C on every output of the block
        out["loop"]["saved"] += outputs * lin_inputs(z, 1)
    if m.share_outer_final_norm and not z.autocast:  # the last loop's output, saved by the head
        out["head"]["saved"] += z.s * z.d
    elif per_loss > 1 and not m.n_coda and not getattr(m, "coda_norm", False):
        # per-loop loss without a coda: the final norm's input on every loop but the last is the next
        # loop's input, which the loop block already saved (one tensor, counted once)
        out["head"]["saved"] -= (per_loss - 1) * z.s * z.d
    out["head"]["work"] -= out["head"]["held"]  # the held logits are counted apart (never freed)
    if m.exit_gate:  # the gate's input casts, its sigmoid
        out["head"]["saved"] += G * ((z.c * z.d_full if z.autocast else 0.0) + 8)
    return out


def loop_memory_counts(cfg: Config):
    """(R, G) the memory must hold: a fixed R, or loop.max for a sampled schedule."""
    from megaloop.model.loop_schedule import grad_loops

    R = int(cfg.loop.mean) if cfg.loop.sampling == "fixed" else int(cfg.loop.max)
    return R, grad_loops(cfg.loop, R)


def grad_bytes(cfg: Config) -> int:
    t = cfg.train
    return 2 if t.precision == "fp16" or (t.precision == "bf16" and t.bf16_impl == "master_weights") else 4


def stage_names(cfg: Config, lo: int = 0, hi: int = None) -> List[str]:
    """The pipeline layer names [lo, hi) of `pl.layer_names`, with "prelude_norm" after the layer that
    applies it (the last prelude layer, or the embedding norm layer when there is no prelude)."""
    from megaloop.parallel import pipeline as pl

    full = pl.layer_names(cfg.model)
    hi = len(full) if hi is None else hi
    last_prelude = max([i for i, n in enumerate(full) if n == "prelude"], default=None)
    out = []
    for i in range(lo, hi):
        out.append(full[i])
        if cfg.model.use_prelude_norm and (i == last_prelude or (last_prelude is None and full[i] == "embed_norm")):
            out.append("prelude_norm")
    return out


def activation_bytes(cfg: Config, names: List[str] = None, tp: int = 1, device: str = "cuda",
                     loop_params: int = 0, tied_params: int = 0, matrix_params: int = 0,
                     in_flight: int = 1, receives: int = 0) -> dict:
    """Activation bytes of one rank holding the pipeline layers `names` (`stage_names`; default: the
    whole model).

    loop_params: parameters of the looped block on this rank (with G >= 2 loops carrying gradients
    the autograd engine sums each shared weight's per-loop gradients in a buffer before accumulating
    them: one block-sized gradient in flight during the block's backward); tied_params: the tied
    embedding on this rank when it holds both the embedding and the head (the head's gradient for it
    waits for the embedding's, through the whole backward); matrix_params: the weights autocast makes
    bf16 copies of; in_flight: micro-batches whose activations are saved at once (1F1B);
    receives: stage-input tensors (s.d each) held per micro-batch.

    Returns {'saved': one micro-batch, 'peak': in_flight x saved + the largest transient,
    'per_layer_per_token', 'R', 'G', 'autocast_weights', 'grad_buffers'}."""
    z = dims(cfg, tp, device)
    R, G = loop_memory_counts(cfg)
    names = stage_names(cfg) if names is None else names
    per = layer_bytes(cfg, z, R, G, cfg.train.activation_checkpointing)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    # autocast's bf16 weight copies: saved with the activations that use them (every micro-batch's
    # forward makes its own), re-made by the recomputation of a checkpointed loop / layer
    mode = cfg.train.activation_checkpointing
    casts = 2.0 * (matrix_params - (0 if mode == "none" else loop_params)) if z.autocast else 0.0
    recast = 0.0
    if z.autocast and mode != "none":
        recast = 2.0 * loop_params / (1 if mode == "loop" else cfg.model.n_loop)
    saved = (sum(per[n]["saved"] for n in names) + receives * z.s * z.d) * tokens + casts
    g = grad_bytes(cfg)
    loop_buffer = z.c * loop_params if G >= 2 else 0.0  # summed in the matmul dtype (autocast: bf16)
    # Backward runs the layers in reverse and frees each one's saved tensors as it goes: at layer i the
    # layers before it (and the logits the caller holds) are still saved.
    held = per["head"]["held"] * tokens if "head" in names else 0.0
    below, during = receives * z.s * z.d * tokens + casts, []
    # A layer's weight gradients are made before they are accumulated: the three MLP matrices' (the
    # largest) in flight; the head's own (untied: a tied one is the buffer above).
    m = cfg.model
    weight_grads = {n: g * 3 * m.d_model * m.ffn_dim / tp for n in ("prelude", "loop", "coda")}
    weight_grads["head"] = 0.0 if tied_params else g * m.d_model * m.padded_vocab_size / tp
    for n in names:
        extra = weight_grads.get(n, 0.0) + (held if n != "head" else 0.0)
        if n == "loop" and loop_buffer and cfg.train.activation_checkpointing == "none":
            # the buffer is full once the last loop's backward is done and its activations are freed
            during.append(below + per[n]["saved"] * tokens * (G - 1) / G + loop_buffer + extra)
            loop_transient = 0.0
        else:
            loop_transient = loop_buffer + recast if n == "loop" else 0.0
        below += per[n]["saved"] * tokens
        during.append(below + per[n]["work"] * tokens + loop_transient + extra)
    current = max(during + [0.0])
    tied = g * tied_params
    peak = (in_flight - 1) * saved + max(current, saved) + tied
    return {"saved": saved, "peak": peak, "autocast_weights": casts + recast, "grad_buffers": tied + loop_buffer,
            "R": R, "G": G, "per_layer_per_token": {n: per[n]["saved"] for n in dict.fromkeys(names)}}


def model_counts(lm) -> dict:
    """loop_params / tied_params / matrix_params of a one-process LoopedLM (for activation_bytes)."""
    tied = lm.head.weight is lm.embedding.weight
    return {"loop_params": sum(p.numel() for p in lm.block.parameters()),
            "tied_params": lm.embedding.weight.numel() if tied else 0,
            "matrix_params": sum(p.numel() for n, p in lm.named_parameters() if p.dim() == 2 and "embedding" not in n)
            + (lm.embedding.weight.numel() if tied else 0)}
