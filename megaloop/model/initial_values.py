"""A LoopedLM's initial weights, one parameter at a time.

Each parameter is drawn from its own generator, keyed by the model's `init_seed` (one draw from torch's
global generator when the model is built: `torch.manual_seed(s)` before building still fixes the weights)
and the parameter's name. Any one parameter can therefore be drawn alone, at its full shape, and cut to a
rank's tensor-parallel shard: a model built on the meta device and materialised per shard and pipeline
stage (megaloop/parallel/materialize.py) gets exactly the weights of the same model built whole, on the
host, in one process, without any rank ever holding the whole model.

The rules (model.init_scheme; zero_init / identity_init / is_output_projection marks; model.zero_init_out):
- Linear and Embedding weights: "normal" draws N(0, init_std); "nanochat" (the FLT / nanochat reference,
  megaloop/config/recipes.py) draws the token embedding from N(0, 1), an untied head from N(0, 0.001) and
  every other matrix uniformly with std 1/sqrt(fan_in). Zero-init marks and output projections under
  zero_init_out are zeros; identity_init is the identity. Biases are zeros.
- LayerNorm: weight ones, bias zeros. Every other module owning parameters says how to initialise them
  in an `init_parameter(name, shape, generator)` method (RMSNorm, GatedDeltaNet, ParcaeInjection, the
  looped block's residual gate).
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn


def draw_init_seed() -> int:
    """The model's init seed: one draw from torch's global (host) generator."""
    return int(torch.randint(0, 2 ** 62, (), device="cpu"))


def parameter_generator(init_seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{init_seed}/{name}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def initial_value(model: nn.Module, name: str, scratch: torch.Tensor = None) -> torch.Tensor:
    """The initial value of parameter `name` of `model` (a LoopedLM as built, unsharded, on any device,
    the meta device included): an fp32 host tensor of the parameter's full shape. scratch: a flat fp32
    buffer of at least that many elements, which a weight matrix's value is drawn into (a view of it is
    returned) instead of new memory."""
    prefix, _, pname = name.rpartition(".")
    owner = model.get_submodule(prefix)
    shape = tuple(getattr(owner, pname).shape)
    g = parameter_generator(model.init_seed, name)
    if isinstance(owner, (nn.Linear, nn.Embedding)):
        if pname == "bias":
            return torch.zeros(shape)
        out = torch.empty(shape) if scratch is None else scratch[:_numel(shape)].view(shape)
        return _matrix(model, owner, out, g)
    if isinstance(owner, nn.LayerNorm):
        return torch.ones(shape) if pname == "weight" else torch.zeros(shape)
    init = getattr(owner, "init_parameter", None)
    if init is None:
        raise TypeError(f"{type(owner).__name__} (parameter {name!r}) has no init_parameter(name, shape, "
                        f"generator) method: megaloop/model/initial_values.py cannot initialise it")
    return init(pname, shape, g)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _matrix(model, module, out: torch.Tensor, g) -> torch.Tensor:
    cfg = model.cfg
    if getattr(module, "identity_init", False):
        return torch.eye(*out.shape, out=out)
    if getattr(module, "zero_init", False) or (cfg.zero_init_out and getattr(module, "is_output_projection", False)):
        return out.zero_()
    if cfg.init_scheme != "nanochat":
        return out.normal_(0.0, cfg.init_std, generator=g)
    if module is model.embedding:
        return out.normal_(0.0, 1.0, generator=g)
    if module is model.head:  # (tied: the head is the embedding's parameter, initialised as the embedding)
        return out.normal_(0.0, 0.001, generator=g)
    # uniform with bound sqrt(3) * std, so that its std is 1/sqrt(fan_in) (nanochat)
    fan_in = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
    bound = (3.0 / fan_in) ** 0.5
    return out.uniform_(-bound, bound, generator=g)


@torch.no_grad()
def initialize_parameters(model: nn.Module) -> None:
    """Give every parameter of `model` (a LoopedLM built whole) its initial value; parameters on the meta
    device are left for megaloop.parallel.materialize."""
    for name, p in model.named_parameters():
        if not p.is_meta:
            p.copy_(initial_value(model, name))
