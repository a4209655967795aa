"""Input injection ("recall"): how the looped state s receives the input embedding e each loop.

  none            s                         (plain whole-stack loop)
  add             s + e                     (transition's spectral radius exactly 1: marginal)
  concat_adapter  W [s; e],  W: 2d -> d     (Huginn; unconstrained)
  parcae          Abar * s + Bbar e         (Parcae: diagonal, max|Abar| < 1 for any parameters)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaloop.config import ModelConfig


def _no_decay(p: nn.Parameter) -> nn.Parameter:
    p.no_weight_decay = True  # read by the optimizer's parameter grouping
    return p


class AddInjection(nn.Module):
    def forward(self, s, e):
        return s + e


class ConcatAdapterInjection(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.adapter = nn.Linear(2 * d, d, bias=False)

    def forward(self, s, e):
        return self.adapter(torch.cat([s, e], dim=-1))


class ParcaeInjection(nn.Module):
    """u = Abar * s + Bbar e with Abar = exp(-Delta * A), A = exp(A_log) > 0, Delta = softplus(dt_bias),
    Bbar = Delta * B (rows of B scaled by Delta). Since Delta > 0 and A > 0, 0 < Abar < 1 always."""

    def __init__(self, d: int, init_decay: float):
        super().__init__()
        # At init A = 1 and exp(-Delta) = init_decay, i.e. Delta = -ln(init_decay).
        delta0 = -math.log(init_decay)
        dt0 = math.log(math.expm1(delta0))  # softplus^-1
        self.dt0 = dt0
        self.A_log = _no_decay(nn.Parameter(torch.zeros(d)))
        self.dt_bias = _no_decay(nn.Parameter(torch.full((d,), dt0)))
        self.B = _no_decay(nn.Parameter(torch.eye(d)))

    def init_parameter(self, name: str, shape, generator) -> torch.Tensor:
        """A = 1 (A_log = 0), Delta = -ln(init_decay), B = I (megaloop/model/initial_values.py)."""
        return {"A_log": lambda: torch.zeros(shape), "dt_bias": lambda: torch.full(shape, self.dt0),
                "B": lambda: torch.eye(*shape)}[name]()

    def coefficients(self):
        delta = F.softplus(self.dt_bias.float())
        # Mathematically 0 < Abar < 1 for any parameters; in fp32, exp(-x) rounds to exactly 1 once
        # x < 6e-8. The floor keeps the guarantee numerically true: max|Abar| <= exp(-1e-6).
        a_bar = torch.exp(-(delta * torch.exp(self.A_log.float())).clamp_min(1e-6))
        return a_bar, delta

    def forward(self, s, e):
        # The whole update in fp32 (autocast off, as in the reference), rounded once to the state's dtype:
        # Abar is applied as the fp32 value spectral_norm() reports (cast to bf16 first, every channel
        # with Delta*A < 2^-9 got Abar = 1.0 exactly). Under the bf16 recipe `autocast` the loop state is
        # fp32 and the contraction is exact. A bf16 state (bf16 weights: bf16_impl=master_weights, fp16,
        # an exported model cast to bf16) cannot hold a contraction finer than its own rounding: with
        # 1 - Abar < 2^-9, round(Abar * h) = h.
        a_bar, delta = self.coefficients()
        with torch.autocast(s.device.type, enabled=False):
            u = a_bar * s.float() + delta * F.linear(e.float(), self.B.float())
        return u.to(s.dtype)

    def spectral_norm(self) -> torch.Tensor:
        """Largest |eigenvalue| of the (diagonal) state transition: max |Abar|."""
        return self.coefficients()[0].abs().max()


def build_injection(cfg: ModelConfig) -> nn.Module:
    if cfg.injection == "add":
        return AddInjection()
    if cfg.injection == "concat_adapter":
        return ConcatAdapterInjection(cfg.d_model)
    if cfg.injection == "parcae":
        return ParcaeInjection(cfg.d_model, cfg.parcae_init_decay)
    return None
