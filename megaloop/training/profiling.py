"""train.profile: a torch.profiler trace of a few training steps, and a CUDA memory snapshot.

`train.profile: {start: N, steps: K, ranks: [0]}` profiles steps N .. N+K-1 (numbered as the console counts
them) on the listed global ranks. Each step is a `step N` range in the trace. When the last one ends, the
trace is written with torch.profiler's TensorBoard handler to `<output_dir>/profile/rank<R>.<...>.pt.trace.json`
(Chrome trace format: chrome://tracing or https://ui.perfetto.dev; `tensorboard --logdir <output_dir>/profile`
with the torch-tb-profiler plugin). On CUDA, with `memory_snapshot: true`, the caching allocator's history over
the same steps is written to `<output_dir>/profile/rank<R>_memory_snapshot.pickle` (drag it into
https://pytorch.org/memory_viz). Off (steps: 0, the default) nothing is created and no step pays anything.
"""
from __future__ import annotations

import os


class StepProfiler:
    def __init__(self, pcfg, out_dir: str, rank: int, console):
        from deepspeed.accelerator import get_accelerator
        self.first, self.last = pcfg.start, pcfg.start + pcfg.steps - 1
        self.dir = os.path.join(out_dir, "profile")
        self.rank, self.console = rank, console
        self.device = get_accelerator().device_name()
        self.memory = pcfg.memory_snapshot and self.device == "cuda"
        self.prof = None
        self.range = None

    @classmethod
    def from_config(cls, pcfg, out_dir: str, rank: int, console):
        """The profiler, or an object whose hooks do nothing (profiling off, or another rank)."""
        if not pcfg.steps or rank not in pcfg.ranks:
            return _Off()
        return cls(pcfg, out_dir, rank, console)

    def _activities(self):
        from torch.profiler import ProfilerActivity, supported_activities
        acts = [ProfilerActivity.CPU]
        extra = getattr(ProfilerActivity, self.device.upper(), None)  # CUDA, XPU, ... for the accelerator
        if self.device != "cpu" and extra is not None and extra in supported_activities():
            acts.append(extra)
        return acts

    def before_step(self, step: int) -> None:
        """`step`: the number of the step about to run (1-based)."""
        import torch
        if step == self.first:
            from torch.profiler import profile, tensorboard_trace_handler
            os.makedirs(self.dir, exist_ok=True)
            if self.memory:  # (no accelerator-neutral API for the allocator's history: CUDA's own)
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            self.prof = profile(activities=self._activities(), record_shapes=True, profile_memory=True,
                                on_trace_ready=tensorboard_trace_handler(self.dir, worker_name=f"rank{self.rank}"))
            self.prof.start()
        if self.prof is not None:
            self.range = torch.profiler.record_function(f"step {step}")
            self.range.__enter__()

    def after_step(self, step: int) -> None:
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        if self.prof is None or step < self.last:
            return
        self.prof.stop()  # writes the trace (on_trace_ready)
        self.prof = None
        if self.memory:
            import torch
            path = os.path.join(self.dir, f"rank{self.rank}_memory_snapshot.pickle")
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
        self.console(f"[megaloop] profiled steps {self.first}-{self.last} on rank {self.rank}: {self.dir}")

    def close(self) -> None:
        """The run ended inside the profiled steps (a stop): write what was recorded."""
        if self.prof is not None:
            self.after_step(self.last)


class _Off:
    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
