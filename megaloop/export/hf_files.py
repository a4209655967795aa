"""The files of an exported Hugging Face folder besides the weights.

config.json (MegaloopConfig keyword arguments from a megaloop ModelConfig, `hf_config_dict`), the
remote-code template files copied from megaloop/export/hf_template, the tokenizer files and the README.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from megaloop.config import Config, ModelConfig
from megaloop.export.inputs import ExportError, loop_mixers

TEMPLATE_DIR = Path(__file__).resolve().parent / "hf_template"
TEMPLATE_FILES = ("configuration_megaloop.py", "modeling_megaloop.py", "tokenization_megaloop.py")
AUTO_MAP = {
    "AutoConfig": "configuration_megaloop.MegaloopConfig",
    "AutoModelForCausalLM": "modeling_megaloop.MegaloopForCausalLM",
}


# ------------------------------------------------------------------------------------------------
# Configuration


def hf_config_dict(mc: ModelConfig, noise_init: str = "seeded", noise_seed: int = 0,
                   exit_strategy: Optional[str] = None, exit_threshold: Optional[float] = None) -> Dict[str, Any]:
    """MegaloopConfig keyword arguments for a megaloop ModelConfig (derived sizes made explicit)."""
    return dict(
        vocab_size=mc.vocab_size, padded_vocab_size=mc.padded_vocab_size, tie_word_embeddings=mc.tie_embeddings,
        embed_norm=mc.embed_norm, embed_scale=mc.embed_scale, max_seq_len=mc.max_seq_len, d_model=mc.d_model, n_heads=mc.n_heads,
        n_kv_heads=mc.kv_heads, head_dim=mc.attn_head_dim, ffn_hidden=mc.ffn_dim, mlp=mc.mlp,
        norm_style=mc.norm_style, norm_eps=mc.norm_eps, norm_scale=mc.norm_scale, qk_norm=mc.qk_norm,
        rope_theta=mc.rope_theta, logit_softcap=mc.logit_softcap, init_std=mc.init_std,
        mixer=",".join(loop_mixers(mc)), linear_mixer=getattr(mc, "linear_mixer", "gdn"),
        conv_size=mc.conv_size, gdn_expand_v=mc.gdn_expand_v, gdn_chunk_size=mc.gdn_chunk_size, window=mc.window,
        dsa_topk=mc.dsa_topk, dsa_index_heads=mc.dsa_index_heads, dsa_index_dim=mc.dsa_index_dim,
        dsa_indexer_form=mc.dsa_indexer_form, dsa_index_rope_dim=mc.dsa_rope_dim,
        n_prelude=mc.n_prelude, n_loop=mc.n_loop, n_coda=mc.n_coda, num_loops=mc.loops, max_loops=mc.max_loops,
        arch=mc.arch, injection=mc.injection, recall=mc.recall, internal_recall_site=mc.internal_recall_site,
        internal_recall_layers=mc.internal_recall_layers, normalization=mc.normalization,
        state_init=mc.state_init, state_init_std=mc.state_init_std, share_outer_final_norm=mc.share_outer_final_norm,
        prelude_norm=mc.use_prelude_norm, coda_norm=mc.coda_norm, exit_gate=mc.exit_gate,
        loop_residual_gate=mc.loop_residual_gate, attn_output_gate=mc.attn_output_gate,
        value_embeddings=getattr(mc, "value_embeddings", False),
        noise_init=noise_init, noise_seed=noise_seed, exit_strategy=exit_strategy, exit_threshold=exit_threshold,
    )


def hf_config(mc: ModelConfig, **kwargs):
    from megaloop.export.hf_template.configuration_megaloop import MegaloopConfig

    return MegaloopConfig(**hf_config_dict(mc, **kwargs))


# ------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_info(tokenizer_spec) -> Optional[Dict[str, Any]]:
    """Normalise a tokenizer spec: a megaloop Tokenizer, {"type": "byte"|"sentencepiece"|"hf"|"tiktoken",
    "model": path, "eod": token}, a DataConfig / Config (tokenizer_type, tokenizer_model, tokenizer_eod) or
    None (no tokenizer is written)."""
    if tokenizer_spec is None:
        return None
    from megaloop.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, build_tokenizer
    from megaloop.data.tokenizer_hf import HFTokenizer, TiktokenTokenizer

    if isinstance(tokenizer_spec, Config):
        tokenizer_spec = tokenizer_spec.data
    if hasattr(tokenizer_spec, "tokenizer_type"):
        tokenizer_spec = {"type": tokenizer_spec.tokenizer_type, "model": tokenizer_spec.tokenizer_model,
                          "eod": getattr(tokenizer_spec, "tokenizer_eod", None)}
    if isinstance(tokenizer_spec, dict):
        try:
            tokenizer_spec = build_tokenizer(tokenizer_spec.get("type", "byte"), tokenizer_spec.get("model"),
                                             eod_token=tokenizer_spec.get("eod"))
        except (ValueError, OSError) as e:
            raise ExportError(f"tokenizer: {e}") from e
    if isinstance(tokenizer_spec, ByteTokenizer):
        return {"type": "byte", "tokenizer": tokenizer_spec}
    if isinstance(tokenizer_spec, SentencePieceTokenizer):
        return {"type": "sentencepiece", "tokenizer": tokenizer_spec, "model": tokenizer_spec.model_path}
    if isinstance(tokenizer_spec, HFTokenizer):
        return {"type": "hf", "tokenizer": tokenizer_spec, "model": tokenizer_spec.json_path}
    if isinstance(tokenizer_spec, TiktokenTokenizer):
        return {"type": "tiktoken", "tokenizer": tokenizer_spec, "model": tokenizer_spec.path}
    raise ExportError(f"unsupported tokenizer spec {tokenizer_spec!r}")


# Entries of the source folder's tokenizer_config.json that an hf export keeps (they name tokens or
# templates; the ids come from tokenizer.json, copied byte for byte).
_KEPT_HF_CONFIG = ("bos_token", "unk_token", "chat_template", "add_bos_token", "add_eos_token")


def _write_standard_tokenizer(info: Dict[str, Any], out: Path):
    """tokenizer.json + tokenizer_config.json that plain transformers loads (PreTrainedTokenizerFast, no
    remote code): the source tokenizer.json copied as it is (so its sha256, which dataset records compare,
    is unchanged), or a tiktoken file converted by transformers' TikTokenConverter."""
    from megaloop.data.tokenizer_hf import read_tokenizer_config

    tok = info["tokenizer"]
    cfg: Dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if info["type"] == "hf":
        shutil.copyfile(info["model"], out / "tokenizer.json")
        source = read_tokenizer_config(Path(info["model"]).parent)
        cfg.update({k: source[k] for k in _KEPT_HF_CONFIG if k in source})
    else:
        tok.to_hf_tokenizer().save(str(out / "tokenizer.json"))
    eos = tok.tok.id_to_token(tok.eod_id) if info["type"] == "hf" else tok.eod_name
    pad = tok.tok.id_to_token(tok.pad_id) if info["type"] == "hf" else eos
    return cfg, eos, pad


def _write_tokenizer(info: Dict[str, Any], out: Path, mc: ModelConfig) -> Dict[str, Any]:
    tok = info["tokenizer"]
    if tok.vocab_size > mc.vocab_size:
        raise ExportError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={mc.vocab_size}")
    if info["type"] == "byte":
        eos, pad = "<eod>", "<pad>"
        cfg = {"tokenizer_class": "MegaloopByteTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_megaloop.MegaloopByteTokenizer", None]}}
    elif info["type"] in ("hf", "tiktoken"):
        cfg, eos, pad = _write_standard_tokenizer(info, out)
    else:
        shutil.copyfile(info["model"], out / "tokenizer.model")
        eos, pad = tok.sp.id_to_piece(tok.eod_id), tok.sp.id_to_piece(tok.pad_id)
        cfg = {"tokenizer_class": "MegaloopSentencePieceTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_megaloop.MegaloopSentencePieceTokenizer", None]},
               "unk_token": tok.sp.id_to_piece(tok.sp.unk_id()) if tok.sp.unk_id() >= 0 else None}
    cfg.update({"eos_token": eos, "pad_token": pad, "clean_up_tokenization_spaces": False,
                "model_max_length": mc.max_seq_len})
    if info["type"] in ("byte", "sentencepiece"):  # hf / tiktoken: tokenizer.json's post-processor decides
        cfg.update(add_bos_token=False, add_eos_token=False)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "pad_token": pad}, indent=2) + "\n")
    return {"eos_token_id": tok.eod_id, "pad_token_id": tok.pad_id}


# ------------------------------------------------------------------------------------------------
# README


def _readme(mc: ModelConfig, hf_cfg: dict) -> str:
    return f"""# megaloop looped language model

Exported by megaloop (`tools/export_hf.py`). Architecture: arch={mc.arch}, injection={mc.injection},
normalization={mc.normalization}, {mc.n_prelude} prelude / {mc.n_loop} looped / {mc.n_coda} coda layers
(looped token mixers: {hf_cfg['mixer']}), d_model={mc.d_model}, trained with R={mc.loops} loops.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)
ids = tok("Hello", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=32, num_loops={mc.loops})    # any num_loops >= 1
logits = model(ids, num_loops=8).logits
exited = model(ids, exit_strategy="kl", exit_threshold=1e-3)          # .exit_loops per token
```
Loops: `num_loops` (default {mc.loops}) is a config field and a forward/generate argument.
Exits: `exit_strategy` = "q_exit" (needs the exit gate; exit_gate={mc.exit_gate}) or "kl".
Noise state init (state_init={mc.state_init}): `noise_init`={hf_cfg['noise_init']!r} — "seeded" is
deterministic (a fixed draw per position from `noise_seed`), "global_rng" is megaloop's own draw
(seed torch first), "zeros" starts from zeros.
"""
