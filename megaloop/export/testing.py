"""Helpers shared by the export tests and tools: tiny models whose every parameter matters."""
from __future__ import annotations

import contextlib
import glob
from pathlib import Path

import torch

from megaloop.config import load_config
from megaloop.model import build_model

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIGS = sorted(glob.glob(str(ROOT / "yaml_configs/tiny/*.yaml")))


def tiny_config(name_or_path, overrides=None):
    path = Path(name_or_path)
    if not path.suffix:
        path = ROOT / "yaml_configs/tiny" / f"{name_or_path}.yaml"
    return load_config(path, overrides)


def perturbed_model(cfg, seed: int = 0, scale: float = 0.05):
    """build_model(cfg) in eval mode with every parameter nudged off its init, so zero-init gates, the
    identity Parcae B / W_C and unit norm scales all take part in the comparison."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def hf_exportable(path) -> bool:
    """Whether the HF modeling file implements every token mixer of this tiny config."""
    from megaloop.export.hf_export import unsupported_mixers

    return not unsupported_mixers(tiny_config(path).model)


EXPORTABLE_CONFIGS = [p for p in TINY_CONFIGS if hf_exportable(p)]
UNEXPORTABLE_CONFIGS = [p for p in TINY_CONFIGS if not hf_exportable(p)]


def _stable_select_topk_keys(index_scores: torch.Tensor, topk: int):
    """megaloop.ops.select_topk_keys with ties broken towards the earlier key (a stable sort)."""
    B, T, _ = index_scores.shape
    t = torch.arange(T, device=index_scores.device)
    scores = index_scores.detach().masked_fill(t[None, :] > t[:, None], float("-inf"))
    indices = scores.sort(dim=-1, descending=True, stable=True).indices[..., :min(topk, T)]
    return indices, indices <= t[None, :, None]


@contextlib.contextmanager
def deterministic_dsa_topk():
    """Run megaloop's DSA with its top-k ties broken towards the earlier key, as the exported model does.

    The lightning indexer's ReLU makes exact ties (scores of 0.0) common, and torch.topk breaks ties
    differently for rows of different lengths, so megaloop's selection for a query can depend on how
    many tokens follow it. The exported model needs a length-independent rule (a cached decode step
    sees a shorter row than the full forward); this makes megaloop use the same one, so that the two
    can be compared exactly. A no-op for models without DSA layers."""
    import megaloop.model.sparse_attention as sa
    from megaloop.ops.sparse_attention import lightning_indexer_scores

    @torch.no_grad()
    def topk(q_idx, k_idx, w, topk, query_block_size: int = 256):
        return _stable_select_topk_keys(lightning_indexer_scores(q_idx, k_idx, w, query_block_size), topk)

    saved = sa.lightning_indexer_topk, sa.select_topk_keys
    sa.lightning_indexer_topk, sa.select_topk_keys = topk, _stable_select_topk_keys
    try:
        yield
    finally:
        sa.lightning_indexer_topk, sa.select_topk_keys = saved
