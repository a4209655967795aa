"""The trainer builds each rank's part of the model without the whole model (issue 22): the LoopedLM on the meta
device, tensor parallelism applied, then only the rank's parameters materialised (megaloop/parallel/
materialize.py) with values drawn per parameter (megaloop/model/initial_values.py).

- every tiny config: the meta build materialised equals the model built whole (same seed), parameter for
  parameter, and a different seed gives different weights;
- TP 2 on two ranks (QK-norm, one kv head: both kinds of TP gradient hooks): the materialised shards equal
  the whole build's shards and their gradients equal the whole build's after one backward (the hooks
  tensor parallelism registered on the meta parameters still run);
- host memory: rank 1 of TP 4 grows by its own share plus one buffer of the largest parameter's size, not by the
  model.
"""
import glob
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from dist_utils import run_distributed  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MIB = 1 << 20


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "yaml_configs", "tiny", "*.yaml"))),
                         ids=lambda p: os.path.basename(p)[:-5])
def test_the_meta_build_materialised_is_the_whole_build(path):
    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.parallel.materialize import materialize_all

    cfg = load_config(path)
    torch.manual_seed(11)
    whole = build_model(cfg).state_dict()
    torch.manual_seed(11)
    with torch.device("meta"):
        lm = build_model(cfg)
    assert materialize_all(lm, "cpu") == len(list(lm.parameters()))
    got = lm.state_dict()
    assert set(got) == set(whole)
    for k in whole:
        assert torch.equal(got[k], whole[k]), k
    torch.manual_seed(12)
    other = build_model(cfg).state_dict()
    assert not torch.equal(other["embedding.weight"], whole["embedding.weight"])


def _tp_grads(rank, world):
    import torch.distributed as dist

    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.parallel.apply_tp import apply_tensor_parallel
    from megaloop.parallel.comm import TPComm
    from megaloop.parallel.materialize import materialize_all

    cfg = load_config(os.path.join(ROOT, "yaml_configs", "tiny", "lt.yaml"), ["model.qk_norm=true",
                                                                              "model.n_kv_heads=1"])
    comm = TPComm(dist.group.WORLD)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    out = {}
    for mode in ("whole", "meta"):
        torch.manual_seed(3)
        if mode == "whole":
            lm = build_model(cfg)
        else:
            with torch.device("meta"):
                lm = build_model(cfg)
        apply_tensor_parallel(lm, comm)
        if mode == "meta":
            materialize_all(lm, "cpu")
        lm(x, labels=x).loss.backward()
        out[mode] = {n: (p.detach().clone(), p.grad.clone()) for n, p in lm.named_parameters()}
    bad = [n for n, (w, g) in out["whole"].items()
           if not (torch.equal(w, out["meta"][n][0]) and torch.allclose(g, out["meta"][n][1], rtol=1e-5, atol=1e-7))]
    kinds = {n: getattr(p, "tp_partition").kind for n, p in lm.named_parameters() if hasattr(p, "tp_partition")}
    return bad, sorted(set(kinds.values()))


def test_tp_shards_and_their_gradient_hooks_survive_materialisation():
    for bad, kinds in run_distributed(_tp_grads, 2, timeout=120):
        assert bad == []
        assert {"kv_replicated", "replicated_partial_grad"} <= set(kinds)


def test_a_rank_holds_its_share_not_the_model():
    from test_load_memory import _in_a_fresh_process
    anon, share, whole, largest = _in_a_fresh_process(_build_memory)
    assert share < whole / 3
    assert anon < share + largest + 4 * MIB < whole, (anon / MIB, share / MIB, largest / MIB, whole / MIB)


def _build_memory():
    from benchmarks.bench_load_memory import PeakMemory, build_rank, run_config
    from megaloop.model import LoopedLM
    cfg = run_config(512, 2, 4)
    with torch.device("meta"):
        ref = LoopedLM(cfg.model)
    whole = 4 * sum(p.numel() for p in ref.parameters())
    largest = 4 * max(p.numel() for p in ref.parameters())
    build_rank(cfg, 1, 4)  # (imports, first-call caches)
    with PeakMemory() as pm:
        lm = build_rank(cfg, 1, 4)
    return pm.anon, 4 * sum(p.numel() for p in lm.parameters()), whole, largest
