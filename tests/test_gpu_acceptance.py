"""scripts/gpu_acceptance.sh (issue 24's one prepared GPU run): its plumbing on CPU with the fastest part (the
planner, meta device): each part logged, bounded and summarised; a bad part name is one line before any
work. The GPU parts themselves run in tests/test_gpu_smoke.py (--tiny) and the benchmarks' own tests."""
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_acceptance.sh")


def test_the_plan_part_runs_logs_and_is_summarised(tmp_path):
    out = subprocess.run(["bash", SCRIPT, "--tiny", "--parts", "plan", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    for ac in ("loop", "none"):
        log = (tmp_path / f"plan_ac_{ac}.log").read_text()
        assert "336.4M parameters" in log and f"activation checkpointing {ac}" in log
        assert f"plan_ac_{ac}: ok" in out.stdout
    assert "== summary" in out.stdout and "DeepSpeed" in out.stdout


def test_an_unknown_part_is_refused_in_one_line(tmp_path):
    out = subprocess.run(["bash", SCRIPT, "--parts", "smoke,bogus", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown part 'bogus'" in out.stderr and not list(tmp_path.iterdir())
