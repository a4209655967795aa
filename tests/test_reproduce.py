"""tools/reproduce.py: every claim's --quick mode runs through pretrain_looped.py and writes a well-formed
summary.csv, a PNG figure and one verdict line with numbers (whether the claim holds is not tested: at quick
scale it usually does not). Also --list, --write-docs and the one-line errors."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "reproduce.py")
CLAIMS = ["flt_stability", "recall_norm", "parcae_injection", "lt2_mixers", "test_time_compute"]

# claim -> (columns summary.csv must have, the number of rows it must have)
EXPECTED = {
    # LT at K=3 and K=12, FLT at K=12 (the ablations LT_i, LT_ia only outside --quick)
    "flt_stability": ({"seed", "variant", "loops_K", "final_train_loss", "valid_loss", "residual_norm_loop1",
                       "residual_norm_loopK", "residual_growth", "grad_spike_ratio", "diverged"}, 3),
    # 3 variants (internal recall only outside --quick) x lengths n, 2n (n=4) x loops {1, n/2, n, 3n/2, 2n, 3n, 4n, 6n}
    "recall_norm": ({"variant", "eval_length", "eval_loops", "accuracy_position", "accuracy_sequence",
                     "relative_step_last", "state_norm_last"}, 3 * 2 * 8),
    "parcae_injection": ({"variant", "injection", "lr", "state_norm_loop1", "state_norm_loopR", "state_growth",
                          "final_train_loss", "injection_spectral_norm"}, 4),
    "lt2_mixers": ({"task", "variant", "loops", "params", "accuracy_position", "accuracy_sequence",
                    "input_dependence"}, 8),  # MQAR, S3
    # parity (n=4) without and with the exit gate: loops 1..2n, 3n, 4n, 6n + exits (2 KL; 2 KL + 3 Q-exit);
    # demo LM: loops 1..4R (R=2) + 2 KL exits
    "test_time_compute": ({"model", "data", "mode", "threshold", "loops", "avg_loops", "nll", "nll_gain_vs_1",
                           "gain_ci_low", "gain_ci_high", "accuracy_position"}, (11 + 2) + (11 + 5) + (8 + 2)),
}


def _run(*args):
    """`python tools/reproduce.py args...`, run in this process (its main), with the Python processes it starts
    (each variant's pretrain_looped.py, the demo corpus' tools) forked from tests/preloaded.py's server instead
    of fresh interpreters."""
    import contextlib
    import io
    import runpy

    from megaloop.reproduce import runner
    from preloaded import forked_subprocess

    tool = runpy.run_path(TOOL, run_name="reproduce_tool")
    out, err = io.StringIO(), io.StringIO()
    saved = runner.subprocess
    runner.subprocess = forked_subprocess
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = tool["main"](list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        runner.subprocess = saved
    return subprocess.CompletedProcess([sys.executable, TOOL, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reproduce")


def test_list_names_every_claim_in_order():
    out = _run("--list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == CLAIMS
    assert all(len(line.split()) > 5 for line in lines)  # a description on each line


@pytest.mark.parametrize("claim", CLAIMS)
def test_quick_mode_writes_summary_figure_and_verdict(claim, out_dir):
    out = _run(claim, "--quick", "--out", str(out_dir), "--jobs", "2")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    d = out_dir / claim
    with open(d / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns, n_rows = EXPECTED[claim]
    assert columns <= set(rows[0]), sorted(set(rows[0]))
    assert len(rows) == n_rows
    if claim == "lt2_mixers":  # reported, not judged: measured for every variant
        assert all(0 < float(r["input_dependence"]) < float("inf") for r in rows), rows
    png = (d / "figure.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    verdicts = [line for line in out.stdout.splitlines() if line.startswith(f"{claim}: ")]
    assert len(verdicts) == 1, out.stdout[-2000:]
    verdict = verdicts[0]
    assert re.search(r"\b(HELD|DID NOT HOLD) at this scale\b", verdict)
    assert len(re.findall(r"\d+\.\d+", verdict)) >= 2  # measured numbers, not just a word
    record = json.loads((d / "result.json").read_text())
    assert record["verdict"] == verdict and record["quick"] is True
    assert record["held"] == verdict.startswith(f"{claim}: HELD")
    # every variant trained through pretrain_looped.py: its own run folder with metrics.jsonl
    assert all((p / "metrics.jsonl").is_file() for p in (d / "runs").iterdir())


def test_summary_numbers_come_from_the_runs(out_dir):
    """flt_stability's residual columns are the per-loop norms the trainer logged at its last logging step."""
    d = out_dir / "flt_stability"
    if not (d / "summary.csv").is_file():
        pytest.skip("needs the flt_stability quick run")
    with open(d / "summary.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    for name, row in rows.items():
        with open(d / "runs" / name / "metrics.jsonl") as f:
            per_loop = [json.loads(line)["per_loop"] for line in f if '"per_loop"' in line][-1]
        with open(d / "runs" / name / "metrics.jsonl") as f:
            diag = [json.loads(line)["diagnostics"] for line in f if '"diagnostics"' in line][-1]
        assert float(row["input_dependence"]) == pytest.approx(diag["input_dependence"], rel=1e-4)
        first, last = (sum(v * v for v in diag["grad_norm"][i]) ** 0.5 for i in (0, -1))
        assert float(row["grad_loop1_over_loopK"]) == pytest.approx(first / last, rel=1e-4)
        res = per_loop["residual_norm"]
        assert len(res) == int(row["loops_K"])
        assert float(row["residual_norm_loop1"]) == pytest.approx(res[0], rel=1e-4)
        assert float(row["residual_growth"]) == pytest.approx(res[-1] / res[0], rel=1e-4)


def test_write_docs_renders_every_result(out_dir, tmp_path):
    have = [c for c in CLAIMS if (out_dir / c / "result.json").is_file()]
    if not have:
        pytest.skip("needs the quick runs")
    docs = tmp_path / "docs" / "reproductions.md"
    out = _run("--write-docs", "--out", str(out_dir), "--docs", str(docs))
    assert out.returncode == 0, out.stderr
    text = docs.read_text()
    for claim in CLAIMS:
        assert f"<!-- claim:{claim} -->" in text
    for claim in have:
        record = json.loads((out_dir / claim / "result.json").read_text())
        assert record["verdict"] in text and record["command"] in text
        # which code trained the runs: the commit recorded in each run's status.json, counted
        codes = [json.loads(p.read_text())["code"] for p in (out_dir / claim / "runs").glob("**/status.json")]
        assert sum(record["code"].values()) >= 1 and set(record["code"]) <= set(codes)
        assert "- Trained on megaloop commit: " + ", ".join(
            f"{sha} ({n} run{'s' if n != 1 else ''})" for sha, n in record["code"].items()) in text
        assert (tmp_path / "docs" / "reproductions" / f"{claim}.png").is_file()


def test_errors_are_one_line():
    out = _run("no_such_claim")
    assert out.returncode == 2 and "unknown claim 'no_such_claim'" in out.stderr and "Traceback" not in out.stderr
    out = _run()
    assert out.returncode == 2 and "--list" in out.stderr


def test_reuse_measures_finished_runs_without_training(out_dir):
    d = out_dir / "flt_stability"
    if not (d / "summary.csv").is_file():
        pytest.skip("needs the flt_stability quick run")
    before = (d / "summary.csv").read_text()
    logs = {p.name: (p / "train.log").stat().st_mtime_ns for p in (d / "runs").iterdir()}
    out = _run("flt_stability", "--quick", "--out", str(out_dir), "--reuse")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.count("reusing the finished run") == 3 and "training " not in out.stdout
    assert {p.name: (p / "train.log").stat().st_mtime_ns for p in (d / "runs").iterdir()} == logs
    assert (d / "summary.csv").read_text() == before


def test_seeds_each_seed_trains_and_the_verdict_needs_every_seed(tmp_path, monkeypatch):
    """--seeds: run_claim runs the claim once per seed with train.seed = that seed (runs/seed<N>/<variant>),
    summary.csv has a seed column, summary_mean.csv and the verdict show mean ± spread, and the verdict holds
    only if it holds for every seed. In-process, with a stand-in claim (no training)."""
    import types

    import megaloop.reproduce as rep
    from megaloop.reproduce.docs import write_docs
    from megaloop.reproduce.runner import ClaimResult, Context, Variant, base_config
    from megaloop.reproduce.seeds import mean_spread, parse_seeds, seeded

    seen = []

    def fake_run(ctx):
        v = Variant("a", seeded(base_config(data={"task": "mqar", "task_params": {"seed": 1}}), ctx.seed))
        seen.append((ctx.seed, v.config["train"]["seed"], v.config["data"]["task_params"]["seed"],
                     ctx.runs_dir(ctx.claim_dir("flt_stability"))))
        loss = {1234: 2.0, 1235: 3.0}[ctx.seed]
        return ClaimResult([{"variant": "a", "loops": 3, "loss": loss}], f"flt_stability: HELD at this scale: {loss}",
                           held=ctx.seed == 1234, draw=lambda fig: fig.subplots(1, 2)[0].plot([1, 2]),
                           headline={"loss": loss})

    monkeypatch.setattr(rep, "claim_module", lambda name: types.SimpleNamespace(run=fake_run, SUMMARY="s"))
    seeds = parse_seeds("1234,1235")
    ctx = Context(str(tmp_path), seeds=seeds, seed=seeds[0], verbose=False)
    record = rep.run_claim("flt_stability", ctx, "cmd")
    assert [s[:3] for s in seen] == [(1234, 1234, 1234), (1235, 1235, 1235)]
    assert seen[0][3].endswith("runs/seed1234") and seen[1][3].endswith("runs/seed1235")
    assert record["seeds"] == [1234, 1235] and record["held"] is False  # seed 1235 did not hold
    assert record["verdict"].startswith("flt_stability: DID NOT HOLD at this scale (held for seed 1234 only) (seeds: 1234, 1235")
    assert "loss 2.5 ± 0.5" in record["verdict"] and record["headline"] == {"loss": [2.0, 3.0]}
    d = tmp_path / "flt_stability"
    assert [r["seed"] for r in csv.DictReader(open(d / "summary.csv"))] == ["1234", "1235"]
    mean = list(csv.DictReader(open(d / "summary_mean.csv")))
    assert mean == [{"variant": "a", "loops": "3", "loss": "2.5 ± 0.5"}]
    assert (d / "figure.png").read_bytes()[:4] == b"\x89PNG"
    docs = tmp_path / "docs" / "reproductions.md"
    monkeypatch.setattr("megaloop.reproduce.docs.claim_module", rep.claim_module)
    text = open(write_docs({"flt_stability": record}, str(tmp_path), str(docs))).read()
    assert "- seeds: 1234, 1235" in text and "| 2.5 ± 0.5 |" in text
    assert mean_spread([1.0, float("inf")])[0] == float("inf")
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("1234,1234")


def test_bad_seeds_flag_is_one_line():
    out = _run("flt_stability", "--seeds", "12a")
    assert out.returncode == 2 and "--seeds '12a'" in out.stderr and "Traceback" not in out.stderr


def _planned_variants(claim: str, scale: str) -> list:
    """The variants a claim would train at `scale`, collected without training or building the demo corpus
    (the claim's train_variants stops the claim at its first call; the data paths are stand-ins)."""
    import megaloop.reproduce as rep
    from megaloop.reproduce.runner import Context

    class Planned(Exception):
        pass

    got = []

    def collect(ctx, claim_dir, variants):
        got.extend(variants)
        raise Planned

    mod = rep.claim_module(claim)
    data = {"data_path": ["/nonexistent/demo_text_document"], "tokenizer_type": "sentencepiece",
            "tokenizer_model": "/nonexistent/spm.model", "vocab_size": 4096, "split": "95,5,0"}
    saved = {k: getattr(mod, k) for k in ("train_variants", "demo_corpus") if hasattr(mod, k)}
    mod.train_variants = collect
    if "demo_corpus" in saved:
        mod.demo_corpus = lambda ctx: data
    try:
        mod.run(Context("/nonexistent", scale=scale, verbose=False))
    except Planned:
        pass
    finally:
        for k, v in saved.items():
            setattr(mod, k, v)
    return got


@pytest.mark.parametrize("claim", CLAIMS)
def test_gpu_scale_is_its_own_larger_setting_and_every_config_validates(claim):
    """--scale gpu has never run here: each claim's GPU-sized variant configs must validate on CPU (a config
    error must not spend device time), and none may train as its CPU variant does (a claim without GPU
    settings used to run its CPU ones under --scale gpu); the GPU runs see at least as many tokens."""
    from megaloop.reproduce.runner import resolved_config

    def shape(v):
        c = resolved_config(v.config)
        return (c.model.d_model, c.train.steps, c.train.micro_batch_size, c.data.seq_len, c.model.loops)

    cpu, gpu = (_planned_variants(claim, scale) for scale in ("cpu", "gpu"))
    assert cpu and gpu
    cpu_shapes, gpu_shapes = [shape(v) for v in cpu], [shape(v) for v in gpu]
    assert not set(gpu_shapes) & set(cpu_shapes), (claim, gpu_shapes)
    tokens = lambda shapes: sum(steps * batch * seq for _, steps, batch, seq, _ in shapes)  # noqa: E731
    assert tokens(gpu_shapes) >= tokens(cpu_shapes)


def test_test_time_compute_judges_each_exit_against_its_papers_baseline():
    """The KL exit (Huginn) is judged against the training mean R, the Q-exit (Ouro) against the first fixed
    count on the plateau; an exit of the other kind is reported but never makes the verdict; the comparison
    with the fixed-loop curve at the exit's own average loops is interpolated between counts."""
    from megaloop.reproduce.test_time_compute import _curve_verdict

    curve = {1: 0.6, 2: 0.7, 3: 0.8, 4: 0.9, 5: 0.97, 6: 0.99, 12: 1.0, 24: 1.0}  # plateau (>= 0.96) from 5
    exits = {"kl:1e-4": (5.5, 0.975), "kl:1e-3": (4.0, 0.92), "q_exit:0.1": (4.5, 0.98)}
    huginn = _curve_verdict(curve, 12, exits, ("kl", "R"))
    assert huginn["to_plateau"] == 5 and huginn["bound"] == 12
    assert huginn["ok_exits"] == ["kl:1e-4"]  # kl:1e-3 is off the plateau; the Q-exit is not this model's exit
    assert abs(huginn["vs_fixed"]["kl:1e-4"] - (0.975 - 0.98)) < 1e-9  # halfway between 0.97 and 0.99
    ouro = _curve_verdict(curve, 12, exits, ("q_exit", "fixed"))
    assert ouro["bound"] == 5 and ouro["ok_exits"] == ["q_exit:0.1"]
    assert _curve_verdict(curve, 12, {"q_exit:0.2": (5.0, 0.99)}, ("q_exit", "fixed"))["ok_exits"] == []
    assert _curve_verdict(curve, 12, {"kl:1e-5": (12.0, 1.0)}, ("kl", "R"))["ok_exits"] == []


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_lt2_mixers_trains_lt2s_loop(scale):
    """Every lt2_mixers variant is LT2's loop: the whole block looped with the zero-init per-loop residual
    gate, no input injection and no norm between loops (the reference's pre-norm block applied T times in
    succession); the outer norm is the FLT reference's baseline LT, not LT2's."""
    from megaloop.reproduce.runner import resolved_config

    variants = _planned_variants("lt2_mixers", scale)
    assert len(variants) == 8
    for v in variants:
        m = resolved_config(v.config).model
        assert (m.arch, m.injection, m.normalization, m.loop_residual_gate) == ("recurrent", "none", "inner", True), \
            v.name
