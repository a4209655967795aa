"""init.from: the weights a new run starts from (never re-applied on a resume), with init.convert_mixers'
attention -> GDN / SWA / DSA conversion when set."""
from __future__ import annotations

from megaloop.config import ConfigError


def initial_weights(cfg, rank: int = 0, world: int = 1):
    """(state dict for the full model, a note for the console), or (None, None) without init.from.
    Collective with several ranks: every rank reads the source, rank 0 alone checks its checksums first
    (train.verify_checkpoints)."""
    if not cfg.init.from_:
        return None, None
    from megaloop import checkpoint as ckpt
    from megaloop.checkpoint.convert_mixers import converted_init
    from megaloop.checkpoint.init_weights import init_state_dict
    from megaloop.checkpoint.integrity import verified_by_rank0
    try:
        verify = verified_by_rank0(cfg.init.from_, verify=cfg.train.verify_checkpoints, rank=rank, world=world)
        if cfg.init.convert_mixers:  # a function of the fresh model's state (new parts' own init)
            return converted_init(cfg.init.from_, cfg.model, cfg.init.convert_mixers, verify)
        return init_state_dict(cfg.init.from_, cfg.model, verify)
    except ckpt.CheckpointError as exc:
        raise ConfigError(str(exc)) from exc
