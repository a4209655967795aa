"""Helpers shared by the export tests: the tiny configs (yaml_configs/tiny) and models whose every parameter matters."""
from __future__ import annotations

import glob
from pathlib import Path

import torch

from megaloop.config import load_config
from megaloop.model import build_model

ROOT = Path(__file__).resolve().parents[1]
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
    from megaloop.export.inputs import unsupported_mixers

    return not unsupported_mixers(tiny_config(path).model)


EXPORTABLE_CONFIGS = [p for p in TINY_CONFIGS if hf_exportable(p)]
UNEXPORTABLE_CONFIGS = [p for p in TINY_CONFIGS if not hf_exportable(p)]
