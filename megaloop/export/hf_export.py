"""Export a megaloop model to a Hugging Face folder (remote-code format).

The seam between checkpoints and the exporter:

    state_dict, config, tokenizer = load_checkpoint(checkpoint_dir, step)   # reads + merges shards
    export_hf(state_dict, config, tokenizer, output_dir)                    # validates + writes

`export_hf` takes an already-merged, full (unsharded) state dict with megaloop's own parameter names
(what `LoopedLM.state_dict()` returns on one process). `load_checkpoint` / `load_merged_state_dict`
read a megaloop/DeepSpeed training checkpoint of any TP x PP x DP layout and ZeRO stage or a plain
`torch.save`d state dict through megaloop.checkpoint (its CheckpointError becomes ExportError here).

The written folder:
    config.json                   MegaloopConfig + auto_map (AutoConfig, AutoModelForCausalLM)
    configuration_megaloop.py     \
    modeling_megaloop.py           } copied from megaloop/export/hf_template; import only torch/transformers
    tokenization_megaloop.py      /
    model.safetensors             the weights (the tied head is stored once, as embedding.weight)
    tokenizer_config.json (+ tokenizer.model for sentencepiece, tokenizer.json for hf / tiktoken: plain
                                  PreTrainedTokenizerFast, no remote code), special_tokens_map.json
    generation_config.json
    README.md                     what the folder is and how to load it
Everything is written to a temporary directory next to `output_dir` and renamed into place at the
end, so a failed export never leaves a partial folder (output_dir.py).

Its steps live in: inputs.py (the checkpoint seam, ExportError, the config and state-dict checks),
hf_files.py (config.json, template, tokenizer and README files), output_dir.py (the safe output
folder); here: the weights, the verification against megaloop, and loading an exported folder back.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megaloop.config import ModelConfig
from megaloop.export.hf_files import (AUTO_MAP, TEMPLATE_DIR, TEMPLATE_FILES, _readme, _write_tokenizer, hf_config_dict,
                                      tokenizer_info)
from megaloop.export.inputs import ExportError, _check_exportable, _model_config, check_state_dict
from megaloop.export.output_dir import check_output_dir, staged_output

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------
# Export


def export_hf(full_state_dict: Dict[str, torch.Tensor], model_config, tokenizer_spec, output_dir,
              *, dtype: str = "float32", overwrite: bool = False, noise_init: str = "seeded", noise_seed: int = 0,
              generation: Optional[Dict[str, Any]] = None, verify: bool = True) -> Path:
    """Write a Hugging Face folder for a megaloop model; returns its path.

    full_state_dict: merged (unsharded) megaloop state dict, megaloop parameter names.
    model_config:    megaloop Config or ModelConfig (or its dict form).
    tokenizer_spec:  see tokenizer_info (None: no tokenizer files).
    dtype:           weight dtype in model.safetensors (float32 | bfloat16 | float16).
    noise_init/noise_seed: how the exported model draws a `noise` initial state (see MegaloopConfig).
    generation:      overrides for generation_config.json (do_sample, temperature, top_p, max_new_tokens).
    verify:          before renaming into place, load the written folder with the exported classes and
                     compare its logits with megaloop's on a short input at 1 and R loops.
    Raises ExportError (nothing written) on bad input.
    """
    from safetensors.torch import save_file

    mc = _model_config(model_config)
    out_dir = Path(output_dir).resolve()
    check_output_dir(out_dir, overwrite)
    if dtype not in _DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    _check_exportable(mc)
    check_state_dict(full_state_dict, mc)
    tok_info = tokenizer_info(tokenizer_spec)
    hf_kwargs = hf_config_dict(mc, noise_init=noise_init, noise_seed=noise_seed)

    with staged_output(out_dir) as tmp:  # renamed into place at the end; removed on any failure
        from megaloop.export.hf_template.configuration_megaloop import MegaloopConfig

        special = _write_tokenizer(tok_info, tmp, mc) if tok_info else {}
        cfg = MegaloopConfig(**hf_kwargs, **special)
        cfg.architectures = ["MegaloopForCausalLM"]
        cfg.auto_map = dict(AUTO_MAP)
        cfg.megaloop_model_config = dataclasses.asdict(mc)
        cfg.save_pretrained(tmp)
        for name in TEMPLATE_FILES:
            shutil.copyfile(TEMPLATE_DIR / name, tmp / name)

        target = _DTYPES[dtype]
        tensors = {}
        for k, v in full_state_dict.items():
            if k == "head.weight" and mc.tie_embeddings:
                continue  # stored once, as embedding.weight
            tensors[k] = v.detach().to("cpu", target).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "exporter": "megaloop"})

        from transformers import GenerationConfig

        gen = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 128}
        gen.update(generation or {})
        gen.update({k: v for k, v in special.items() if v is not None})
        GenerationConfig(**gen).save_pretrained(tmp)
        (tmp / "README.md").write_text(_readme(mc, hf_kwargs))

        if verify:
            verify_export(tmp, full_state_dict, mc, weight_dtype=target)

    return out_dir


def load_exported(path, **config_overrides):
    """Load an exported folder with megaloop's copy of the classes (no remote code), eval mode."""
    from megaloop.export.hf_template.configuration_megaloop import MegaloopConfig
    from megaloop.export.hf_template.modeling_megaloop import MegaloopForCausalLM

    path = Path(path)
    try:
        cfg = MegaloopConfig.from_pretrained(path, **config_overrides)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path / 'config.json'}: not a readable exported config ({' '.join(str(e).split())}); "
                          f"re-export the model with tools/export_hf.py") from e
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights}: no such file; re-export the model with tools/export_hf.py")
    try:
        return MegaloopForCausalLM.from_pretrained(path, config=cfg, use_safetensors=True).eval()
    except Exception as e:  # safetensors' SafetensorError, a truncated file's OSError / RuntimeError, bad shapes
        raise ExportError(f"{weights}: cannot load the weights, the file is corrupted or truncated "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); re-export the model with "
                          f"tools/export_hf.py") from e


def verify_export(folder, state_dict, mc: ModelConfig, atol: float = 1e-4,
                  weight_dtype: torch.dtype = torch.float32) -> None:
    """Compare the written folder's logits with megaloop's (float32, short input, 1 and R loops).
    weight_dtype: the dtype the folder stores; megaloop's weights are rounded to it first, so that a
    bfloat16 export is compared with the same weights (both sides then compute in float32)."""
    from megaloop.model import LoopedLM

    ref = LoopedLM(mc).eval()
    ref.load_state_dict({k: v.to(weight_dtype).float() for k, v in state_dict.items()},
                        strict=not mc.tie_embeddings)
    hf = load_exported(folder, noise_init="global_rng").float()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mc.vocab_size, (1, min(16, mc.max_seq_len)), generator=g)
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            for loops in sorted({1, mc.loops}):
                torch.manual_seed(0)
                a = ref(ids, loops=loops).logits
                torch.manual_seed(0)
                b = hf(ids, num_loops=loops, use_cache=False).logits.float()
                err = (a - b).abs().max().item()
                if not err <= atol * max(1.0, a.abs().max().item()):
                    raise ExportError(f"verification failed: exported logits differ from megaloop's by {err:.3g} "
                                      f"at {loops} loops (the export was not written)")
    finally:
        torch.set_rng_state(rng)


# ------------------------------------------------------------------------------------------------
# Registration


def register_hf() -> None:
    """Register MegaloopConfig / MegaloopForCausalLM with the transformers Auto classes, so an exported
    folder loads without trust_remote_code where megaloop is installed. Idempotent."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megaloop.export.hf_template.configuration_megaloop import MegaloopConfig
    from megaloop.export.hf_template.modeling_megaloop import MegaloopForCausalLM

    try:
        AutoConfig.register("megaloop", MegaloopConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(MegaloopConfig, MegaloopForCausalLM)
    except ValueError:
        pass
