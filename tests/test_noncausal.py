"""model.causal=false: bidirectional softmax attention (Sudoku), checked against a dense reference computed
here; refused with one clear error wherever causality is assumed (other mixers, generation, corpus data,
teacher-forced tasks, the exports); a tiny 4x4 Sudoku run through the real trainer learns."""
import math

import pytest
import torch

from export_support import tiny_config as tiny_yaml
from megaloop.config import ConfigError, ModelConfig
from megaloop.model import build_model
from megaloop.model.layers import Attention, apply_rope, rope_cache
from test_train_support import metrics, run_ranks, tiny_config, write_config

NONCAUSAL = ["model.causal=false", "data.task=sudoku"]


def dense_attention(x, attn, cos, sin, causal):
    """Grouped-query softmax attention from the layer's weights, written out: scores over every key (or keys
    <= t), softmax, weighted values, heads merged, W_o."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = (x @ attn.wq.weight.T).view(B, T, -1, hd)
    k = (x @ attn.wk.weight.T).view(B, T, -1, hd)
    v = (x @ attn.wv.weight.T).view(B, T, -1, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    H, Hkv = q.shape[2], k.shape[2]
    out = torch.zeros(B, T, H, hd)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, :, h // (H // Hkv)], v[b, :, h // (H // Hkv)]
            scores = q[b, :, h] @ kh.T / math.sqrt(hd)                          # (T, T)
            if causal:
                scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            out[b, :, h] = scores.softmax(-1) @ vh
    return out.reshape(B, T, H * hd) @ attn.wo.weight.T


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_dense_reference(causal):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, causal=causal)
    attn = Attention(cfg).eval()
    x = torch.randn(2, 7, 32)
    cos, sin = rope_cache(7, cfg.attn_head_dim, cfg.rope_theta)
    got = attn(x, (cos, sin))
    ref = dense_attention(x, attn, cos, sin, causal)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if not causal:  # and it is not the causal result
        assert (got - dense_attention(x, attn, cos, sin, True)).abs().max() > 1e-3


@pytest.mark.parametrize("yaml", ["lt", "flt", "inject_add"])
def test_every_position_sees_the_whole_sequence(yaml):
    """Changing the last token moves the first position's logits when not causal, never when causal."""
    ids = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 7) % 200
    for causal in (True, False):
        cfg = tiny_yaml(yaml, [f"model.causal={str(causal).lower()}", "data.task=sudoku"])
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():
            a, b = model(ids, loops=3).logits, model(later, loops=3).logits
        moved = (a[:, 0] - b[:, 0]).abs().max().item()
        assert (moved > 1e-4) if not causal else (moved == 0.0), (yaml, causal, moved)


@pytest.mark.parametrize("mixer", ["gdn", "swa", "dsa", "gdn,attn", "1:1"])
def test_causal_only_mixers_are_refused(mixer):
    with pytest.raises(ConfigError, match=r"model.causal=false .*softmax attention \('attn'\) only"):
        tiny_yaml("lt", NONCAUSAL + [f"model.mixer={mixer}"])
    with pytest.raises(ConfigError, match="model.causal=false"):  # a model built in code, without validate
        build_model(ModelConfig(causal=False, n_loop=2, mixer=mixer))


def test_settings_that_assume_causality_are_refused():
    assert tiny_yaml("lt", NONCAUSAL).model.causal is False
    with pytest.raises(ConfigError, match="train.sample_tokens=5 .*causal"):
        tiny_yaml("lt", NONCAUSAL + ["train.sample_tokens=5"])
    with pytest.raises(ConfigError, match="model.causal=false .*data.task"):
        tiny_yaml("lt", ["model.causal=false"])
    from megaloop.training.data import build_task_datasets
    cfg = tiny_yaml("lt", ["model.causal=false", "data.task=mqar", "data.seq_len=34"])
    with pytest.raises(ConfigError, match="teacher forcing"):
        build_task_datasets(cfg, 8, 0)
    cfg = tiny_yaml("lt", ["model.causal=true", "data.task=mqar", "data.seq_len=34"])
    assert len(build_task_datasets(cfg, 8, 0)["train"]) == 8


def test_generation_and_exports_refuse_a_bidirectional_model(tmp_path):
    from megaloop.errors import UsageError
    from megaloop.export import ExportError, export_hf
    from megaloop.export.llama_export import export_llama
    from megaloop.generation import generate, wrap_megaloop
    cfg = tiny_yaml("plain", NONCAUSAL)
    model = build_model(cfg)
    with pytest.raises(UsageError, match="causal=false"):
        generate(wrap_megaloop(model), [1, 2, 3], max_new_tokens=2)
    with pytest.raises(ExportError, match="model.causal=false: the Hugging Face export is a causal LM"):
        export_hf(model.state_dict(), cfg, cfg.data, tmp_path / "hf")
    with pytest.raises(ExportError, match="causal=false"):
        export_llama(model.state_dict(), cfg, cfg.data, tmp_path / "llama", loops=1)
    assert list(tmp_path.iterdir()) == []


def test_sudoku_trains_bidirectionally(tmp_path):
    """4x4 Sudoku (34 tokens) through pretrain_looped.py with model.causal=false: the loss falls."""
    out_dir = tmp_path / "sudoku"
    cfg = tiny_config("unused", str(out_dir), model={"vocab_size": 16, "max_seq_len": 64, "causal": False},
                      data={"task": "sudoku", "task_params": {"size": 4}, "seq_len": 34},
                      train={"steps": 30, "log_interval": 1, "eval_interval": 30, "eval_iters": 1, "lr": 1e-2,
                             "warmup_steps": 0, "lr_schedule": "constant", "micro_batch_size": 8})
    cfg["data"].pop("data_path")
    cfg["data"].pop("split")
    (rc, out), = run_ranks(1, ["--config", write_config(str(tmp_path / "s.yaml"), cfg)], timeout=180)
    assert rc == 0, out[-3000:]
    rows = metrics(str(out_dir))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"sudoku 4x4 bidirectional: mean loss steps 1-5 {first:.4f}, steps 26-30 {last:.4f}")
    assert last < 0.8 * first, (first, last)
    valid = [r for r in rows if "valid_loss" in r]
    assert valid and 0.0 <= valid[-1]["exact_match_position"] <= 1.0


def test_flops_count_every_key_when_bidirectional():
    from megaloop.model.flops import layer_forward_flops
    causal, full = ModelConfig(d_model=32, n_heads=4), ModelConfig(d_model=32, n_heads=4, causal=False)
    # scores and weighted values: 2 * 2 * keys * heads * head_dim per token; T/2 keys on average when causal
    assert layer_forward_flops(full, 64) - layer_forward_flops(causal, 64) == 2 * 2 * 32 * 4 * 8
