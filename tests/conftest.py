import os

# One thread per process: the suite runs on 2 cores, often with several ranks at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_sessionstart(session):
    """Build DeepSpeed's CPU shared-memory comm op (JIT-compiled at every first `init_distributed` on CPU)
    once, here, before any test: built by a rank inside a timed multi-rank test, a slow compile can run past
    that test's timeout, and the killed rank then leaves torch's build lock behind, which hangs every later
    multi-rank test until its own timeout."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    if get_accelerator().device_name() == "cpu":
        build_shm_op()


# DeepSpeed's CPU shared-memory comm leaves its buffers (/dev/shm/deepspeed_allreduce_buffer_*, ~70 MB per
# rank group) behind when a rank is killed, which many tests do on purpose (hung and dead ranks, timeouts):
# ~1.4 GB per suite run, until /dev/shm (RAM) fills and the kernel kills a test. The session removes the
# buffers it created that no live process still maps.
_SHM_GLOB = "/dev/shm/deepspeed_allreduce_buffer_*"
_shm_before = set()


def _mapped_shm_paths() -> set:
    paths = set()
    for maps in __import__("glob").glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                paths.update(line.split(None, 5)[-1].strip() for line in f if "deepspeed_allreduce_buffer" in line)
        except OSError:  # (a process that ended meanwhile, or one we may not read)
            pass
    return {p.replace(" (deleted)", "") for p in paths}


def pytest_configure(config):
    import glob
    _shm_before.update(glob.glob(_SHM_GLOB))


def pytest_unconfigure(config):
    import glob
    leaked = set(glob.glob(_SHM_GLOB)) - _shm_before
    if leaked:
        in_use = _mapped_shm_paths()
        for path in leaked - in_use:
            try:
                os.remove(path)
            except OSError:
                pass
