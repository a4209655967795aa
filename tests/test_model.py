"""The looped model family on one process: every variant trains, the equivalences and invariants
that the papers rely on hold (shared/looped_models.md sections 1-8)."""
import glob
import math
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from megaloop.config import load_config
from megaloop.model import build_model, sample_loops
from megaloop.model.injection import ParcaeInjection
from megaloop.model.loop_losses import exit_distribution
from megaloop.model.mixers import MIXERS, register_mixer

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted(glob.glob(str(ROOT / "yaml_configs/tiny/*.yaml")))
TINY_IDS = [Path(p).stem for p in TINY]
VOCAB = 258


def _batch(B=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A learnable pattern: each sequence counts up from a random start, so the loss can fall fast.
    start = torch.randint(0, VOCAB - T - 1, (B, 1), generator=g)
    seq = start + torch.arange(T + 1)
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("path", TINY, ids=TINY_IDS)
def test_every_variant_trains_with_falling_loss(path):
    torch.manual_seed(0)
    cfg = load_config(path)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = _batch()
    losses = []
    for step in range(20):
        lc = sample_loops(cfg.loop, cfg.train.seed, step)
        out = model(x, labels=y, loops=lc.total, grad_loops=lc.grad)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.75 * losses[0], losses


def _cfg(overrides):
    base = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.n_loop=2",
            "model.max_seq_len=32", "data.seq_len=32"]
    return load_config(None, base + overrides)


FLT_FAMILY = ["flt", "lt_i", "lt_ia", "flt_res"]


def test_at_one_loop_flt_family_and_lt_equal_the_plain_transformer():
    torch.manual_seed(0)
    plain = build_model(_cfg(["model.loops=1"]))
    x, _ = _batch(2, 16)
    ref = plain(x, loops=1).logits
    for arch in FLT_FAMILY:
        model = build_model(_cfg([f"model.arch={arch}"]))
        model.load_state_dict(plain.state_dict())
        torch.testing.assert_close(model(x, loops=1).logits, ref, rtol=0, atol=0)
        # ... and they do differ once they loop.
        assert not torch.allclose(model(x, loops=3).logits, plain(x, loops=3).logits)


def test_flt_ablations_have_identical_parameter_counts():
    counts = {a: build_model(_cfg([f"model.arch={a}"])).num_params() for a in FLT_FAMILY + ["recurrent"]}
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("path", TINY, ids=TINY_IDS)
@pytest.mark.parametrize("loops", [1, 3])
def test_causality_at_every_loop_count(path, loops):
    torch.manual_seed(0)
    model = build_model(load_config(path)).eval()
    x, _ = _batch(2, 24)
    t = 10
    x2 = x.clone()
    x2[:, t + 1:] = (x2[:, t + 1:] + 7) % VOCAB
    torch.manual_seed(1)  # the random initial state (noise) must be the same draw in both calls
    a = model(x, loops=loops, exit="kl" if "ouro" in path else None).logits
    torch.manual_seed(1)
    b = model(x2, loops=loops, exit="kl" if "ouro" in path else None).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_parcae_injection_is_stable_for_any_parameters_and_at_init():
    inj = ParcaeInjection(64, math.sqrt(0.2))
    a_bar, delta = inj.coefficients()
    torch.testing.assert_close(a_bar, torch.full((64,), 0.4472136), atol=1e-5, rtol=0)
    torch.testing.assert_close(delta, torch.full((64,), 0.8047190), atol=1e-5, rtol=0)  # Bbar diag at init
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 5.0, 20.0):
        with torch.no_grad():
            inj.A_log.copy_(torch.randn(64, generator=g) * scale)
            inj.dt_bias.copy_(torch.randn(64, generator=g) * scale)
        a_bar, _ = inj.coefficients()
        assert float(inj.spectral_norm().detach()) < 1.0 and float(a_bar.detach().min()) >= 0.0


def test_parcae_state_converges_geometrically_where_add_grows_linearly():
    """With the looped layers contributing nothing, Parcae's state converges, `add`'s grows linearly."""
    results = {}
    for inj in ("parcae", "add"):
        model = build_model(_cfg([f"model.injection={inj}", "model.normalization=inner",
                                  "model.state_init=zeros", "model.zero_init_out=true"]))
        x, _ = _batch(1, 8)
        out = model(x, loops=12, return_diagnostics=True)
        results[inj] = out.diagnostics["state_norm"]
    add, parcae = results["add"], results["parcae"]
    torch.testing.assert_close(add / add[0], torch.arange(1, 13, dtype=torch.float32), rtol=1e-4, atol=1e-4)
    deltas = torch.diff(parcae)
    assert torch.all(deltas[1:] / deltas[:-1] < 0.5)  # geometric: ratio Abar = 0.447
    assert parcae[-1] < 2 * parcae[0]


def test_ouro_exit_probabilities_sum_to_one_and_exits_select_loops():
    lam = torch.rand(6, 3, 5)
    p = exit_distribution(lam)
    torch.testing.assert_close(p.sum(0), torch.ones(3, 5))
    assert torch.all(p >= 0)
    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "yaml_configs/tiny/ouro.yaml"))
    x, y = _batch(2, 16)
    out = model(x, labels=y, loops=5, exit="q_exit", exit_threshold=0.5)
    torch.testing.assert_close(out.exit_probs.sum(0), torch.ones(2, 16))
    assert out.exit_loops.min() >= 1 and out.exit_loops.max() <= 5
    # q = 1 can only be met at the last loop (where the remainder sits)
    assert (model(x, loops=5, exit="q_exit", exit_threshold=1.0 + 1e-6).exit_loops == 5).all()
    # KL exit: an enormous threshold exits at loop 2 (loop 1 has no predecessor), 0 never exits early
    assert (model(x, loops=5, exit="kl", exit_threshold=1e9).exit_loops == 2).all()
    last = model(x, loops=5, exit="kl", exit_threshold=0.0)
    assert (last.exit_loops == 5).all()
    torch.testing.assert_close(last.logits, model(x, loops=5).logits)


def test_truncated_backprop_keeps_early_loops_out_of_the_graph():
    torch.manual_seed(0)
    model = build_model(_cfg(["model.injection=add"]))
    calls = []
    model.block.layers[0].register_full_backward_hook(lambda *a: calls.append(1))
    x, y = _batch(2, 16)
    for grad_loops, expected in [(1, 1), (2, 2), (None, 5)]:
        calls.clear()
        model(x, labels=y, loops=5, grad_loops=grad_loops).loss.backward()
        assert len(calls) == expected, (grad_loops, len(calls))
    # The gradient with k=2 equals that of an explicit run whose state is detached after 3 loops.
    model.zero_grad()
    model(x, labels=y, loops=5, grad_loops=2).loss.backward()
    g_trunc = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    rope = model.rope(16, x.device)
    e = model.embed(x, rope)
    with torch.no_grad():
        s = model.block.initial_state(e)
        for t in range(3):
            s = model.block.carry(model.block.step(t, s, e, rope), None)
    s = model.block.carry(model.block.step(3, s, e, rope), None)
    s = model.block.step(4, s, e, rope)
    from megaloop.model.loop_losses import mean_token_loss, token_cross_entropy
    logits = model.head_logits(s, rope)
    mean_token_loss(token_cross_entropy(logits, y), y).backward()
    g_ref = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(g_trunc, g_ref):
        torch.testing.assert_close(a, b)


def _draws(seed_global):
    import numpy as np
    import torch as t
    from megaloop.config import LoopScheduleConfig
    from megaloop.model import sample_loops as sl
    t.manual_seed(seed_global)
    np.random.seed(seed_global)
    cfg = LoopScheduleConfig(sampling="lognormal_poisson", mean=6, max=32, backprop_loops=3)
    return [(sl(cfg, 1234, step, mb).total, sl(cfg, 1234, step, mb).grad) for step in range(50) for mb in range(4)]


def test_loop_count_draw_is_identical_across_simulated_ranks():
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        ranks = pool.map(_draws, [0, 1])  # two "ranks" with different global RNG states
    assert ranks[0] == ranks[1]
    totals = [t for t, _ in ranks[0]]
    assert len(set(totals)) > 3 and all(1 <= t <= 32 for t in totals)
    assert all(g == min(t, 3) for t, g in ranks[0])
    from megaloop.config import LoopScheduleConfig
    cfg = LoopScheduleConfig(sampling="poisson", mean=8, max=64)
    mean = sum(sample_loops(cfg, 0, s).total for s in range(4000)) / 4000
    assert abs(mean - 8) < 0.2


def test_model_trained_at_four_loops_runs_at_one_to_twelve():
    torch.manual_seed(0)
    for name in ("lt", "parcae", "lt2_gates", "ouro", "flt"):
        cfg = load_config(ROOT / f"yaml_configs/tiny/{name}.yaml")
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x, y = _batch(2, 16)
        for _ in range(3):
            opt.zero_grad()
            model(x, labels=y, loops=4).loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for r in range(1, 13):
                out = model(x, labels=y, loops=r, return_diagnostics=True)
                assert out.logits.shape == (2, 16, VOCAB) and torch.isfinite(out.loss)
                assert out.diagnostics["residual_norm"].shape == (r,)


@pytest.mark.parametrize("mode", ["loop", "layer"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "yaml_configs/tiny/flt.yaml"))
    x, y = _batch(2, 16)
    model(x, labels=y, loops=3).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.block.activation_checkpointing = mode
    model(x, labels=y, loops=3).loss.backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_per_loop_losses():
    torch.manual_seed(0)
    x, y = _batch(2, 16)
    model = build_model(_cfg([]))
    per = model(x, labels=y, loops=6).loss
    for mode, picks in [("mean", range(6)), ("last_third", range(4, 6))]:
        model.loss_mode = mode
        out = model(x, labels=y, loops=6)
        from megaloop.model.loop_losses import mean_token_loss, token_cross_entropy
        expect = torch.stack([mean_token_loss(token_cross_entropy(out.per_loop_logits[i], y), y) for i in picks]).mean()
        torch.testing.assert_close(out.loss, expect)
    torch.testing.assert_close(out.per_loop_logits[-1], model(x, loops=6).logits)
    model.loss_mode = "last"
    torch.testing.assert_close(model(x, labels=y, loops=6).loss, per)


def test_mixer_is_pluggable_without_touching_the_loop():
    class ZeroMixer(torch.nn.Module):
        def __init__(self, cfg, layer_idx):
            super().__init__()
            self.proj = torch.nn.Linear(cfg.d_model, cfg.d_model, bias=False)

        def forward(self, x, rope, q_input=None):
            return self.proj(x) * 0

    register_mixer("zero_test")(ZeroMixer)
    try:
        model = build_model(_cfg(["model.mixer=zero_test,attn"]))
        kinds = [type(layer.mixer).__name__ for layer in model.block.layers]
        assert kinds == ["ZeroMixer", "Attention"]
        x, y = _batch(2, 8)
        assert torch.isfinite(model(x, labels=y).loss)
    finally:
        MIXERS.pop("zero_test")


def test_loop_max_clipping_a_heavy_tailed_schedule_is_reported():
    from megaloop.config import LoopScheduleConfig
    from megaloop.model.loop_schedule import clipping_warning, expected_loops
    huginn = LoopScheduleConfig(sampling="lognormal_poisson", mean=32, sigma=0.5, max=32)
    msg = clipping_warning(huginn)
    assert msg and "loop.max=32 clips" in msg and "would keep 99% of the draws" in msg
    assert expected_loops(huginn) < 30  # what the clipping does to the mean
    wide = int(msg.rsplit("loop.max=", 1)[1].split()[0])
    assert wide > 32 and clipping_warning(LoopScheduleConfig(sampling="lognormal_poisson", mean=32, sigma=0.5,
                                                             max=wide)) is None
    assert clipping_warning(LoopScheduleConfig(sampling="poisson", mean=4, max=32)) is None
    assert clipping_warning(LoopScheduleConfig(sampling="fixed", mean=4)) is None


def test_keyed_noise_start_ignores_the_global_rng_and_follows_step_and_micro_batch():
    # Training keys the noise start of micro-batch m by (seed, step, m) (LoopedBlock.set_noise_key), so
    # every pipeline stage / TP rank / resumed run draws the same whatever drew from torch's RNG before.
    from megaloop.model.looped_block import noise_generator
    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "yaml_configs/tiny/parcae.yaml"))
    x, _ = _batch(2, 16)

    def run(step, dp_rank=0, dp_size=1, micro_batches=1, global_seed=0):
        model.block.set_noise_key(7, step, dp_rank, dp_size)
        torch.manual_seed(global_seed)
        return [model(x, loops=3).logits for _ in range(micro_batches)]

    a0, a1 = run(5, micro_batches=2)
    b0, b1 = run(5, micro_batches=2, global_seed=123)  # another global RNG state: the same draws
    torch.testing.assert_close(a0, b0, rtol=0, atol=0)
    torch.testing.assert_close(a1, b1, rtol=0, atol=0)
    assert not torch.allclose(a0, a1)  # micro-batches 0 and 1 draw different noise
    assert not torch.allclose(a0, run(6)[0])  # ... so do steps
    # DP rank 1 of 2 draws what one rank draws for its second accumulated micro-batch
    torch.testing.assert_close(run(5, dp_rank=1, dp_size=2)[0], a1, rtol=0, atol=0)
    # the reference: micro-batch 1's explicit generator
    model.block.noise_key = None
    ref = model(x, loops=3, noise_generator=noise_generator(7, 5, 1, x.device)).logits
    torch.testing.assert_close(ref, a1, rtol=0, atol=0)
