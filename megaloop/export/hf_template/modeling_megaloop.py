"""Looped transformer language models exported from megaloop, for Hugging Face transformers.

Self-contained: imports only torch and transformers (never megaloop). It re-implements every
architecture of the megaloop family with megaloop's parameter names, so a megaloop state dict loads
1:1:

  embedding -> embed_norm -> prelude -> looped block x R -> (out_proj) -> coda -> final_norm -> head

  arch recurrent  s(t) = Block(inject(s(t-1), e)); injection none | add | concat_adapter | parcae,
                  standard or internal recall, inner or outer normalization, state init
                  embed | zeros | noise, Ouro's shared final norm (share_outer_final_norm)
  arch flt        every loop restarts from e; attention queries of every layer from h(k-1)
  arch lt_ia      ... queries of layer 0 only
  arch lt_i       the stream starts from norm(e + h(k-1))
  arch flt_res    every layer first does x = norm(x + h(k-1))
  layers          pre-norm or sandwich norm, RoPE, GQA, optional QK-norm, SwiGLU or ReLU^2, LT2's
                  zero-init sigmoid attention output gate; LT2's per-loop residual gate rho;
                  logit soft-cap; tied or untied head; Ouro exit gate.

Usage:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    out = model(input_ids, num_loops=8)                        # any R >= 1
    out = model(input_ids, exit_strategy="kl", exit_threshold=1e-3)  # out.exit_loops: loop per token
    ids = model.generate(input_ids, max_new_tokens=32, num_loops=6)  # kwargs reach forward()

KV cache (`MegaloopCache`): one slot per (loop, layer) pair, plus one per prelude layer and per
(loop, coda layer) pair: every loop attends to its own keys/values of the earlier positions. For
the FLT family the query of a new position comes from the previous loop's h at that position (computed
in the same step), while keys/values come from the current loop's stream, which is exactly what the
per-(loop, layer) slots hold. A cache is tied to the number of loops (and exit mode) it was filled
with; continuing it with another R is refused.

Token mixers are looked up by name in MIXERS ("attn" only for now); a config naming another mixer is
refused with a clear message. A new mixer (e.g. Gated DeltaNet) implements the MegaloopAttention call
signature and keeps its per-(loop, layer) state in the cache slot dict it receives.

Noise state init: see MegaloopConfig.noise_init (default "seeded": deterministic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

try:
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover - very old transformers: PreTrainedModel is the mixin
    GenerationMixin = object

from .configuration_megaloop import MegaloopConfig

try:
    import transformers as _tf

    _TF_MAJOR = int(_tf.__version__.split(".")[0])
except Exception:  # pragma: no cover
    _TF_MAJOR = 5


# ------------------------------------------------------------------------------------------------
# Building blocks (numerically identical to megaloop/model/layers.py)


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None

    def forward(self, x):
        y = rms_norm(x, self.eps)
        return y * self.weight if self.weight is not None else y


def rope_for_positions(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin of shape (B, T, head_dim/2) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by position, halves layout; cos/sin (B, T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


@dataclass
class AttnContext:
    """What every mixer call of one forward shares: rotary tables and the attention mask."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: Optional[torch.Tensor]  # bool (B, 1, T, past + T), True = attend; None = plain causal
    causal: bool  # use is_causal (no cache, no padding): bit-identical to megaloop's path


class MegaloopAttention(nn.Module):
    """Causal GQA softmax attention with RoPE, optional QK-norm and LT2 output gate.

    q_input: the normalised stream the queries come from (FLT attention injection), else x.
    slot:    this (segment, loop, layer)'s cache dict ({"k", "v"} of earlier positions), or None.
    """

    def __init__(self, config: MegaloopConfig, layer_idx: int = 0):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.head_dim = hd
        self.wq = nn.Linear(d, config.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(config.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.norm_eps, config.norm_scale) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.norm_eps, config.norm_scale) if config.qk_norm else None
        self.gate = nn.Linear(d, config.n_heads * hd, bias=False) if config.attn_output_gate else None

    def forward(self, x, ctx: AttnContext, q_input=None, slot: Optional[dict] = None):
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.wq(x if q_input is None else q_input).view(B, T, -1, hd)
        k = self.wk(x).view(B, T, -1, hd)
        v = self.wv(x).view(B, T, -1, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if slot is not None:
            if "k" in slot:
                k = torch.cat([slot["k"], k], dim=2)
                v = torch.cat([slot["v"], v], dim=2)
            slot["k"], slot["v"] = k, v
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if ctx.mask is None and (ctx.causal or T == 1):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal and T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
        y = y.transpose(1, 2).reshape(B, T, -1)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return self.wo(y)

    @staticmethod
    def extend_slot(dst: dict, src: dict, n_new: int):
        """Give `dst` (a skipped loop's slot) the newest n_new positions of `src` (exit_kv='copy')."""
        for name in ("k", "v"):
            new = src[name][:, :, -n_new:]
            dst[name] = torch.cat([dst[name], new], dim=2) if name in dst else new


# Token mixers by name. Gated DeltaNet and sparse attention are added here when megaloop has them.
MIXERS = {"attn": MegaloopAttention}


def mixer_pattern(spec: str, n_layers: int) -> List[str]:
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names or n_layers % len(names):
        raise ValueError(f"MegaloopConfig.mixer={spec!r} does not tile the {n_layers} looped layers")
    for n in names:
        if n not in MIXERS:
            raise ValueError(
                f"MegaloopConfig.mixer={spec!r} names the token mixer {n!r}, which this exported "
                f"modeling_megaloop.py does not implement (it has: {sorted(MIXERS)}). Re-export the "
                f"checkpoint with a megaloop version whose exporter supports {n!r}.")
    return names * (n_layers // len(names))


class MLP(nn.Module):
    def __init__(self, config: MegaloopConfig):
        super().__init__()
        d, f = config.d_model, config.ffn_hidden
        self.kind = config.mlp
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False) if config.mlp == "swiglu" else None
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.w1(x)) * self.w3(x)
        else:
            h = F.relu(self.w1(x)).square()
        return self.w2(h)


class MegaloopLayer(nn.Module):
    def __init__(self, config: MegaloopConfig, layer_idx: int = 0, mixer: str = "attn"):
        super().__init__()
        eps, scale = config.norm_eps, config.norm_scale
        self.attn_norm = RMSNorm(config.d_model, eps, scale)
        self.mixer = MIXERS[mixer](config, layer_idx)
        self.mlp_norm = RMSNorm(config.d_model, eps, scale)
        self.mlp = MLP(config)
        self.sandwich = config.norm_style == "sandwich"
        if self.sandwich:
            self.attn_post_norm = RMSNorm(config.d_model, eps, scale)
            self.mlp_post_norm = RMSNorm(config.d_model, eps, scale)

    def forward(self, x, ctx, q_source=None, recall=None, recall_site="pre_mlp", slot=None):
        if recall is not None and recall_site == "pre_attn":
            x = x + recall
        h = self.attn_norm(x)
        q_in = self.attn_norm(q_source) if q_source is not None else None
        a = self.mixer(h, ctx, q_input=q_in, slot=slot)
        if self.sandwich:
            a = self.attn_post_norm(a)
        x = x + a
        if recall is not None and recall_site == "pre_mlp":
            x = x + recall
        m = self.mlp(self.mlp_norm(x))
        if self.sandwich:
            m = self.mlp_post_norm(m)
        return x + m


# ------------------------------------------------------------------------------------------------
# Injection (megaloop/model/injection.py)


class AddInjection(nn.Module):
    def forward(self, s, e):
        return s + e


class ConcatAdapterInjection(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.adapter = nn.Linear(2 * d, d, bias=False)

    def forward(self, s, e):
        return self.adapter(torch.cat([s, e], dim=-1))


class ParcaeInjection(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.zeros(d))
        self.B = nn.Parameter(torch.eye(d))

    def forward(self, s, e):
        delta = F.softplus(self.dt_bias.float())
        a_bar = torch.exp(-(delta * torch.exp(self.A_log.float())).clamp_min(1e-6))
        return (a_bar.type_as(s) * s) + delta.type_as(e) * F.linear(e, self.B)


class LoopedBlock(nn.Module):
    """Parameters of the shared looped layers and of how loops connect (names as in megaloop)."""

    def __init__(self, config: MegaloopConfig):
        super().__init__()
        names = mixer_pattern(config.mixer, config.n_loop)
        self.layers = nn.ModuleList(MegaloopLayer(config, i, n) for i, n in enumerate(names))
        self.injection = None
        if config.arch == "recurrent":
            if config.injection == "add":
                self.injection = AddInjection()
            elif config.injection == "concat_adapter":
                self.injection = ConcatAdapterInjection(config.d_model)
            elif config.injection == "parcae":
                self.injection = ParcaeInjection(config.d_model)
        self.outer_norm = (RMSNorm(config.d_model, config.norm_eps, config.norm_scale)
                           if config.normalization == "outer" else None)
        self.rho = nn.Parameter(torch.zeros(config.max_loops, config.d_model)) if config.loop_residual_gate else None
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False) if config.injection == "parcae" else None


# ------------------------------------------------------------------------------------------------
# Cache


class MegaloopCache:
    """Keys/values per (segment, loop, layer): a dict slot each, filled by the mixers.

    Duck-types the bits of transformers' Cache interface that generate() reads."""

    is_compileable = False
    is_croppable = False

    def __init__(self):
        self.slots: Dict[Tuple, dict] = {}
        self.seq_len = 0
        self.num_loops: Optional[int] = None
        self.exit_mode: Optional[Tuple] = None

    # transformers' Cache API subset
    @property
    def is_linear(self):
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def get_max_cache_shape(self, layer_idx: int = 0):
        return -1

    def __len__(self):
        return len(self.slots)

    def slot(self, key: Tuple) -> dict:
        return self.slots.setdefault(key, {})

    def _map(self, fn):
        for slot in self.slots.values():
            for name, value in list(slot.items()):
                if torch.is_tensor(value):
                    slot[name] = fn(value)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda t: t[indices])


if _TF_MAJOR >= 5:  # transformers 5 names the cache output `cache` (and refuses `past_key_values` beside it)
    @dataclass
    class MegaloopCausalLMOutput(ModelOutput):
        loss: Optional[torch.FloatTensor] = None
        logits: Optional[torch.FloatTensor] = None
        cache: Optional[MegaloopCache] = None
        hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
        exit_loops: Optional[torch.LongTensor] = None  # (B, T), 1-based loop each token's logits come from
        loops_computed: Optional[int] = None  # iterations actually run in this call
        per_loop_logits: Optional[Tuple[torch.FloatTensor, ...]] = None
else:  # pragma: no cover - transformers 4.x reads `past_key_values`
    @dataclass
    class MegaloopCausalLMOutput(ModelOutput):
        loss: Optional[torch.FloatTensor] = None
        logits: Optional[torch.FloatTensor] = None
        past_key_values: Optional[MegaloopCache] = None
        hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
        exit_loops: Optional[torch.LongTensor] = None
        loops_computed: Optional[int] = None
        per_loop_logits: Optional[Tuple[torch.FloatTensor, ...]] = None

_CACHE_FIELD = "cache" if _TF_MAJOR >= 5 else "past_key_values"


# ------------------------------------------------------------------------------------------------
# The model


class MegaloopPreTrainedModel(PreTrainedModel):
    config_class = MegaloopConfig
    base_model_prefix = "megaloop"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MegaloopLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own MegaloopCache


class MegaloopForCausalLM(MegaloopPreTrainedModel, GenerationMixin):
    if _TF_MAJOR >= 5:
        _tied_weights_keys = {"head.weight": "embedding.weight"}
    else:  # pragma: no cover
        _tied_weights_keys = ["head.weight"]

    def __init__(self, config: MegaloopConfig):
        super().__init__(config)
        config.check()
        d = config.d_model
        self.embedding = nn.Embedding(config.padded_vocab_size, d)
        self.embed_norm = RMSNorm(d, config.norm_eps, config.norm_scale) if config.embed_norm else None
        self.prelude = nn.ModuleList(MegaloopLayer(config, i) for i in range(config.n_prelude))
        self.block = LoopedBlock(config)
        self.coda = nn.ModuleList(MegaloopLayer(config, i) for i in range(config.n_coda))
        self.final_norm = RMSNorm(d, config.norm_eps, config.norm_scale)
        self.head = nn.Linear(d, config.padded_vocab_size, bias=False)
        self.exit_gate = nn.Linear(d, 1) if config.exit_gate else None
        self._noise_table: Optional[torch.Tensor] = None
        self.post_init()
        if config.tie_word_embeddings:
            self.head.weight = self.embedding.weight

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    # --- pieces ---------------------------------------------------------------------------------
    def noise_for_positions(self, positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """noise_init='seeded': a truncated-normal row per position (std init_std, cut at 3 std),
        drawn in 64-row chunks from generators seeded by (noise_seed, chunk): deterministic and the
        same whatever the sequence length, batch size or cache use."""
        cfg = self.config
        need = int(positions.max()) + 1 if positions.numel() else 1
        table = self._noise_table
        if table is None or table.shape[0] < need:
            rows = 64 * math.ceil(max(need, cfg.max_seq_len) / 64)
            chunks = []
            for c in range(rows // 64):
                g = torch.Generator().manual_seed(int(cfg.noise_seed) * 1_000_003 + c)
                chunk = torch.empty(64, cfg.d_model)
                nn.init.trunc_normal_(chunk, std=cfg.init_std, a=-3 * cfg.init_std, b=3 * cfg.init_std,
                                      generator=g)
                chunks.append(chunk)
            table = self._noise_table = torch.cat(chunks)
        return table.to(like.device)[positions].to(like.dtype)

    def _initial_state(self, e, positions):
        cfg = self.config
        if cfg.state_init == "embed":
            return e
        if cfg.state_init == "zeros" or cfg.noise_init == "zeros":
            return torch.zeros_like(e)
        if cfg.noise_init == "global_rng":  # exactly megaloop's draw
            return nn.init.trunc_normal_(torch.empty_like(e), std=cfg.init_std,
                                         a=-3 * cfg.init_std, b=3 * cfg.init_std)
        return self.noise_for_positions(positions, e)

    def _run_loop_layers(self, t, x, ctx, cache, h_prev=None, recall=None):
        cfg, blk = self.config, self.block
        for i, layer in enumerate(blk.layers):
            q_src = None
            if h_prev is not None:
                if cfg.arch == "flt" or (cfg.arch == "lt_ia" and i == 0):
                    q_src = h_prev
                elif cfg.arch == "flt_res":
                    x = rms_norm(x + h_prev, cfg.norm_eps)
            rec = recall if (recall is not None and (i == 0 or cfg.internal_recall_layers == "all")) else None
            slot = cache.slot(("loop", t, i)) if cache is not None else None
            x = layer(x, ctx, q_source=q_src, recall=rec, recall_site=cfg.internal_recall_site, slot=slot)
        return x

    def _step(self, t, s, e, ctx, cache):
        """One loop iteration from state s = h(t-1): the raw output x(t) (megaloop's LoopedBlock.step)."""
        cfg, blk = self.config, self.block
        if cfg.arch == "recurrent":
            internal = cfg.recall == "internal"
            recall = e if internal else None
            u = s if (blk.injection is None or internal) else blk.injection(s, e)
            x = self._run_loop_layers(t, u, ctx, cache, recall=recall)
        else:
            h_prev = s if t > 0 else None
            x0 = e
            if cfg.arch == "lt_i" and h_prev is not None:
                x0 = rms_norm(e + h_prev, cfg.norm_eps)
            x = self._run_loop_layers(t, x0, ctx, cache, h_prev=h_prev)
        if blk.rho is not None:
            x = x + blk.rho[min(t, blk.rho.shape[0] - 1)].type_as(x) * s
        return x

    def _carry(self, x):
        if self.block.outer_norm is None and not self.config.share_outer_final_norm:
            return x
        return self.final_norm(x) if self.config.share_outer_final_norm else self.block.outer_norm(x)

    def _head(self, x, ctx, cache, t):
        """Loop output (after out_proj) -> logits over the real vocabulary."""
        for i, layer in enumerate(self.coda):
            x = layer(x, ctx, slot=cache.slot(("coda", t, i)) if cache is not None else None)
        if not self.config.share_outer_final_norm:
            x = self.final_norm(x)
        logits = self.head(x)
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits[..., : self.config.vocab_size]

    def _context(self, input_ids, attention_mask, position_ids, past: int) -> AttnContext:
        B, T = input_ids.shape
        device = input_ids.device
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
        cos, sin = rope_for_positions(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = None
        if padded or (past > 0 and T > 1):
            q_pos = torch.arange(past, past + T, device=device)[:, None]
            k_pos = torch.arange(past + T, device=device)[None, :]
            allowed = (k_pos <= q_pos)[None, None].expand(B, 1, T, past + T)
            if padded:
                keys = attention_mask[:, -(past + T):].bool()[:, None, None, :]
                # a (padding) query always sees itself, so no row is empty
                allowed = (allowed & keys) | (k_pos == q_pos)[None, None]
            mask = allowed
        return AttnContext(cos, sin, mask, causal=(past == 0 and not padded)), position_ids

    # --- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[MegaloopCache] = None,
        past_key_values: Optional[MegaloopCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        num_loops: Optional[int] = None,
        exit_strategy: Optional[str] = None,
        exit_threshold: Optional[float] = None,
        exit_kv: Optional[str] = None,
        output_per_loop_logits: bool = False,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> MegaloopCausalLMOutput:
        """input_ids (B, T). num_loops: R for this call (default config.num_loops).
        exit_strategy: None | "q_exit" | "kl" (default config.exit_strategy), exit_threshold likewise.
        labels: Hugging Face convention (shifted inside; -100 ignored)."""
        cfg = self.config
        if input_ids is None:
            raise ValueError("MegaloopForCausalLM needs input_ids (inputs_embeds are not supported)")
        R = int(cfg.num_loops if num_loops is None else num_loops)
        if R < 1:
            raise ValueError(f"num_loops must be >= 1, got {R}")
        strategy = cfg.exit_strategy if exit_strategy is None else exit_strategy
        if strategy in ("none", ""):
            strategy = None
        if strategy not in (None, "q_exit", "kl"):
            raise ValueError(f"unknown exit_strategy {strategy!r}; use None, 'q_exit' or 'kl'")
        if strategy == "q_exit" and self.exit_gate is None:
            raise ValueError("exit_strategy='q_exit' needs the exit gate (config.exit_gate=True)")
        threshold = cfg.exit_threshold if exit_threshold is None else exit_threshold
        if threshold is None:
            threshold = 0.5 if strategy == "q_exit" else 1e-3
        kv_mode = cfg.exit_kv if exit_kv is None else exit_kv
        if kv_mode not in ("copy", "compute"):
            raise ValueError(f"exit_kv must be 'copy' or 'compute', got {kv_mode!r}")

        cache = cache if cache is not None else past_key_values
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = MegaloopCache()
        if not use_cache:
            cache = None
        past = cache.seq_len if cache is not None else 0
        if cache is not None:
            mode = (strategy, kv_mode if strategy else None)
            if cache.num_loops is None:
                cache.num_loops, cache.exit_mode = R, mode
            elif cache.num_loops != R or cache.exit_mode != mode:
                raise ValueError(
                    f"this cache was filled with num_loops={cache.num_loops}, exit={cache.exit_mode}; it cannot "
                    f"continue with num_loops={R}, exit={mode} (its deeper loops have no keys/values). "
                    f"Start a new cache (generate() does) or keep the loop count fixed.")

        ctx, positions = self._context(input_ids, attention_mask, position_ids, past)
        B, T = input_ids.shape

        # embedding + prelude -> e
        e = self.embedding(input_ids)
        if self.embed_norm is not None:
            e = self.embed_norm(e)
        for i, layer in enumerate(self.prelude):
            e = layer(e, ctx, slot=cache.slot(("prelude", i)) if cache is not None else None)

        s = self._initial_state(e, positions) if cfg.arch == "recurrent" else e
        out_proj = self.block.out_proj
        per_loop_logits: List[torch.Tensor] = []
        hidden = [e] if output_hidden_states else None

        exit_loops = None
        cum_p = survive = prev_logp = None
        reached_at = None  # (B, T) 1-based exit loop, 0 = not yet
        computed = R
        for t in range(R):
            x = self._step(t, s, e, ctx, cache)
            last = t == R - 1
            s = self._carry(x) if (not last or cfg.share_outer_final_norm) else x
            if hidden is not None:
                hidden.append(s)
            if strategy is None and not output_per_loop_logits:
                continue
            y = s if cfg.share_outer_final_norm else x
            if out_proj is not None:
                y = out_proj(y)
            logits_t = self._head(y, ctx, cache, t)
            per_loop_logits.append(logits_t)
            if strategy is None:
                continue
            if strategy == "q_exit":
                lam = torch.sigmoid(self.exit_gate(y).squeeze(-1).float())
                if survive is None:
                    p, survive_before = lam, torch.ones_like(lam)
                else:
                    survive_before = survive
                    p = lam * survive_before
                survive = survive_before * (1 - lam)
                if last:
                    p = survive_before  # the last loop takes the remainder
                cum_p = p if cum_p is None else cum_p + p
                reached = cum_p >= threshold
            else:
                logp = F.log_softmax(logits_t.float(), dim=-1)
                if prev_logp is None:
                    reached = torch.zeros(B, T, dtype=torch.bool, device=logp.device)
                else:
                    kl = (logp.exp() * (logp - prev_logp)).sum(-1)
                    reached = kl < threshold
                prev_logp = logp
            if last:
                reached = torch.ones_like(reached)
            if reached_at is None:
                reached_at = torch.zeros(B, T, dtype=torch.long, device=reached.device)
            reached_at = torch.where((reached_at == 0) & reached, torch.full_like(reached_at, t + 1), reached_at)
            if kv_mode == "copy" and not last and bool((reached_at > 0).all()):
                computed = t + 1
                if cache is not None:
                    self._fill_skipped_loops(cache, t, R, T)
                break

        if strategy is not None:
            stacked = torch.stack(per_loop_logits)  # (computed, B, T, V)
            exit_loops = reached_at
            idx = (exit_loops - 1)[None, ..., None].expand(1, B, T, stacked.shape[-1])
            logits = torch.gather(stacked, 0, idx).squeeze(0)
        elif output_per_loop_logits:
            logits = per_loop_logits[-1]
        else:
            y = s
            if out_proj is not None:
                y = out_proj(y)
            logits = self._head(y, ctx, cache, R - 1)
        if strategy is None:
            exit_loops = torch.full((B, T), R, dtype=torch.long, device=input_ids.device)

        if cache is not None:
            cache.seq_len = past + T

        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100)
        return MegaloopCausalLMOutput(
            loss=loss, logits=logits, **{_CACHE_FIELD: cache},
            hidden_states=tuple(hidden) if hidden is not None else None, exit_loops=exit_loops,
            loops_computed=computed,
            per_loop_logits=tuple(per_loop_logits) if output_per_loop_logits else None)

    def _fill_skipped_loops(self, cache: MegaloopCache, t: int, R: int, n_new: int):
        """exit_kv='copy': loops t+1..R-1 were not run for these positions; their slots get loop t's
        newest keys/values (Huginn-style cache sharing across depth)."""
        for t2 in range(t + 1, R):
            for i, layer in enumerate(self.block.layers):
                src = cache.slot(("loop", t, i))
                layer.mixer.extend_slot(cache.slot(("loop", t2, i)), src, n_new)
            for i, layer in enumerate(self.coda):
                src = cache.slot(("coda", t, i))
                layer.mixer.extend_slot(cache.slot(("coda", t2, i)), src, n_new)

    # --- generation -----------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.seq_len > 0:
            input_ids = input_ids[:, cache.seq_len:]
        inputs = {"input_ids": input_ids, "past_key_values": cache, "attention_mask": attention_mask,
                  "use_cache": use_cache}
        for key in ("num_loops", "exit_strategy", "exit_threshold", "exit_kv"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def _reorder_cache(self, cache, beam_idx):  # transformers 4.x beam search
        cache.reorder_cache(beam_idx)
        return cache


__all__ = ["MegaloopForCausalLM", "MegaloopPreTrainedModel", "MegaloopCache", "MegaloopCausalLMOutput",
           "MIXERS"]
