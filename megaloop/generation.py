"""Sampling and scoring with a chosen number of loops, from a megaloop model or an exported HF folder.

    lm = load_lm("runs/demo")                     # a training run / DeepSpeed checkpoint (any TP x PP, ZeRO)
    lm = load_lm("runs/demo/model.pt")            # or a plain torch.save'd megaloop checkpoint
    lm = load_lm("exports/demo")                  # or a folder written by tools/export_hf.py
    ids = lm.encode("The ")
    out = generate(lm, ids, max_new_tokens=64, loops=6, temperature=0.8, top_p=0.95, seed=0)
    print(lm.decode(out.tokens[0]))

A megaloop `LoopedLM` has no KV cache: every step re-runs the whole (window-cropped) context. An
exported `MegaloopForCausalLM` keeps a per-(loop, layer) KV cache. Both go through the same sampler,
so with the same seed they draw the same tokens (up to float ties). With `state_init: noise`, the
megaloop model draws a fresh random start at every step; the exported model's default ("seeded") is
deterministic.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# Models behind one small interface


@dataclass
class LoadedLM:
    model: torch.nn.Module
    kind: str  # "megaloop" | "hf"
    train_loops: int  # the loop count the model was trained / exported with
    max_seq_len: int
    encode: Callable[[str], List[int]]
    decode: Callable[[Sequence[int]], str]
    eos_id: Optional[int] = None
    has_exit_gate: bool = False
    vocab_size: int = 0


def _is_hf_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "megaloop"
    except (OSError, ValueError):
        return False


def wrap_megaloop(model, tokenizer=None) -> LoadedLM:
    """A megaloop LoopedLM (+ optional megaloop tokenizer) as a LoadedLM."""
    from megaloop.data.tokenizer import ByteTokenizer

    tok = tokenizer or ByteTokenizer()
    cfg = model.cfg
    return LoadedLM(model.eval(), "megaloop", cfg.loops, cfg.max_seq_len, tok.encode, tok.decode, tok.eod_id,
                    cfg.exit_gate, cfg.vocab_size)


def wrap_hf(model, tokenizer=None) -> LoadedLM:
    """An exported model with its tokenizer: a transformers tokenizer, or a megaloop Tokenizer (the
    tokenizer.json of an export, read with the `tokenizers` library as every other stage reads it)."""
    from megaloop.data.tokenizer import Tokenizer

    cfg = model.config
    if isinstance(tokenizer, Tokenizer):
        return LoadedLM(model.eval(), "hf", cfg.num_loops, cfg.max_seq_len, tokenizer.encode, tokenizer.decode,
                        tokenizer.eod_id, bool(cfg.exit_gate), cfg.vocab_size)
    enc = (lambda s: tokenizer(s, verbose=False)["input_ids"]) if tokenizer is not None else (lambda s: list(s.encode("utf-8")))
    dec = (lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)) if tokenizer is not None else \
        (lambda ids: bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace"))
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else getattr(cfg, "eos_token_id", None)
    return LoadedLM(model.eval(), "hf", cfg.num_loops, cfg.max_seq_len, enc, dec, eos, bool(cfg.exit_gate),
                    cfg.vocab_size)


def load_lm(source, step: Optional[int] = None) -> LoadedLM:
    """An exported HF folder, or a megaloop checkpoint (megaloop.checkpoint.load_model; raises its
    CheckpointError)."""
    path = Path(source)
    if path.is_dir() and _is_hf_folder(path):
        from megaloop.export import load_exported

        model = load_exported(path)
        tokenizer = None
        tok_cfg = path / "tokenizer_config.json"
        if (path / "tokenizer.json").is_file():
            from megaloop.data.tokenizer_hf import HFTokenizer

            tokenizer = HFTokenizer(path)
        elif tok_cfg.is_file():
            from megaloop.export.hf_template import tokenization_megaloop as tm

            cls = getattr(tm, json.loads(tok_cfg.read_text()).get("tokenizer_class", ""), None)
            if cls is not None:
                tokenizer = cls.from_pretrained(path)
        return wrap_hf(model, tokenizer)
    from megaloop.checkpoint import load_model
    from megaloop.data.tokenizer import build_tokenizer

    model, cfg = load_model(path, step)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, eod_token=cfg.data.tokenizer_eod)
    return wrap_megaloop(model, tokenizer)


def is_causal(lm: LoadedLM) -> bool:
    """Whether position t of the model sees tokens <= t only (model.causal; exported models always are)."""
    return lm.kind != "megaloop" or bool(getattr(lm.model.cfg, "causal", True))


def forward_logits(lm: LoadedLM, ids: torch.Tensor, loops: int, exit: Optional[str] = None,
                   exit_threshold: Optional[float] = None):
    """(logits (B, T, V), exit loop per token (B, T) or None) for a full, uncached forward."""
    if lm.kind == "megaloop":
        out = lm.model(ids, loops=loops, exit=exit, exit_threshold=exit_threshold)
        return out.logits, out.exit_loops
    out = lm.model(ids, num_loops=loops, exit_strategy=exit, exit_threshold=exit_threshold, use_cache=False)
    return out.logits, (out.exit_loops if exit is not None else None)


# ------------------------------------------------------------------------------------------------
# Sampling


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids. temperature <= 0: greedy. top_p: nucleus (smallest set of tokens whose
    probability reaches top_p; the most likely token is always kept). top_k: keep the k most likely."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, prompt + new)
    new_tokens: torch.Tensor  # (B, new)
    mean_loops: float = 0.0  # average loops of the sampled positions (< R only with an exit)
    loops_per_step: List[float] = field(default_factory=list)


@torch.no_grad()
def generate(lm: LoadedLM, prompt_ids, max_new_tokens: int = 64, loops: Optional[int] = None,
             temperature: float = 1.0, top_p: float = 1.0, top_k: Optional[int] = None,
             eos_id: Optional[int] = None, seed: Optional[int] = None, exit: Optional[str] = None,
             exit_threshold: Optional[float] = None, stop_at_eos: bool = True) -> GenerationOutput:
    """Sample max_new_tokens continuations of prompt_ids ((B, T) tensor or a list of ids) with R loops.

    Rows that produced eos keep emitting eos. The megaloop model's context is cropped to its
    max_seq_len; the exported model uses its KV cache (positions may then exceed max_seq_len: RoPE
    extrapolates)."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[1] == 0:
        raise ValueError("generate needs a non-empty prompt")
    if not is_causal(lm):
        from megaloop.errors import UsageError
        raise UsageError("this model was trained with model.causal=false (bidirectional attention): every position "
                         "sees the tokens after it, so it cannot generate text left to right")
    loops = lm.train_loops if loops is None else int(loops)
    eos_id = lm.eos_id if eos_id is None else eos_id
    device = next(lm.model.parameters()).device
    ids = ids.to(device)
    gen = torch.Generator(device=device.type).manual_seed(seed) if seed is not None else None
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    loops_used: List[float] = []
    cache, step_ids = None, ids
    for _ in range(max_new_tokens):
        if lm.kind == "hf":
            out = lm.model(step_ids, cache=cache, use_cache=True, num_loops=loops, exit_strategy=exit,
                           exit_threshold=exit_threshold)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            logits, exit_loops = out.logits[:, -1], out.exit_loops[:, -1]
        else:
            context = ids[:, -lm.max_seq_len:]
            logits, exit_loops = forward_logits(lm, context, loops, exit, exit_threshold)
            logits = logits[:, -1]
            exit_loops = exit_loops[:, -1] if exit_loops is not None else torch.full_like(finished, loops, dtype=torch.long)
        loops_used.append(float(exit_loops.float().mean()))
        nxt = sample_next_token(logits, temperature, top_p, top_k, gen)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        step_ids = nxt[:, None]
        if stop_at_eos and eos_id is not None and bool(finished.all()):
            break
    n_new = len(loops_used)
    return GenerationOutput(ids, ids[:, ids.shape[1] - n_new:], sum(loops_used) / max(1, n_new), loops_used)
