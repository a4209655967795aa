"""tools/import_hf.py / megaloop.hf_import (issue 15, item 1): megaloop exports round-trip exactly, Ouro-format
and Llama folders import to the logits of their own reference forwards (Ouro's equations written out here,
transformers' LlamaForCausalLM), and bad folders are refused in one line with nothing written."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from export_support import EXPORTABLE_CONFIGS, perturbed_model, tiny_config

from megaloop.checkpoint import load_model
from megaloop.hf_import import HFImportError, import_hf

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(lm, loops, ids=IDS):
    with torch.no_grad():
        return lm.eval()(ids, loops=loops, noise_generator=torch.Generator().manual_seed(5)).logits


def _nothing_left(tmp_path, name):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.tmp")]


# ------------------------------------------------------------------------------------------------
# megaloop's own export: export -> import -> the same model


@pytest.mark.parametrize("path", EXPORTABLE_CONFIGS, ids=lambda p: Path(p).stem)
def test_megaloop_export_round_trip_is_exact(tmp_path, path):
    from megaloop.export import export_hf
    cfg = tiny_config(path)
    model = perturbed_model(cfg, seed=3)
    export_hf(model.state_dict(), cfg, cfg, tmp_path / "hf", verify=False)
    import_hf(tmp_path / "hf", tmp_path / "run")
    lm, got = load_model(tmp_path / "run")
    assert got.model == cfg.model
    if Path(path).stem == "lt":  # another vocab padding (e.g. for TP 4): only the padding rows change
        import_hf(tmp_path / "hf", tmp_path / "run128", ["model.pad_vocab_multiple=128"])
        lm128, _ = load_model(tmp_path / "run128")
        assert lm128.embedding.weight.shape[0] == 384 and torch.equal(_logits(lm128, 3), _logits(model, 3))
    assert got.data.tokenizer_type == "byte"
    for loops in (1, 3, 6):
        assert torch.equal(_logits(lm, loops), _logits(model, loops)), loops


# ------------------------------------------------------------------------------------------------
# Ouro: a tiny folder with Ouro's key names, against Ouro's equations


def _ouro_folder(folder: Path, tied=False, steps=3, extra=None, drop=None, reshape=None, **cfg_extra):
    from safetensors.torch import save_file
    V, d, H, KV, hd, F_, L = 90, 32, 4, 2, 8, 48, 2
    g = torch.Generator().manual_seed(1)
    w = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    norm = lambda: 1 + torch.randn(d, generator=g) * 0.1  # noqa: E731
    sd = {"model.embed_tokens.weight": w(V, d), "model.norm.weight": norm(),
          "model.early_exit_gate.weight": w(1, d), "model.early_exit_gate.bias": w(1)}
    if not tied:
        sd["lm_head.weight"] = w(V, d)
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": w(H * hd, d), p + "self_attn.k_proj.weight": w(KV * hd, d),
                   p + "self_attn.v_proj.weight": w(KV * hd, d), p + "self_attn.o_proj.weight": w(d, H * hd),
                   p + "mlp.gate_proj.weight": w(F_, d), p + "mlp.up_proj.weight": w(F_, d),
                   p + "mlp.down_proj.weight": w(d, F_)})
        for n in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            sd[p + n + ".weight"] = norm()
    sd.update(extra or {})
    for k in drop or ():
        del sd[k]
    for k, shape in (reshape or {}).items():
        sd[k] = torch.zeros(shape)
    cfg = {"architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": V, "hidden_size": d,
           "intermediate_size": F_, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
           "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "tie_word_embeddings": tied, "total_ut_steps": steps, "use_sliding_window": False,
           "auto_map": {"AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}}
    cfg.update(cfg_extra)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(folder / "model.safetensors"))
    return sd, cfg


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, theta=10000.0):
    """Rotate-half RoPE of (B, H, T, D)."""
    T, D = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    f = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * cos + rot * sin


def _attn(x, sd, p, H, KV):
    B, T, _ = x.shape
    q = (x @ sd[p + "q_proj.weight"].T).view(B, T, H, -1).transpose(1, 2)
    k = (x @ sd[p + "k_proj.weight"].T).view(B, T, KV, -1).transpose(1, 2)
    v = (x @ sd[p + "v_proj.weight"].T).view(B, T, KV, -1).transpose(1, 2)
    q, k = _rope(q), _rope(k)
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    return y @ sd[p + "o_proj.weight"].T


def _mlp(x, sd, p):
    return (F.silu(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T)) @ sd[p + "down_proj.weight"].T


def _ouro_reference(sd, steps, ids, tied=False, L=2, H=4, KV=2):
    """Ouro's forward: h = embed(x); per step: every layer with sandwich norms, then h = norm(h); the exit
    gate lambda_t = sigmoid(gate(h)); logits = lm_head(h) of the last step; exit pdf p_t."""
    h = sd["model.embed_tokens.weight"][ids]
    lambdas = []
    for _ in range(steps):
        for i in range(L):
            p = f"model.layers.{i}."
            h = h + _rms(_attn(_rms(h, sd[p + "input_layernorm.weight"]), sd, p + "self_attn.", H, KV),
                         sd[p + "input_layernorm_2.weight"])
            h = h + _rms(_mlp(_rms(h, sd[p + "post_attention_layernorm.weight"]), sd, p + "mlp."),
                         sd[p + "post_attention_layernorm_2.weight"])
        h = _rms(h, sd["model.norm.weight"])
        gate = h @ sd["model.early_exit_gate.weight"].T + sd["model.early_exit_gate.bias"]
        lambdas.append(torch.sigmoid(gate)[..., 0])
    head = sd["model.embed_tokens.weight" if tied else "lm_head.weight"]
    remaining, pdf = torch.ones_like(lambdas[0]), []
    for t, lam in enumerate(lambdas):
        pdf.append(lam * remaining if t < steps - 1 else remaining)
        remaining = remaining * (1 - lam)
    return h @ head.T, torch.stack(pdf)


@pytest.mark.parametrize("tied", [False, True])
def test_ouro_folder_matches_ouros_equations(tmp_path, tied):
    sd, _ = _ouro_folder(tmp_path / "ouro", tied=tied, steps=3)
    import_hf(tmp_path / "ouro", tmp_path / "run")
    lm, cfg = load_model(tmp_path / "run")
    m = cfg.model
    assert (m.n_prelude, m.n_loop, m.n_coda, m.loops, m.norm_style, m.share_outer_final_norm, m.exit_gate) == \
        (0, 2, 0, 3, "sandwich", True, True)
    assert cfg.loop.loss == "exit_weighted" and cfg.loop.mean == 3
    ids = IDS % 90
    for steps in (1, 3, 5):
        ref, ref_pdf = _ouro_reference(sd, steps, ids, tied)
        with torch.no_grad():
            out = lm.eval()(ids, labels=ids, loops=steps)
        torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.exit_probs, ref_pdf, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Llama: transformers' own forward is the reference


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("llama") / "hf"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)  # (unit norm scales would hide a swapped norm)
    model.save_pretrained(folder)
    return folder, model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_llama_plain_import_matches_transformers(tmp_path, llama):
    folder, model = llama
    import_hf(folder, tmp_path / "run")
    lm, cfg = load_model(tmp_path / "run")
    assert (cfg.model.n_prelude, cfg.model.n_loop, cfg.model.n_coda, cfg.model.loops) == (0, 4, 0, 1)
    assert cfg.model.padded_vocab_size == 128 and cfg.model.vocab_size == 100
    ids = IDS % 100
    torch.testing.assert_close(_logits(lm, 1, ids), _hf_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_llama_retrofit_is_the_original_at_one_loop(tmp_path, llama):
    folder, model = llama
    import_hf(folder, tmp_path / "run", ["model.loops=3", "loop.mean=3"], retrofit=(1, 2, 1))
    lm, cfg = load_model(tmp_path / "run")
    assert (cfg.model.n_prelude, cfg.model.n_loop, cfg.model.n_coda, cfg.model.loops) == (1, 2, 1, 3)
    ids = IDS % 100
    ref = _hf_logits(model, ids)
    torch.testing.assert_close(_logits(lm, 1, ids), ref, rtol=1e-5, atol=1e-5)
    assert (_logits(lm, 3, ids) - ref).abs().max() > 1e-2  # R = 3 reuses the block: another function
    # The looped block holds source layers 1, 2; the prelude layer 0, the coda layer 3.
    sd = lm.state_dict()
    hf = model.state_dict()
    assert torch.equal(sd["block.layers.1.mixer.wq.weight"], hf["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(sd["coda.0.mlp.w2.weight"], hf["model.layers.3.mlp.down_proj.weight"])


def test_llama_retrofit_with_a_dropped_layer_equals_the_model_without_it(tmp_path, llama):
    import copy
    folder, model = llama
    import_hf(folder, tmp_path / "run", retrofit=(1, 1, 1), block_from=2)
    lm, _ = load_model(tmp_path / "run")
    shorter = copy.deepcopy(model)
    del shorter.model.layers[1]
    shorter.config.num_hidden_layers = 3
    for i, layer in enumerate(shorter.model.layers):
        layer.self_attn.layer_idx = i
    ids = IDS % 100
    torch.testing.assert_close(_logits(lm, 1, ids), _hf_logits(shorter, ids), rtol=1e-5, atol=1e-5)
    notes = json.loads((tmp_path / "run" / "import.json").read_text())["notes"]
    assert any("dropped layers [1]" in n for n in notes)
    with pytest.raises(HFImportError, match=r"--retrofit 2,2,1 --block-from 1: the model has 4 layers"):
        import_hf(folder, tmp_path / "bad", retrofit=(2, 2, 1), block_from=1)
    _nothing_left(tmp_path, "bad")


def test_imported_folder_is_an_init_source(tmp_path, llama):
    from megaloop.checkpoint.init_weights import init_state_dict
    folder, _ = llama
    import_hf(folder, tmp_path / "run", ["parallel.tensor_parallel=2"])
    lm, cfg = load_model(tmp_path / "run")
    sd, note = init_state_dict(tmp_path / "run", cfg.model)
    assert "model.safetensors" in note
    assert all(torch.equal(sd[k], v) for k, v in lm.state_dict().items())


# ------------------------------------------------------------------------------------------------
# Refusals: one line naming the problem, nothing written


@pytest.mark.parametrize("case, pattern", [
    ("model_type", r"model_type 'gpt2' .* is not supported"),
    ("unknown", r"unknown tensor 'model.layers.0.self_attn.q_proj.bias' in model.safetensors"),
    ("missing", r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(megaloop's 'block.layers.1.mlp.w3.weight'"),
    ("shape", r"'model.layers.0.self_attn.k_proj.weight' has shape \(8, 32\); megaloop's "
              r"'block.layers.0.mixer.wk.weight' needs \(16, 32\)"),
    ("rope", r"rope type 'llama3': megaloop implements the default RoPE only"),
    ("nan", r"'model.layers.0.mlp.up_proj.weight' in model.safetensors \(megaloop's 'block.layers.0.mlp.w3.weight'\) "
            r"has 32 non-finite value"),
    ("flipped", r"'model.norm.weight' in model.safetensors .* has values up to 3.4e\+38"),
])
def test_bad_folders_are_refused_naming_the_problem(tmp_path, case, pattern):
    kw = {"model_type": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "auto_map": None},
          "unknown": {"extra": {"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}},
          "missing": {"drop": ["model.layers.1.mlp.up_proj.weight"]},
          "shape": {"reshape": {"model.layers.0.self_attn.k_proj.weight": (8, 32)}},
          "rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
          "nan": {"extra": {"model.layers.0.mlp.up_proj.weight": torch.zeros(48, 32).index_fill_(0, torch.tensor([3]),
                                                                                               float("nan"))}},
          "flipped": {"extra": {"model.norm.weight": torch.ones(32).index_fill_(0, torch.tensor([5]), 3.4e38)}}}[case]
    _ouro_folder(tmp_path / "src", **kw)
    with pytest.raises(HFImportError) as err:
        import_hf(tmp_path / "src", tmp_path / "run")
    assert "\n" not in str(err.value)
    assert __import__("re").search(pattern, str(err.value)), str(err.value)
    _nothing_left(tmp_path, "run")


def test_existing_output_is_refused_and_an_empty_one_is_used(tmp_path):
    _ouro_folder(tmp_path / "src")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(HFImportError, match="exists and is not an empty folder"):
        import_hf(tmp_path / "src", tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    import_hf(tmp_path / "src", tmp_path / "empty")
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.yaml", "import.json", "model.safetensors"]


def test_cli_one_line_error_and_success(tmp_path, capsys):
    _ouro_folder(tmp_path / "src", drop=["model.norm.weight"])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    tool = ROOT / "tools" / "import_hf.py"
    r = subprocess.run([sys.executable, str(tool), "--model", str(tmp_path / "src"), "--output", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "missing tensor 'model.norm.weight'" in r.stderr
    _nothing_left(tmp_path, "run")
    # The success path in this process (a second interpreter start costs ~10 s here).
    import importlib.util
    spec = importlib.util.spec_from_file_location("import_hf_tool", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _ouro_folder(tmp_path / "ok")
    assert mod._main(["--model", str(tmp_path / "ok"), "--output", str(tmp_path / "run"), "model.loops=5",
                      "loop.mean=5"]) == 0
    assert f"init.from={tmp_path / 'run'}" in capsys.readouterr().out
    _, cfg = load_model(tmp_path / "run")
    assert cfg.model.loops == 5 and cfg.loop.mean == 5


def test_a_sentencepiece_tokenizer_model_comes_along(tmp_path, llama):
    import shutil
    folder, _ = llama
    shutil.copytree(folder, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"spm bytes")
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, cfg = load_model(tmp_path / "run")
    assert cfg.data.tokenizer_type == "sentencepiece"
    assert cfg.data.tokenizer_model == str((tmp_path / "run" / "tokenizer.model").resolve())
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == b"spm bytes"
    import_hf(folder, tmp_path / "run2")  # none: the byte setting stays, with a note
    notes = json.loads((tmp_path / "run2" / "import.json").read_text())["notes"]
    assert any("tokenizer not imported" in n for n in notes)
