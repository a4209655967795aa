"""benchmarks/bench_mixers_ops.py on an accelerator (issue 24's mixer figures): kernels run asynchronously there,
so every timed forward+backward must end with a device synchronize (else the figure is the launch time) and the
memory column must be the device allocator's peak, not host RSS. Checked on CPU with a stand-in accelerator
that records what the worker asks of it; the GDN row names the kernel the training dispatcher took."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mixers_ops", os.path.join(REPO, "benchmarks",
                                                                                   "bench_mixers_ops.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class RecordingAccelerator:
    """What DeepSpeed's accelerator offers the worker, recording the calls (memory: 3 MiB above the start)."""

    def __init__(self):
        self.calls = []

    def synchronize(self):
        self.calls.append("sync")

    def memory_allocated(self):
        return 1000

    def reset_peak_memory_stats(self):
        self.calls.append("reset")

    def max_memory_allocated(self):
        return 1000 + 3 * 2**20


def test_timed_passes_on_an_accelerator_are_synchronized_and_memory_is_the_allocators_peak(bench, monkeypatch):
    acc = RecordingAccelerator()
    monkeypatch.setattr(bench, "accelerator_for", lambda device: acc)
    args = bench.parse_args(["--reps", "2", "--measure", "time"])
    r = bench.run_worker("gdn", 128, args)
    # small set-up pass, warm-up pass, then per timed pass a sync before the clock and one after backward
    assert acc.calls == ["sync", "sync"] + ["sync", "sync"] * 2
    assert r["time_ms"] > 0 and r["kernel"] == "torch"  # CPU: the dispatcher's eager chunked form
    acc.calls.clear()
    args = bench.parse_args(["--measure", "memory"])
    r = bench.run_worker("softmax", 128, args)
    assert "reset" in acc.calls and r["peak_mb"] == pytest.approx(3.0) and "kernel" not in r
    assert r["saved_mb"] > 0


def test_a_device_that_is_not_the_accelerators_is_refused_in_one_line(bench):
    with pytest.raises(SystemExit, match="--device cuda: DeepSpeed's accelerator is 'cpu'"):
        bench.accelerator_for("cuda")
    assert bench.accelerator_for("cpu") is None
