"""Ouro (`OuroForCausalLM`, model_type "ouro", remote code): every decoder layer shared and looped
`total_ut_steps` times, sandwich RMSNorms, the final norm applied after every step and fed back, a
learned early-exit gate.

Ouro's forward, in its equations (read from the public modeling_ouro.py / configuration_ouro.py):

    h = embed_tokens(x)                                   (no embedding norm, no scale)
    for t in 1..total_ut_steps:
        for each layer l:  h = h + norm_a2(attn(norm_a1(h)))      input_layernorm / input_layernorm_2
                           h = h + norm_m2(mlp(norm_m1(h)))       post_attention_layernorm / _2
        h = norm(h)                                       model.norm: fed to the next step and the head
        lambda_t = sigmoid(early_exit_gate(h))
    logits = lm_head(h)                                   (the last step's; exits pick another step)

megaloop's Ouro options say the same: arch recurrent, injection none, state_init embed,
normalization outer with share_outer_final_norm (the LM's final norm is the loop's carry, and is not
applied again before the head), norm_style sandwich, exit_gate, embed_norm false, n_prelude = n_coda
= 0, n_loop = num_hidden_layers, loops = total_ut_steps. RoPE: rotate-half (the layout megaloop
uses); attention without biases; SiLU-gated MLP (swiglu). Refused: rope_scaling other than default,
sliding-window layers, an activation other than silu.

    Ouro                                         megaloop
    model.embed_tokens.weight                    embedding.weight
    model.layers.L.input_layernorm.weight        block.layers.L.attn_norm.weight
    model.layers.L.input_layernorm_2.weight      block.layers.L.attn_post_norm.weight
    model.layers.L.post_attention_layernorm      block.layers.L.mlp_norm.weight
    model.layers.L.post_attention_layernorm_2    block.layers.L.mlp_post_norm.weight
    model.layers.L.self_attn.{q,k,v,o}_proj      block.layers.L.mixer.{wq,wk,wv,wo}
    model.layers.L.mlp.{gate,up,down}_proj       block.layers.L.mlp.{w1,w3,w2}
    model.norm.weight                            final_norm.weight
    model.early_exit_gate.{weight,bias}          exit_gate.{weight,bias}
    lm_head.weight                               head.weight (absent when tie_word_embeddings)

megaloop's block.outer_norm (unused when share_outer_final_norm is on) stays at its init (ones).
The loop loss is set to Ouro's stage-I objective (loop.loss exit_weighted); override it at will.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megaloop.hf_import.common import HFImportError, Mapping, Tensors, field

LAYER = {"input_layernorm.weight": "attn_norm.weight", "input_layernorm_2.weight": "attn_post_norm.weight",
         "post_attention_layernorm.weight": "mlp_norm.weight",
         "post_attention_layernorm_2.weight": "mlp_post_norm.weight",
         "self_attn.q_proj.weight": "mixer.wq.weight", "self_attn.k_proj.weight": "mixer.wk.weight",
         "self_attn.v_proj.weight": "mixer.wv.weight", "self_attn.o_proj.weight": "mixer.wo.weight",
         "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.up_proj.weight": "mlp.w3.weight",
         "mlp.down_proj.weight": "mlp.w2.weight"}


def check_common(folder: Path, hf: dict, name: str) -> None:
    """Refuse what a Llama-like config may hold that megaloop's layers do not compute."""
    where = folder / "config.json"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFImportError(f"{where}: hidden_act={act!r}: megaloop's gated MLP is SiLU (swiglu) only")
    rope = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", rope_type)
    if rope_type not in (None, "default"):
        raise HFImportError(f"{where}: rope type {rope_type!r}: megaloop implements the default RoPE only")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise HFImportError(f"{where}: {flag}=true: megaloop's {name} layers have no biases")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise HFImportError(f"{where}: sliding-window layers (use_sliding_window / layer_types) are not imported; "
                            f"only full attention")


def shape_fields(folder: Path, hf: dict) -> dict:
    """megaloop model fields for the sizes of a Llama-like config.json."""
    d = int(field(hf, "hidden_size", folder))
    heads = int(field(hf, "num_attention_heads", folder))
    theta = hf.get("rope_theta")
    if theta is None and isinstance(hf.get("rope_parameters"), dict):
        theta = hf["rope_parameters"].get("rope_theta")
    return {"vocab_size": int(field(hf, "vocab_size", folder)), "d_model": d, "n_heads": heads,
            "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or d // heads),
            "ffn_hidden": int(field(hf, "intermediate_size", folder)), "mlp": "swiglu",
            "norm_eps": float(hf.get("rms_norm_eps") or 1e-6), "rope_theta": float(theta or 10000.0),
            "max_seq_len": int(hf.get("max_position_embeddings") or 2048),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "embed_norm": False, "norm_scale": True,
            "qk_norm": False, "logit_softcap": None}


def head_weights(tensors: Tensors, tied: bool) -> dict:
    """{megaloop key: source key} of the embedding and the head (a tied head is not read twice)."""
    w = {"embedding.weight": "model.embed_tokens.weight"}
    if not tied:
        w["head.weight"] = "lm_head.weight"
    elif "lm_head.weight" in tensors:  # a tied head saved anyway: it must be the embedding
        if "model.embed_tokens.weight" in tensors and not torch.equal(tensors.peek("lm_head.weight"),
                                                                       tensors.peek("model.embed_tokens.weight")):
            raise HFImportError(f"{tensors.folder}: tie_word_embeddings=true but 'lm_head.weight' differs from "
                                f"'model.embed_tokens.weight'")
        tensors.ignore("lm_head.weight")
    return w


def read(folder: Path, hf: dict, tensors: Tensors) -> Mapping:
    check_common(folder, hf, "Ouro")
    n = int(field(hf, "num_hidden_layers", folder))
    steps = int(hf.get("total_ut_steps") or 4)
    model = dict(shape_fields(folder, hf), n_prelude=0, n_loop=n, n_coda=0, loops=steps, max_loops=max(64, steps),
                 arch="recurrent", injection="none", state_init="embed", normalization="outer",
                 share_outer_final_norm=True, norm_style="sandwich", exit_gate=True)
    weights = head_weights(tensors, model["tie_embeddings"])
    for i in range(n):
        for src, dst in LAYER.items():
            weights[f"block.layers.{i}.{dst}"] = f"model.layers.{i}.{src}"
    weights.update({"final_norm.weight": "model.norm.weight", "exit_gate.weight": "model.early_exit_gate.weight",
                    "exit_gate.bias": "model.early_exit_gate.bias"})
    loop = {"sampling": "fixed", "mean": steps, "max": max(32, steps), "loss": "exit_weighted"}
    return Mapping("ouro", {"model": model, "loop": loop}, weights,
                   notes=[f"Ouro: {n} shared layers looped total_ut_steps={steps} times"])
