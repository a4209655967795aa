"""Which parameters get weight decay: not 1-D parameters (norm scales, biases, per-channel vectors), not
anything named *bias, not what the model marks with `p.no_weight_decay = True` (Parcae's A_log, dt_bias,
B, W_C; LT2's rho). Used by the optimizer's groups and by the checkpoint reader that rebuilds them."""
from __future__ import annotations

import torch


def is_no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return bool(getattr(p, "no_weight_decay", False)) or p.ndim < 2 or name.endswith("bias")
