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
