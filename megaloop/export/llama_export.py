"""Optional second format: unroll a looped model into a standard LlamaForCausalLM (no remote code).

Each loop's layers are copied, so the Llama model has n_prelude + R * n_loop + n_coda layers and runs
exactly R loops (R is fixed at export time). This is only exact for architectures that ARE a plain
stack of Llama layers once unrolled:

  representable                                 why others are refused
  arch recurrent, injection none, state_init    add / concat_adapter / parcae re-inject e between loops;
  embed, and either normalization inner or      Llama's residual stream has no skip from the input.
  R = 1 (then no norm sits between loops)       outer normalization applies norm(x) to the residual
  FLT family at R = 1 (= plain transformer)     stream between loops: Llama can only normalise sub-layer
  pre-norm, SwiGLU, no QK-norm, no attention    inputs, never the stream itself (exact only if R = 1).
  output gate, no LT2 rho gate, no soft-cap,    FLT (R > 1) restarts the stream and takes queries from
  the attention mixer only                      the previous loop. Sandwich norms, QK-norm, ReLU^2
                                                (ungated), soft-cap, output gates, rho: no Llama field.
  zeros / noise state init: the stream would not start from the embedding.

Folded exactly: megaloop's embed_norm (norm(e) at the input) becomes a pre-normalised input embedding
table (rms_norm(E) * w per row, computed with megaloop's own ops), so the Llama model is untied (the
head keeps the raw E). The padded vocabulary rows are dropped (vocab_size = the real vocabulary). An
exit gate is dropped (a fixed-R model has no exits).

The tokenizer files are the same as the remote-code export: tokenizer.json + tokenizer_config.json for an
hf / tiktoken run (plain transformers), megaloop's tokenizer classes for byte / sentencepiece (they need
trust_remote_code for AutoTokenizer); the model itself loads with plain transformers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megaloop.config import FLT_FAMILY, ModelConfig
from megaloop.export.hf_export import _DTYPES
from megaloop.export.hf_files import _write_tokenizer, tokenizer_info
from megaloop.export.inputs import ExportError, _model_config, check_state_dict, loop_mixers
from megaloop.export.output_dir import staged_output
from megaloop.model.layers import rms_norm


def llama_unrepresentable(mc: ModelConfig, loops: int) -> List[str]:
    """Why this config, unrolled at `loops` loops, is not exactly a LlamaForCausalLM ([] if it is)."""
    why = []
    if mc.arch in FLT_FAMILY:
        if loops > 1:
            why.append(f"arch={mc.arch!r} with {loops} loops restarts every loop from e and injects the previous "
                       f"loop (attention/residual injection); only R=1 is a plain stack")
    else:
        if mc.injection != "none":
            why.append(f"injection={mc.injection!r} feeds the input embedding back in every loop; Llama's "
                       f"residual stream has no path from the input")
        if mc.state_init != "embed":
            why.append(f"state_init={mc.state_init!r}: the looped stream does not start from the embedding")
        if mc.normalization == "outer" and loops > 1:
            why.append("normalization='outer' normalises the residual stream between loops; Llama can only "
                       "normalise sub-layer inputs (use normalization='inner', or export with --loops 1)")
        if mc.share_outer_final_norm and loops > 1:
            why.append("share_outer_final_norm (Ouro) feeds the final norm back into the loop")
    if mc.use_prelude_norm and mc.n_prelude:
        why.append("prelude_norm normalises the prelude's output; Llama has no norm between layers")
    if mc.norm_style != "pre":
        why.append(f"norm_style={mc.norm_style!r}: Llama layers are pre-norm only")
    if mc.embed_scale != 1:
        why.append(f"embed_scale={mc.embed_scale}: Llama does not scale its input embedding")
    if mc.coda_norm:
        why.append("coda_norm normalises the loop's output before the coda; Llama has no norm between layers")
    if mc.mlp != "swiglu":
        why.append(f"mlp={mc.mlp!r}: Llama's MLP is gated SwiGLU")
    if mc.qk_norm:
        why.append("qk_norm: Llama has no query/key norm")
    if getattr(mc, "value_embeddings", False):
        why.append("value_embeddings: Llama's attention has no per-layer value embedding tables")
    if mc.attn_output_gate:
        why.append("attn_output_gate: Llama has no attention output gate")
    if mc.loop_residual_gate:
        why.append("loop_residual_gate (LT2 rho): Llama has no per-loop residual gate")
    if mc.logit_softcap is not None:
        why.append("logit_softcap: Llama has no logit soft-cap")
    if not getattr(mc, "causal", True):
        why.append("causal=false: Llama's attention is causal only")
    if set(loop_mixers(mc)) != {"attn"}:
        why.append(f"mixer={mc.mixer!r}: Llama layers use full softmax attention only")
    return why


def llama_state_dict(sd: Dict[str, torch.Tensor], mc: ModelConfig, loops: int) -> Dict[str, torch.Tensor]:
    V = mc.vocab_size
    emb = sd["embedding.weight"].float()
    head = sd.get("head.weight", sd["embedding.weight"]) if mc.tie_embeddings else sd["head.weight"]
    if mc.embed_norm:
        w = sd.get("embed_norm.weight")
        emb = rms_norm(emb, mc.norm_eps)
        emb = emb * w.float() if w is not None else emb
    if mc.use_prelude_norm:  # no prelude layers (else refused): the prelude norm follows the embedding norm
        w = sd.get("prelude_norm.weight")
        emb = rms_norm(emb, mc.norm_eps)
        emb = emb * w.float() if w is not None else emb
    out = {"model.embed_tokens.weight": emb[:V], "lm_head.weight": head.float()[:V],
           "model.norm.weight": sd.get("final_norm.weight", torch.ones(mc.d_model))}
    layers = [f"prelude.{i}." for i in range(mc.n_prelude)]
    layers += [f"block.layers.{i}." for _ in range(loops) for i in range(mc.n_loop)]
    layers += [f"coda.{i}." for i in range(mc.n_coda)]
    names = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
             "mixer.wq.weight": "self_attn.q_proj.weight", "mixer.wk.weight": "self_attn.k_proj.weight",
             "mixer.wv.weight": "self_attn.v_proj.weight", "mixer.wo.weight": "self_attn.o_proj.weight",
             "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight",
             "mlp.w2.weight": "mlp.down_proj.weight"}
    for j, prefix in enumerate(layers):
        for src, dst in names.items():
            t = sd.get(prefix + src)
            if t is None and src.endswith("norm.weight"):  # norm_scale=false: parameter-free norms
                t = torch.ones(mc.d_model)
            out[f"model.layers.{j}.{dst}"] = t.clone()
    return out


def export_llama(full_state_dict: Dict[str, torch.Tensor], model_config, tokenizer_spec, output_dir,
                 *, loops: Optional[int] = None, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a LlamaForCausalLM folder equal to the megaloop model run with `loops` loops (default: the
    trained R). Raises ExportError, writing nothing, for architectures Llama cannot represent exactly."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    mc = _model_config(model_config)
    loops = mc.loops if loops is None else int(loops)
    if loops < 1:
        raise ExportError(f"loops must be >= 1, got {loops}")
    why = llama_unrepresentable(mc, loops)
    if why:
        raise ExportError(f"this model is not exactly a Llama model at {loops} loop(s); use the remote-code export "
                          f"(export_hf) instead:\n  - " + "\n  - ".join(why))
    out_dir = Path(output_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass overwrite=True to replace it")
    check_state_dict(full_state_dict, mc)
    tok_info = tokenizer_info(tokenizer_spec)
    n_layers = mc.n_prelude + loops * mc.n_loop + mc.n_coda
    with staged_output(out_dir) as tmp:  # renamed into place at the end; removed on any failure
        special = _write_tokenizer(tok_info, tmp, mc) if tok_info else {}
        if tok_info and tok_info["type"] in ("byte", "sentencepiece"):  # hf / tiktoken: plain tokenizer.json
            from megaloop.export.hf_files import TEMPLATE_DIR

            shutil.copyfile(TEMPLATE_DIR / "tokenization_megaloop.py", tmp / "tokenization_megaloop.py")
        cfg = LlamaConfig(
            vocab_size=mc.vocab_size, hidden_size=mc.d_model, intermediate_size=mc.ffn_dim,
            num_hidden_layers=n_layers, num_attention_heads=mc.n_heads, num_key_value_heads=mc.kv_heads,
            head_dim=mc.attn_head_dim, hidden_act="silu", max_position_embeddings=mc.max_seq_len,
            rms_norm_eps=mc.norm_eps, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": mc.rope_theta},
            bos_token_id=None, eos_token_id=special.get("eos_token_id"), pad_token_id=special.get("pad_token_id"))
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.save_pretrained(tmp)
        target = _DTYPES[dtype]
        tensors = {k: v.detach().to("cpu", target).contiguous()
                   for k, v in llama_state_dict(full_state_dict, mc, loops).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "exporter": "megaloop-llama"})
        gen = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 128}
        gen.update({k: v for k, v in special.items() if v is not None})
        GenerationConfig(**gen).save_pretrained(tmp)
        (tmp / "megaloop_unrolled.json").write_text(json.dumps(
            {"loops": loops, "n_prelude": mc.n_prelude, "n_loop": mc.n_loop, "n_coda": mc.n_coda,
             "note": "unrolled megaloop model: layers = prelude + loops x looped block + coda"}, indent=2))
    return out_dir
