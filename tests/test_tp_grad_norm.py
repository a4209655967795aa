"""The global gradient norm at TP > 1 counts every distinct gradient element exactly once, also when kv
heads are replicated over TP ranks (1 < n_kv_heads < tp: with tp 4 and 2 kv heads, ranks 0,1 hold kv head 0
and ranks 2,3 kv head 1). With every gradient set to 1 the squared norm is the one-rank model's element
count, exactly. Checked for megaloop's own clipping (megaloop.parallel.grad_norm, fp32 ZeRO 0) and for
DeepSpeed's rule (count if `tensor_model_parallel` or model-parallel rank 0, used by its ZeRO and bf16
optimizers). Before the fix both rules skipped kv head 1 (ranks 2,3 counted only `tensor_model_parallel`
parameters, which kv-replicated weights were not)."""
import pytest
import torch

from dist_utils import run_distributed


def _counts(rank, world, n_kv):
    from deepspeed.runtime.utils import is_model_parallel_parameter
    import deepspeed.comm as dist
    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.parallel import apply_tensor_parallel
    from megaloop.parallel.grad_norm import grad_norm_, tag_for_deepspeed_norm
    from megaloop.training.distributed import build_state, init_distributed
    init_distributed()
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", f"model.n_kv_heads={n_kv}", "model.qk_norm=true",
                             f"parallel.tensor_parallel={world}", "model.injection=add"])
    torch.manual_seed(0)
    full = sum(p.numel() for p in build_model(cfg).parameters())
    st = build_state(cfg.parallel)
    torch.manual_seed(0)
    lm = build_model(cfg)
    apply_tensor_parallel(lm, st)
    tag_for_deepspeed_norm(lm, st.tp_rank)
    for p in lm.parameters():
        p.grad = torch.ones_like(p)
    ours = float(grad_norm_(lm.parameters(), 0.0, st.tp_rank, st.tp_group)) ** 2
    ds = torch.tensor([float(sum(p.numel() for p in lm.parameters()
                                 if is_model_parallel_parameter(p) or st.tp_rank == 0))], dtype=torch.float64)
    dist.all_reduce(ds, group=st.tp_group)
    return full, ours, float(ds)


@pytest.mark.parametrize("n_kv", [2, 4])
def test_tp4_grad_norm_counts_every_shard_once(n_kv):
    for full, ours, ds in run_distributed(_counts, world_size=4, args=(n_kv,), timeout=120):
        assert ours == pytest.approx(full, rel=1e-6)  # (fp32 per-tensor norms)
        assert ds == full


def test_clipping_scales_by_the_global_norm():
    from megaloop.parallel.grad_norm import grad_norm_
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    norm = grad_norm_([p], 1.5, tp_rank=0)
    assert float(norm) == pytest.approx(6.0)
    assert torch.allclose(p.grad, torch.full((4,), 3.0 * 1.5 / (6.0 + 1e-6)))
    p.grad = torch.tensor([float("nan"), 1.0, 1.0, 1.0])
    grad_norm_([p], 1.0, tp_rank=0)  # a non-finite norm leaves the gradients alone
    assert p.grad[1:].eq(1.0).all()
