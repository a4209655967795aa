"""What skipping non-finite steps costs on the ZeRO-0 path (megaloop/training/nonfinite.py): one AdamW step
of a model-sized parameter list, with and without megaloop's grad-norm + skip hooks.

    python benchmarks/bench_nonfinite_skip.py [--params 50e6] [--tensors 200] [--iters 20]

Rows: the AdamW kernel (fused / foreach) x (no hook | megaloop's norm + skip hook). With the hook, the
fused kernel takes the skip flag on the device (`found_inf`, no host sync); foreach reads the flag on the
host once per step. On a GPU the difference between the two "hook" rows is the price of that read (the
stall of the host waiting for the queued kernels), which the fused default (`optimizer_impl: auto` on
CUDA) avoids; the "no hook" rows are what DeepSpeed's own steps cost without the check.

Measured: no reliable figure yet. On the 2-core CPU machine this was written on (load average ~20 from
other jobs), `--params 5e6 --tensors 50 --iters 10` gave e.g. fused 55 / 62 ms, foreach 307 / 412 ms
(no hook / hook), with the same row varying 2-8x between runs: noise, not the hook. Not yet measured on
a GPU (no device was lent to this task); that is the figure that matters (the host read's stall).
"""
import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def bench(kernel: str, hook: bool, params: int, tensors: int, iters: int, device: str) -> float:
    from megaloop.parallel.grad_norm import grad_norm_
    from megaloop.training.nonfinite import SkipNonFinite
    n = params // tensors
    ps = [torch.nn.Parameter(torch.randn(n, device=device) * 0.02) for _ in range(tensors)]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(ps, lr=1e-4, fused=kernel == "fused", foreach=None if kernel == "fused" else True)
    if hook:
        clip = SimpleNamespace(last_norm=None)
        opt.register_step_pre_hook(lambda o, a, k: setattr(clip, "last_norm", grad_norm_(ps, 1.0, 0)))
        opt.register_step_pre_hook(SkipNonFinite(clip))

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    for _ in range(3):
        opt.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        opt.step()
    sync()
    return (time.perf_counter() - t0) / iters * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=50e6)
    p.add_argument("--tensors", type=int, default=200)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, {int(args.params):,} parameters in {args.tensors} tensors; ms per AdamW step")
    for kernel in ("fused", "foreach"):
        row = [f"{bench(kernel, hook, int(args.params), args.tensors, args.iters, device):.1f}" for hook in (False, True)]
        print(f"{kernel:8s} no hook {row[0]} | norm + skip hook {row[1]}")


if __name__ == "__main__":
    main()
