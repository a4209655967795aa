"""DSA's lightning indexer against DeepSeek-V3.2's (issue 13 item 5), written here from the V3.2 formulas:

    q = W_q x_q (H_I heads of d_I), k = LayerNorm(W_k x) (eps 1e-6, scale and bias),
    RoPE on the first r channels of q and k, non-interleaved (channel i pairs with i + r/2, the angle of
    position p is p * theta^(-2i/r)), the other d_I - r channels left alone,
    I(t, s) = sum_j (W_w x_q(t))_j * H_I^-1/2 * d_I^-1/2 * ReLU(q_j(t) . k(s)).

The reference below rotates with complex numbers (as V3.2's apply_rotary_emb does), not with
megaloop's cos/sin helper. Also: the legacy form, old checkpoints' configs, and the exported model.
"""
import math

import pytest
import torch

from megaloop.checkpoint.saved_config import saved_config_from_dict
from megaloop.config import ConfigError, load_config
from megaloop.model import build_model
from megaloop.model.sparse_attention import DeepSeekSparseAttention
from megaloop.ops import lightning_indexer_scores, lightning_indexer_topk
from megaloop.training.resume_policy import ResumeConfigError, check_resume_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _cfg(overrides=()):
    return load_config(ROOT / "yaml_configs/tiny/lt2_gdn_dsa.yaml",
                       ["model.dsa_index_heads=3", "model.dsa_index_dim=16", "model.dsa_topk=5", *overrides])


def _dsa(cfg, seed=0):
    torch.manual_seed(seed)
    m = DeepSeekSparseAttention(cfg.model)
    with torch.no_grad():  # every parameter away from its init, the LayerNorm's too
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0) + (1.0 if p.dim() == 1 else 0.0))
    return m


def _rope_complex(x, rope_dim, theta):
    """V3.2's non-interleaved RoPE on x (..., T, [H,] D)'s first rope_dim channels, via complex numbers.
    x: (B, T, H, D)."""
    T = x.shape[1]
    pe, nope = x[..., :rope_dim].double(), x[..., rope_dim:]
    half = rope_dim // 2
    freqs = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)      # (half,)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)                      # (T, half)
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    z = torch.complex(pe[..., :half], pe[..., half:]) * rot                                # pairs (i, i + r/2)
    return torch.cat([z.real, z.imag, nope.double()], dim=-1)


def reference_scores(m, x, q_input, rope_dim, theta, form="v3.2"):
    """(B, T, T) V3.2 indexer scores, future keys -inf, in float64."""
    B, T, _ = x.shape
    H, D = m.index_heads, m.index_dim
    xq = x if q_input is None else q_input
    q = (xq.double() @ m.wq_index.weight.double().T).view(B, T, H, D)
    k = x.double() @ m.wk_index.weight.double().T
    if form == "v3.2":
        mu, var = k.mean(-1, keepdim=True), k.var(-1, unbiased=False, keepdim=True)
        k = (k - mu) / torch.sqrt(var + 1e-6) * m.k_index_norm.weight.double() + m.k_index_norm.bias.double()
        q = _rope_complex(q, rope_dim, theta)
        k = _rope_complex(k[:, :, None], rope_dim, theta)[:, :, 0]
    w = xq.double() @ m.w_index.weight.double().T * H ** -0.5
    if form == "v3.2":
        w = w * D ** -0.5
    scores = torch.einsum("bthd,bsd->bths", q, k).clamp_min(0).mul(w[..., None]).sum(2)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf"))


@pytest.mark.parametrize("rope_dim", [None, 4, 16, 0])
@pytest.mark.parametrize("flt_query", [False, True])
def test_indexer_scores_equal_the_v32_formulas(rope_dim, flt_query):
    cfg = _cfg([] if rope_dim is None else [f"model.dsa_index_rope_dim={rope_dim}"])
    r = 8 if rope_dim is None else rope_dim  # None: half of d_I = 16
    assert cfg.model.dsa_rope_dim == r
    m = _dsa(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, cfg.model.d_model, generator=g)
    q_in = torch.randn(2, 37, cfg.model.d_model, generator=g) if flt_query else None
    got = lightning_indexer_scores(*m.index_inputs(x, q_in), query_block_size=8).double()
    want = reference_scores(m, x, q_in, r, cfg.model.rope_theta)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    # The blockwise staged top-k selects the reference's top keys (ties: the earlier key).
    idx, valid = lightning_indexer_topk(*m.index_inputs(x, q_in), topk=cfg.model.dsa_topk, query_block_size=8)
    ref = want.sort(dim=-1, descending=True, stable=True).indices[..., :cfg.model.dsa_topk].sort(-1).values
    assert torch.equal(idx[valid], ref[valid])


def test_rope_makes_the_indexer_position_aware_and_shift_invariant():
    """Scores of (t, s) depend on t - s through the RoPE part: the same content shifted by p positions
    scores the same; with rope_dim 0 the scores ignore positions altogether."""
    cfg = _cfg()
    m = _dsa(cfg)
    x = torch.randn(1, 12, cfg.model.d_model, generator=torch.Generator().manual_seed(2))
    x2 = torch.cat([torch.randn(1, 5, cfg.model.d_model), x], dim=1)
    s1 = lightning_indexer_scores(*m.index_inputs(x))
    s2 = lightning_indexer_scores(*m.index_inputs(x2))[:, 5:, 5:]
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-5)
    # the same key content at another distance scores differently (positions matter)
    xr = x.clone()
    xr[0, 0] = x[0, 3]
    assert not torch.allclose(lightning_indexer_scores(*m.index_inputs(xr))[0, 11, 0],
                              lightning_indexer_scores(*m.index_inputs(x))[0, 11, 3])


def test_legacy_form_is_the_earlier_indexer():
    cfg = _cfg(["model.dsa_indexer_form=legacy"])
    m = _dsa(cfg)
    assert m.k_index_norm is None and m.rope_dim == 0
    x = torch.randn(2, 20, cfg.model.d_model, generator=torch.Generator().manual_seed(4))
    got = lightning_indexer_scores(*m.index_inputs(x)).double()
    want = reference_scores(m, x, None, 0, cfg.model.rope_theta, form="legacy")
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="dsa_index_rope_dim"):
        _cfg(["model.dsa_indexer_form=legacy", "model.dsa_index_rope_dim=4"])
    with pytest.raises(ConfigError, match="dsa_index_rope_dim"):
        _cfg(["model.dsa_index_rope_dim=5"])
    with pytest.raises(ConfigError, match="dsa_indexer_form"):
        _cfg(["model.dsa_indexer_form=v3"])


def test_old_checkpoint_configs_read_as_legacy_and_resume_names_the_flag():
    now = _cfg()
    old_tree = now.to_dict()
    del old_tree["model"]["dsa_indexer_form"], old_tree["model"]["dsa_index_rope_dim"]
    saved = saved_config_from_dict(old_tree)
    assert saved.model.dsa_indexer_form == "legacy"
    # the saved config rebuilds the saved model: no LayerNorm parameters, legacy state dict keys
    keys = set(build_model(saved).state_dict())
    assert not any("k_index_norm" in k for k in keys)
    with pytest.raises(ResumeConfigError, match="model.dsa_indexer_form: 'legacy' in the checkpoint"):
        check_resume_config(saved, now, "old-run")
    # a model without DSA layers is read unchanged (no spurious difference on resume)
    plain = load_config(ROOT / "yaml_configs/tiny/lt2_gdn.yaml").to_dict()
    del plain["model"]["dsa_indexer_form"]
    assert saved_config_from_dict(plain).model.dsa_indexer_form == "v3.2"


@pytest.mark.parametrize("form", ["v3.2", "legacy"])
def test_export_logits_equal_megaloop(tmp_path, form):
    from megaloop.export import export_hf, load_exported
    cfg = _cfg([f"model.dsa_indexer_form={form}", "model.dsa_topk=6"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "k_index_norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    out = export_hf(model.state_dict(), cfg, cfg.data, tmp_path / form)
    hf = load_exported(out).eval()
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(x, loops=3).logits
        got = hf(x, num_loops=3).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(got.abs().max()))
