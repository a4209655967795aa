"""Fused kernels picked at startup: RMSNorm from NVIDIA Apex when it is importable and runs on the
tensors' device, else PyTorch's own.

    rms_norm_affine(x, weight, eps)   RMSNorm(x) * weight over the last dim (weight may be None)

Backends, chosen once per (device type, dtype, weight dtype), cached, and logged once:

  apex       `apex.normalization.fused_layer_norm.fused_rms_norm_affine` (`fused_rms_norm` without a
             weight), on CUDA tensors whose weight has the input's dtype (fp32/fp16/bf16). Needs Apex
             built with its CUDA extensions (`fused_layer_norm_cuda`); a pure-Python Apex install
             imports but has no kernels, and is not used. Probed once (a tiny forward+backward checked
             against `reference`); a failure means one ApexFallbackWarning and the torch backend.
             Apex is optional and never installed by megaloop (PyPI's `apex` is an unrelated project).
  torch      `torch.nn.functional.rms_norm` (torch >= 2.4) for fp32/fp16/bf16 inputs whose weight, if
             any, has the same dtype: one kernel on CUDA in recent torch, Inductor-fusable.
  reference  megaloop's original formula, for everything else (float64, mixed input/weight dtypes):
             (x.float() * rsqrt(mean(x.float()^2) + eps)).type_as(x) * weight.

Numerics. All three compute the statistic and the normalisation in float32 for half/bfloat16 inputs
(the original code's upcast). For float32 inputs `torch` equals `reference` bit for bit. For a
half/bfloat16 weight, `apex` and recent `torch` multiply by the weight in float32 and round once,
where `reference` rounds the normalised x first and multiplies in half precision: they differ by at
most one unit in the last place of the output dtype. Inside a compiled region (train.compile) the
torch backend is always used, so Inductor fuses the norm with its neighbours.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["ApexFallbackWarning", "apex_device_supported", "describe_norm_choice", "reset_norm_cache",
           "rms_norm_affine", "rms_norm_reference", "select_rms_norm"]

logger = logging.getLogger(__name__)

_FUSABLE = (torch.float32, torch.float16, torch.bfloat16)


class ApexFallbackWarning(UserWarning):
    """Apex imports but its fused RMSNorm failed on this device/dtype; torch's is used instead."""


def rms_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return y * weight if weight is not None else y


def _torch_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def apex_device_supported(device: torch.device) -> Optional[str]:
    """None when Apex's fused kernels may run on this device, else why not (tests monkeypatch this)."""
    return None if device.type == "cuda" else f"Apex's fused kernels are CUDA-only, not {device.type}"


def _load_apex():
    """(affine, plain) fused RMSNorm functions, or raise saying why Apex cannot provide them."""
    from apex.normalization.fused_layer_norm import fused_rms_norm, fused_rms_norm_affine

    importlib.import_module("fused_layer_norm_cuda")  # the compiled kernels; absent in Python-only builds

    def run(x, weight, eps):
        shape = (x.shape[-1],)
        return fused_rms_norm(x, shape, eps) if weight is None else fused_rms_norm_affine(x, weight, shape, eps)
    return run


def _probe(run: Callable, device: torch.device, dtype: torch.dtype, with_weight: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=gen) * 3).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(device=device, dtype=dtype) if with_weight else None
    g_out = torch.randn(3, 5, 64, generator=gen).to(device)

    def forward_backward(fn, x, w):
        x = x.detach().clone().requires_grad_(True)
        w = w.detach().clone().requires_grad_(True) if w is not None else None
        y = fn(x, w, 1e-6)
        (y.float() * g_out).sum().backward()
        return [y.detach().float(), x.grad.float()] + ([w.grad.float()] if w is not None else [])

    with torch.enable_grad():
        got = forward_backward(run, x, w)
        want = forward_backward(rms_norm_reference, x.float(), w.float() if w is not None else None)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("output", "input grad", "weight grad"), got, want):
        err = ((a - b).norm() / b.norm().clamp_min(1e-6)).item()
        if not err <= tol:
            raise RuntimeError(f"{name} disagrees with the reference RMSNorm (relative error {err:.3g} > {tol})")


_IMPLS: Dict[tuple, Callable] = {}
_NAMES: Dict[tuple, str] = {}
_WARNED: set = set()


def reset_norm_cache() -> None:
    """Forget the cached choices and emitted warnings (tests; or after installing Apex mid-process)."""
    _IMPLS.clear()
    _NAMES.clear()
    _WARNED.clear()


def _why_not_torch(dtype: torch.dtype, weight_dtype: Optional[torch.dtype]) -> Optional[str]:
    if not hasattr(F, "rms_norm"):
        return "torch.nn.functional.rms_norm needs torch >= 2.4"
    if dtype not in _FUSABLE:
        return f"{str(dtype).replace('torch.', '')} keeps the original formula"
    if weight_dtype is not None and weight_dtype != dtype:
        return "input and weight dtypes differ"
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@torch.compiler.disable  # the probe runs eagerly, also when first reached inside a compiled layer
def _resolve(device: torch.device, dtype: torch.dtype, weight_dtype: Optional[torch.dtype]) -> tuple:
    where = f"{device.type}/{str(dtype).replace('torch.', '')}"
    why_not_torch = _why_not_torch(dtype, weight_dtype)
    if why_not_torch is not None:
        return rms_norm_reference, f"reference formula ({why_not_torch})"
    why_not_apex = apex_device_supported(device)
    if why_not_apex is None:
        try:
            run = _load_apex()
        except Exception as exc:  # noqa: BLE001 -- not installed, or installed without its CUDA extensions
            why_not_apex = f"NVIDIA Apex not importable: {_one_line(exc)}"
        else:
            try:
                _probe(run, device, dtype, weight_dtype is not None)
                return run, "NVIDIA Apex fused_rms_norm_affine"
            except Exception as exc:  # noqa: BLE001
                why_not_apex = f"NVIDIA Apex failed on {where}: {_one_line(exc)}"
                if why_not_apex not in _WARNED:
                    _WARNED.add(why_not_apex)
                    warnings.warn(f"RMSNorm: {why_not_apex}; using torch.nn.functional.rms_norm",
                                  ApexFallbackWarning, stacklevel=3)
    return _torch_rms_norm, f"torch.nn.functional.rms_norm ({why_not_apex})"


def select_rms_norm(device, dtype: torch.dtype, weight_dtype: Optional[torch.dtype]) -> str:
    """The backend `rms_norm_affine` uses for these tensors, described in words (probes on first use)."""
    device = torch.device(device)
    key = (device.type, dtype, weight_dtype)
    if key not in _NAMES:
        impl, name = _resolve(device, dtype, weight_dtype)
        _IMPLS[key], _NAMES[key] = impl, name
        logger.info("RMSNorm kernel on %s/%s: %s", device.type, str(dtype).replace("torch.", ""), name)
    return _NAMES[key]


def rms_norm_affine(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim times `weight` (None: parameter-free), by the selected backend."""
    if torch.compiler.is_compiling():
        if _why_not_torch(x.dtype, None if weight is None else weight.dtype) is None:
            return _torch_rms_norm(x, weight, eps)
        return rms_norm_reference(x, weight, eps)
    key = (x.device.type, x.dtype, None if weight is None else weight.dtype)
    impl = _IMPLS.get(key)
    if impl is None:
        select_rms_norm(x.device, x.dtype, key[2])
        impl = _IMPLS[key]
    return impl(x, weight, eps)


def describe_norm_choice(device, dtype, weight: bool = True) -> str:
    """One line naming the RMSNorm kernel for this device and compute dtype ("bf16" / torch.bfloat16),
    for the trainer to log once at startup. Runs the selection (and Apex's probe) now."""
    if not isinstance(dtype, torch.dtype):
        from megaloop.ops.gated_delta import _as_dtype

        dtype = _as_dtype(dtype)
    device = torch.device(device)
    name = select_rms_norm(device, dtype, dtype if weight else None)
    return f"RMSNorm kernel: {name} on {device}/{str(dtype).replace('torch.', '')}"
