"""Every tensor that enters a collective lives on the accelerator's device (NCCL rejects host tensors;
gloo accepts them, so CPU runs alone never showed it). tests/device_guard.py gives the CPU a shadow
"host" so that a stray `torch.tensor(...)` / `.cpu()` handed to a collective fails here as it would on a
GPU. The runs cover the trainer's own collectives: stop/NaN flags, the loss average over data
parallel, validation, the stats gathered at log steps, the self-clipping grad norm (fp32 ZeRO 0) over
pipeline stages and TP ranks, the TP RNG check, checkpoint saves, the closing sample and the training
diagnostics' TP sums and pipeline sends (train.diag_interval).
"""
import os

import pytest

from test_train_support import REPO, assert_ok, make_byte_dataset, run_ranks, tiny_config, write_config

GUARDED = os.path.join(REPO, "tests", "device_guard_run.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_byte_dataset(str(tmp_path_factory.mktemp("dd") / "corpus"), max_bytes=120_000)


def _run(tmp_path, data, world, parallel, train=None):
    t = {"steps": 3, "log_interval": 1, "eval_interval": 2, "eval_iters": 1, "save_interval": 2,
         "sample_tokens": 2}
    t.update(train or {})
    cfg = tiny_config(data, str(tmp_path / "run"), train=t, parallel=parallel,
                      loop={"sampling": "poisson", "mean": 2, "min": 1, "max": 3})
    path = write_config(str(tmp_path / "cfg.yaml"), cfg)
    results = run_ranks(world, ["--config", path], timeout=240, script=GUARDED)
    text = "\n".join(out for _, out in results)
    assert "device discipline" not in text, text[-6000:]
    assert_ok(results)
    return text


def test_guard_catches_a_host_tensor_in_a_collective():
    """The guard itself: a factory call without device= from project code is a host tensor."""
    from dist_utils import run_distributed
    assert run_distributed(_guard_probe, world_size=1, timeout=60) == ["caught"]


def _guard_probe(rank, world):
    import torch
    import deepspeed.comm as dist
    import device_guard
    device_guard.install()
    from deepspeed.accelerator import get_accelerator
    from megaloop.training.distributed import init_distributed
    init_distributed()
    ok = torch.zeros(2, device=get_accelerator().current_device_name())
    dist.all_reduce(ok)  # on the accelerator's device: passes
    # A stray host tensor, made in "project code": compile a snippet whose filename is in megaloop/.
    code = compile("import torch\nflags = torch.tensor([1.0, 0.0])\n",
                   os.path.join(REPO, "megaloop", "_probe.py"), "exec")
    scope = {}
    exec(code, scope)
    try:
        dist.all_reduce(scope["flags"])
    except device_guard.DeviceDisciplineError:
        pass
    else:
        return "missed"
    try:
        dist.all_reduce(ok.cpu())
    except device_guard.DeviceDisciplineError:
        return "caught"
    return "missed .cpu()"


def test_data_parallel_and_pipeline_collectives_on_device(tmp_path, data):
    # PP 2 x DP 2 (4 ranks), ZeRO 1, bf16 (torch.autocast): loss average over DP, stats, flags, eval
    # through the pipe engine; the training diagnostics at step 2 (their point-to-point sends between
    # the stages and to the logging rank).
    text = _run(tmp_path, data, 4, {"pipeline_parallel": 2, "zero_stage": 1},
                train={"sample_tokens": 0, "precision": "bf16", "diag_interval": 2})
    from test_train_support import metrics
    assert [r["step"] for r in metrics(str(tmp_path / "run")) if "diagnostics" in r] == [2], text[-3000:]


def test_tensor_parallel_self_clip_collectives_on_device(tmp_path, data):
    # TP 2, fp32 ZeRO 0: the trainer clips itself (grad-norm all-reduce over TP), RNG check, sample,
    # the training diagnostics at step 2 (their TP sums; forward-mode AD through the TP operators).
    text = _run(tmp_path, data, 2, {"tensor_parallel": 2, "zero_stage": 0}, train={"grad_clip": 0.5, "diag_interval": 2})
    from test_train_support import metrics
    assert [r["step"] for r in metrics(str(tmp_path / "run")) if "diagnostics" in r] == [2], text[-3000:]
