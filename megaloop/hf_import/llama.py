"""Llama (`LlamaForCausalLM`, model_type "llama"): a plain pre-norm decoder stack.

    h = embed_tokens(x); for each layer: h = h + attn(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))

megaloop computes exactly this with embed_norm false, norm_style pre, swiglu (gate_proj -> w1,
up_proj -> w3, down_proj -> w2), rotate-half RoPE, no biases, the last loop's output left
un-normalised before the final norm (model.norm -> final_norm).

Two shapes of import:
- plain (default): all L layers in the looped block, R = 1 (yaml_configs/tiny/plain.yaml's shape):
  block.layers.i = layer i, model.loops = loop.mean = 1.
- retrofitted (`retrofit=(P, B, C)`, "retrofitted recurrence"): layers 0..P-1 become the prelude,
  the last C layers the coda, and B layers starting at `block_from` (default P: the ones right after
  the prelude) the looped block; layers in none of the three are dropped. arch recurrent, injection
  none, state_init embed, normalization outer (megaloop's default: norm(x) carried between loops),
  model.loops = 1. With P + B + C = L and R = 1 the model IS the original one (same logits); R > 1
  reuses the block. Injection (model.injection=add / concat_adapter), R, etc. are the user's
  overrides; parameters that adds (an adapter) keep megaloop's init.
megaloop's block.outer_norm has no Llama counterpart: it starts at ones (unused at R = 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from megaloop.hf_import.common import HFImportError, Mapping, Tensors, field
from megaloop.hf_import.ouro import check_common, head_weights, shape_fields

LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
         "self_attn.q_proj.weight": "mixer.wq.weight", "self_attn.k_proj.weight": "mixer.wk.weight",
         "self_attn.v_proj.weight": "mixer.wv.weight", "self_attn.o_proj.weight": "mixer.wo.weight",
         "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.up_proj.weight": "mlp.w3.weight",
         "mlp.down_proj.weight": "mlp.w2.weight"}


def layer_plan(n: int, retrofit: Optional[Tuple[int, int, int]], block_from: Optional[int]):
    """(prelude, block, coda) lists of source layer indices; HFImportError for an impossible split."""
    if retrofit is None:
        if block_from is not None:
            raise HFImportError("--block-from needs --retrofit P,B,C")
        return [], list(range(n)), []
    p, b, c = retrofit
    if p < 0 or c < 0 or b < 1:
        raise HFImportError(f"--retrofit {p},{b},{c}: counts must be >= 0 (the block >= 1)")
    start = p if block_from is None else block_from
    if p + c > n or start < p or start + b > n - c:
        raise HFImportError(f"--retrofit {p},{b},{c}" + (f" --block-from {block_from}" if block_from is not None
                            else "") + f": the model has {n} layers; the prelude takes layers 0..{p - 1}, the coda "
                            f"the last {c}, and the block {b} layers from {start} must lie between them")
    return list(range(p)), list(range(start, start + b)), list(range(n - c, n))


def read(folder: Path, hf: dict, tensors: Tensors, retrofit=None, block_from=None) -> Mapping:
    check_common(folder, hf, "Llama")
    n = int(field(hf, "num_hidden_layers", folder))
    prelude, block, coda = layer_plan(n, retrofit, block_from)
    model = dict(shape_fields(folder, hf), n_prelude=len(prelude), n_loop=len(block), n_coda=len(coda), loops=1,
                 arch="recurrent", injection="none", state_init="embed", normalization="outer", norm_style="pre")
    weights = head_weights(tensors, model["tie_embeddings"])
    for part, layers in (("prelude", prelude), ("block.layers", block), ("coda", coda)):
        for j, i in enumerate(layers):
            for src, dst in LAYER.items():
                weights[f"{part}.{j}.{dst}"] = f"model.layers.{i}.{src}"
    weights["final_norm.weight"] = "model.norm.weight"
    dropped = sorted(set(range(n)) - set(prelude + block + coda))
    for i in dropped:  # dropped on purpose: not "unknown"
        for src in LAYER:
            if f"model.layers.{i}.{src}" in tensors:
                tensors.ignore(f"model.layers.{i}.{src}")
    notes = [f"Llama {n} layers -> " + (f"prelude {prelude}, looped block {block}, coda {coda}" if retrofit
                                         else f"plain model: all {n} layers in the block, R = 1")]
    if dropped:
        notes.append(f"dropped layers {dropped}: the model at R = 1 is no longer the original")
    for k in [k for k in tensors.keys() if k.endswith("rotary_emb.inv_freq")]:
        tensors.ignore(k)  # an old transformers' saved RoPE buffer: recomputed from rope_theta
    return Mapping("llama", {"model": model, "loop": {"sampling": "fixed", "mean": 1}}, weights, notes=notes)
