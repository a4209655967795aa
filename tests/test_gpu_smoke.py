"""scripts/gpu_smoke.sh --tiny on CPU: the GPU smoke script's every step (data, FLT eager and compiled and
with Muon, LT2 GDN + DSA hybrid, HF export, reload + generate, the results table) with tiny shapes, so the script
the GPU users run does not rot."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("flt350m_eager", "flt350m_compile", "flt350m_muon", "lt2_hybrid")


@pytest.mark.timeout(420)
def test_gpu_smoke_tiny(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-cache"))
    env.pop("PEAK_FLOPS", None)
    out = tmp_path / "smoke"
    # from another directory: the script must find the repository itself
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), "--tiny", "--out", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=400)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "gpu_smoke: OK" in proc.stdout, text[-4000:]

    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in RUNS:
            rows[cells[0]] = cells
    assert set(rows) == set(RUNS), proc.stdout[-3000:]
    for name, (_, steps, tok_s, tflops, mfu, mem, loss, wall) in rows.items():
        assert int(steps) > 0
        assert float(tok_s.replace(",", "")) > 0, (name, tok_s)
        assert float(tflops) >= 0
        assert 0 < float(mfu) < 100, (name, mfu)  # against the nominal CPU peak the script sets
        assert 0 < float(mem) < 64, (name, mem)
        loss = float(loss)
        assert 0 < loss < 10, (name, loss)  # byte-level cross-entropy starts near ln(258) = 5.55
        assert int(wall) >= 0
    # both FLT runs start from the same seed and data: the compiled layers compute the same losses
    assert abs(float(rows["flt350m_eager"][6]) - float(rows["flt350m_compile"][6])) < 0.05
    assert re.search(r"torch\.compile speed-up \(FLT\): [\d.]+x", proc.stdout)
    assert "Muon + AdamW" in (out / "logs" / "flt350m_muon.log").read_text()
    # the artifacts the script promises
    assert (out / "lt2_hybrid" / "hf" / "config.json").is_file()
    assert (out / "flt350m_eager" / "metrics.jsonl").is_file()
    assert not (out / "flt350m_eager" / "checkpoints").exists()  # multi-GB on GPU: removed once measured
    assert "new tokens" in (out / "logs" / "generate.log").read_text()


def test_gpu_smoke_fails_loudly(tmp_path):
    """An unknown flag stops the script before any work, with a message."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), "--bogus"], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown argument '--bogus'" in proc.stderr


def test_gpu_smoke_failed_step_is_named(tmp_path):
    """A failing step stops the run with a non-zero status, naming the step and its log."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", FLT_STEPS="0")  # train.steps=0: refused
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), "--tiny", "--out", str(tmp_path / "o")],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "gpu_smoke: FAILED: step 'flt350m_eager" in proc.stderr, proc.stderr[-2000:]
    assert "train.steps" in proc.stdout + proc.stderr
    assert "gpu_smoke: OK" not in proc.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
