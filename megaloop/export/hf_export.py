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
    tokenizer_config.json (+ tokenizer.model for sentencepiece), special_tokens_map.json
    generation_config.json
    README.md                     what the folder is and how to load it
Everything is written to a temporary directory next to `output_dir` and renamed into place at the
end, so a failed export never leaves a partial folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from megaloop import checkpoint as ckpt
from megaloop.checkpoint import expected_shapes, save_plain_checkpoint  # noqa: F401 (re-exported)
from megaloop.config import Config, ModelConfig, config_from_dict
from megaloop.errors import MegaloopError, OutputError, os_error_in

TEMPLATE_DIR = Path(__file__).resolve().parent / "hf_template"
TEMPLATE_FILES = ("configuration_megaloop.py", "modeling_megaloop.py", "tokenization_megaloop.py")
AUTO_MAP = {
    "AutoConfig": "configuration_megaloop.MegaloopConfig",
    "AutoModelForCausalLM": "modeling_megaloop.MegaloopForCausalLM",
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ExportError(MegaloopError, ValueError):
    """The input cannot be exported as asked; the message says what is wrong. Nothing was written."""


# ------------------------------------------------------------------------------------------------
# Configuration


def _model_config(config: Union[Config, ModelConfig, dict]) -> ModelConfig:
    if isinstance(config, Config):
        return config.model
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):  # a saved Config tree or a bare model section
        tree = config if "model" in config else {"model": config}
        return config_from_dict({"model": tree["model"]}).model
    raise ExportError(f"model_config must be a megaloop Config or ModelConfig, got {type(config).__name__}")


def hf_config_dict(mc: ModelConfig, noise_init: str = "seeded", noise_seed: int = 0,
                   exit_strategy: Optional[str] = None, exit_threshold: Optional[float] = None) -> Dict[str, Any]:
    """MegaloopConfig keyword arguments for a megaloop ModelConfig (derived sizes made explicit)."""
    return dict(
        vocab_size=mc.vocab_size, padded_vocab_size=mc.padded_vocab_size, tie_word_embeddings=mc.tie_embeddings,
        embed_norm=mc.embed_norm, max_seq_len=mc.max_seq_len, d_model=mc.d_model, n_heads=mc.n_heads,
        n_kv_heads=mc.kv_heads, head_dim=mc.attn_head_dim, ffn_hidden=mc.ffn_dim, mlp=mc.mlp,
        norm_style=mc.norm_style, norm_eps=mc.norm_eps, norm_scale=mc.norm_scale, qk_norm=mc.qk_norm,
        rope_theta=mc.rope_theta, logit_softcap=mc.logit_softcap, init_std=mc.init_std,
        mixer=",".join(loop_mixers(mc)), linear_mixer=getattr(mc, "linear_mixer", "gdn"),
        conv_size=mc.conv_size, gdn_expand_v=mc.gdn_expand_v, gdn_chunk_size=mc.gdn_chunk_size, window=mc.window,
        dsa_topk=mc.dsa_topk, dsa_index_heads=mc.dsa_index_heads, dsa_index_dim=mc.dsa_index_dim,
        n_prelude=mc.n_prelude, n_loop=mc.n_loop, n_coda=mc.n_coda, num_loops=mc.loops, max_loops=mc.max_loops,
        arch=mc.arch, injection=mc.injection, recall=mc.recall, internal_recall_site=mc.internal_recall_site,
        internal_recall_layers=mc.internal_recall_layers, normalization=mc.normalization,
        state_init=mc.state_init, state_init_std=mc.state_init_std, share_outer_final_norm=mc.share_outer_final_norm, exit_gate=mc.exit_gate,
        loop_residual_gate=mc.loop_residual_gate, attn_output_gate=mc.attn_output_gate,
        noise_init=noise_init, noise_seed=noise_seed, exit_strategy=exit_strategy, exit_threshold=exit_threshold,
    )


def hf_config(mc: ModelConfig, **kwargs):
    from megaloop.export.hf_template.configuration_megaloop import MegaloopConfig

    return MegaloopConfig(**hf_config_dict(mc, **kwargs))


# ------------------------------------------------------------------------------------------------
# State dict validation


def check_state_dict(state_dict: Dict[str, torch.Tensor], mc: ModelConfig) -> None:
    """Raise ExportError naming every missing, unexpected, mis-shaped or non-finite entry."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise ExportError("the state dict is empty or not a dict")
    expected = expected_shapes(mc)
    optional = {"head.weight"} if mc.tie_embeddings else set()
    problems = []
    missing = sorted(k for k in expected if k not in state_dict and k not in optional)
    extra = sorted(k for k in state_dict if k not in expected)
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): {', '.join(extra[:12])}{' ...' if len(extra) > 12 else ''}")
    for k, shape in expected.items():
        v = state_dict.get(k)
        if v is None:
            continue
        if not torch.is_tensor(v):
            problems.append(f"{k}: not a tensor ({type(v).__name__})")
        elif tuple(v.shape) != shape:
            problems.append(f"{k}: shape {tuple(v.shape)}, the config needs {shape} (a shard not merged, or a "
                            f"checkpoint from another config?)")
        elif not v.is_floating_point():
            problems.append(f"{k}: dtype {v.dtype}, expected a floating-point tensor")
        elif not bool(torch.isfinite(v).all()):
            problems.append(f"{k}: contains NaN or inf")
    if mc.tie_embeddings and not problems and "head.weight" in state_dict:
        if not torch.equal(state_dict["head.weight"], state_dict["embedding.weight"]):
            problems.append("head.weight differs from embedding.weight, but model.tie_embeddings=true")
    if problems:
        raise ExportError("the state dict does not match the model config:\n  - " + "\n  - ".join(problems))


def loop_mixers(mc: ModelConfig) -> list:
    """The token mixer of each looped layer, resolved by megaloop's own pattern rules (comma lists,
    "N:M" ratios)."""
    from megaloop.model.mixers import mixer_pattern

    if hasattr(mc, "linear_mixer"):
        return mixer_pattern(mc.mixer, mc.n_loop, mc.linear_mixer)
    return mixer_pattern(mc.mixer, mc.n_loop)


def unsupported_mixers(mc: ModelConfig) -> list:
    """Mixers of this config that the Hugging Face modeling file does not implement (yet)."""
    from megaloop.export.hf_template.modeling_megaloop import MIXERS

    return sorted(set(loop_mixers(mc)) - set(MIXERS))


def _check_exportable(mc: ModelConfig) -> None:
    from megaloop.export.hf_template.modeling_megaloop import MIXERS

    unknown = unsupported_mixers(mc)
    if unknown:
        raise ExportError(f"model.mixer={mc.mixer!r}: the Hugging Face modeling file has no implementation of "
                          f"the token mixer(s) {unknown} yet (it has {sorted(MIXERS)}); add them to MIXERS in "
                          f"megaloop/export/hf_template/modeling_megaloop.py first. Nothing was written.")


# ------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_info(tokenizer_spec) -> Optional[Dict[str, Any]]:
    """Normalise a tokenizer spec: a megaloop Tokenizer, {"type": "byte"|"sentencepiece", "model": path},
    a DataConfig / Config (tokenizer_type, tokenizer_model) or None (no tokenizer is written)."""
    if tokenizer_spec is None:
        return None
    from megaloop.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, build_tokenizer

    if isinstance(tokenizer_spec, Config):
        tokenizer_spec = tokenizer_spec.data
    if hasattr(tokenizer_spec, "tokenizer_type"):
        tokenizer_spec = {"type": tokenizer_spec.tokenizer_type, "model": tokenizer_spec.tokenizer_model}
    if isinstance(tokenizer_spec, dict):
        try:
            tokenizer_spec = build_tokenizer(tokenizer_spec.get("type", "byte"), tokenizer_spec.get("model"))
        except (ValueError, OSError) as e:
            raise ExportError(f"tokenizer: {e}") from e
    if isinstance(tokenizer_spec, ByteTokenizer):
        return {"type": "byte", "tokenizer": tokenizer_spec}
    if isinstance(tokenizer_spec, SentencePieceTokenizer):
        return {"type": "sentencepiece", "tokenizer": tokenizer_spec, "model": tokenizer_spec.model_path}
    raise ExportError(f"unsupported tokenizer spec {tokenizer_spec!r}")


def _write_tokenizer(info: Dict[str, Any], out: Path, mc: ModelConfig) -> Dict[str, Any]:
    tok = info["tokenizer"]
    if tok.vocab_size > mc.vocab_size:
        raise ExportError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={mc.vocab_size}")
    if info["type"] == "byte":
        eos, pad = "<eod>", "<pad>"
        cfg = {"tokenizer_class": "MegaloopByteTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_megaloop.MegaloopByteTokenizer", None]}}
    else:
        shutil.copyfile(info["model"], out / "tokenizer.model")
        eos, pad = tok.sp.id_to_piece(tok.eod_id), tok.sp.id_to_piece(tok.pad_id)
        cfg = {"tokenizer_class": "MegaloopSentencePieceTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_megaloop.MegaloopSentencePieceTokenizer", None]},
               "unk_token": tok.sp.id_to_piece(tok.sp.unk_id()) if tok.sp.unk_id() >= 0 else None}
    cfg.update({"eos_token": eos, "pad_token": pad, "add_bos_token": False, "add_eos_token": False,
                "clean_up_tokenization_spaces": False, "model_max_length": mc.max_seq_len})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "pad_token": pad}, indent=2) + "\n")
    return {"eos_token_id": tok.eod_id, "pad_token_id": tok.pad_id}


# ------------------------------------------------------------------------------------------------
# Export


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

    tmp = make_temp_dir(out_dir)
    try:
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

        move_into_place(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = output_failure(e, out_dir, tmp)
        if failure is not None:
            raise failure from e
        raise
    return out_dir


def output_failure(err: BaseException, out_dir: Path, tmp: Optional[Path] = None) -> Optional[OutputError]:
    """The one-line OutputError for a write that failed (disk full, read-only, permissions) while exporting
    to out_dir, or None for any other error. A failure to read an input (a file outside the output's folder)
    is left alone. safetensors reports a full disk in its own error type: its message is matched."""
    import errno

    os_err = os_error_in(err)
    if os_err is None:
        text = str(err)
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            if os.strerror(code) in text or f"os error {code})" in text:
                os_err = OSError(code, os.strerror(code))
                break
    if os_err is None:
        return None
    if tmp is not None and os_err.filename is not None:
        where = os.path.abspath(os.fspath(os_err.filename))
        if not where.startswith(str(out_dir.parent) + os.sep) and where != str(out_dir.parent):
            return None
    return OutputError(os_err, out_dir.parent, f"nothing was written to {out_dir}"
                       + (" (the previous export there is untouched)" if out_dir.exists() else ""))


def make_temp_dir(out_dir: Path) -> Path:
    """The temporary folder beside out_dir that an export is written into before it is renamed."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise output_failure(e, out_dir) from e


# Every name an export (remote-code or llama format) writes into its folder: --overwrite replaces a
# folder holding these only, so a folder with anything else in it (someone's files) is never deleted.
EXPORT_FILES = frozenset(("config.json", "model.safetensors", "generation_config.json", "README.md",
                          "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                          "megaloop_unrolled.json", "__pycache__") + TEMPLATE_FILES)


def previous_export_problem(path) -> Optional[str]:
    """None when `path` is a folder an earlier export wrote (config.json of a megaloop export, or of a
    llama-format export with its megaloop_unrolled.json, and no other files) or an empty folder, so
    that --overwrite may replace it; otherwise why it is not."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "it is not a folder"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return None
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if not (model_type == "megaloop" or (model_type == "llama" and (path / "megaloop_unrolled.json").is_file())):
        return "it holds no config.json of a megaloop export"
    foreign = [n for n in names if n not in EXPORT_FILES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"besides an export it holds {shown}, which an export does not write"
    return None


def check_output_dir(out_dir, overwrite: bool) -> None:
    """Refuse (ExportError, one line, nothing touched) an existing output without overwrite, and with
    overwrite anything but a previous export: --overwrite never deletes a folder it did not write."""
    out_dir = Path(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    why = previous_export_problem(out_dir)
    if why:
        raise ExportError(f"refusing to overwrite {out_dir}: {why}; --overwrite only replaces a previous export "
                          f"(choose another output folder, or move that one away). Nothing was deleted.")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_paths(checkpoint, output_dir) -> None:
    """Refuse an output folder that would destroy or pollute the checkpoint being read: the checkpoint
    itself, a folder containing it, or a folder inside its checkpoint tree (a run's checkpoints/, a
    checkpoint root, a step tag). Real paths are compared, so symlinks do not hide the overlap. A run's
    own subfolder beside its checkpoints (runs/X/hf) is allowed."""
    ckpt_path, out = Path(checkpoint).resolve(), Path(output_dir).resolve()
    if _inside(ckpt_path, out):
        what = "is" if ckpt_path == out else "contains"
        example = ckpt_path / 'hf' if ckpt_path.is_dir() else ckpt_path.parent / 'hf'
        raise ExportError(f"--output {output_dir} {what} the checkpoint being read ({ckpt_path}): writing there "
                          f"would delete it; export to another folder (e.g. {example})")
    if not ckpt_path.is_dir():
        return
    if (ckpt_path / "checkpoints").is_dir():  # a training run: its checkpoint root
        tree = ckpt_path / "checkpoints"
    elif ckpt.is_tag_dir(ckpt_path):
        tree = ckpt_path.parent  # one step tag: the root holding it and its sibling tags
    elif ckpt.is_deepspeed_checkpoint(ckpt_path):
        tree = ckpt_path  # a checkpoint root
    else:
        return  # a plain checkpoint folder: check_output_dir keeps its files (they are no export)
    if _inside(out, tree):
        raise ExportError(f"--output {output_dir} lies inside the checkpoint folder {tree} being read; export "
                          f"beside it instead (e.g. {tree.parent / 'hf'})")


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename a completed temporary folder to out_dir; an existing out_dir (overwrite) is swapped out
    first and removed only once the new folder is in place. An existing out_dir that is not a previous
    export (see previous_export_problem) is refused, untouched."""
    if out_dir.exists() or out_dir.is_symlink():
        check_output_dir(out_dir, overwrite=True)
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "x")
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


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
        return MegaloopForCausalLM.from_pretrained(path, config=cfg).eval()
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
# Checkpoint seam


@contextlib.contextmanager
def _as_export_error():
    try:
        yield
    except ckpt.CheckpointError as e:
        raise ExportError(str(e)) from e


def load_merged_state_dict(checkpoint_dir, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The full megaloop state dict of a checkpoint, merged across tensor/pipeline-parallel shards.

    checkpoint_dir:
      * a megaloop/DeepSpeed training checkpoint: the run's output_dir, its checkpoints/ root (`latest`
        or the newest complete step_NNNNNNNN/ is read; `step` picks step_{step:08d}) or one tag
        directory (megaloop.checkpoint.resolve). Any TP x PP x DP layout and ZeRO 0-3. Only complete
        tags (megaloop_complete.json) are read; a missing or mis-shaped shard raises ExportError naming
        the file.
      * a plain `torch.save`d state dict (or a dict holding it under "model" / "state_dict" /
        "module"), given as a file or a directory with model.pt (or step_N/model.pt).
    """
    with _as_export_error():
        return ckpt.load_state_dict(checkpoint_dir, step)


def load_checkpoint_config(checkpoint_dir, step: Optional[int] = None) -> Config:
    """The run config of a checkpoint: for a megaloop/DeepSpeed checkpoint the resolved config stored
    in its client state (with the tokenizer reference stored beside it); for a plain file a 'config'
    entry in it, else config.yaml next to it (or in its parent directory)."""
    with _as_export_error():
        return ckpt.load_config(checkpoint_dir, step)


def load_checkpoint(checkpoint_dir, step: Optional[int] = None):
    """(merged state dict, Config, tokenizer spec) of a checkpoint: the inputs of export_hf. The
    tokenizer spec is the run's DataConfig (tokenizer_type, tokenizer_model)."""
    with _as_export_error():
        sd, cfg = ckpt.load(checkpoint_dir, step)
    return sd, cfg, cfg.data


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
