"""Input checks shared by every backend: clear ValueError/TypeError naming the argument."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # every dtype the ops take


def _tensor(name: str, t, dtype=None, device=None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATING:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {dtype}; they must match")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; they must be on the same device")
    return t


def _shape(name: str, t: Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} ({meaning}), got {tuple(t.shape)}")


def as_matrix(name: str, weight) -> Tensor:
    """A 1x1 conv weight (out, in, 1, 1) or a matrix (out, in) -> (out, in)."""
    if isinstance(weight, Tensor) and weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.flatten(1)
    if isinstance(weight, Tensor) and weight.dim() != 2:
        raise ValueError(f"{name} must be a (out, in) matrix or a 1x1 conv weight (out, in, 1, 1), "
                         f"got shape {tuple(weight.shape)}")
    return weight


def check_attention(
    x, wq, bq: Optional[Tensor], wk, bk: Optional[Tensor], wv, bv: Optional[Tensor], wo: Optional[Tensor], gamma,
    pool: bool,
) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (batch, channels, height, width) tensor, got shape {tuple(x.shape)}")
    _tensor("x", x)
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if pool and (h < 2 or w < 2):
        raise ValueError(f"the pooled (biggan) variant needs height and width >= 2, got {h} x {w}")
    named = dict(query_weight=wq, key_weight=wk, value_weight=wv)
    for name, t in named.items():
        _tensor(name, t, x.dtype, x.device)
        if t.dim() != 2 or t.shape[1] != c:
            raise ValueError(f"{name} must have shape (out_channels, {c}) for x with {c} channels, "
                             f"got {tuple(t.shape)}")
    dk, dv = wq.shape[0], wv.shape[0]
    _shape("key_weight", wk, (dk, c), "same query/key channels as query_weight")
    if wo is None and dv != c:
        raise ValueError(f"value_weight must have {c} output channels when there is no out_weight (the residual adds "
                         f"it to x), got {dv}")
    if wo is not None:
        _shape("out_weight", _tensor("out_weight", wo, x.dtype, x.device), (c, dv), "value channels -> x channels")
    for name, t, n in (("query_bias", bq, dk), ("key_bias", bk, dk), ("value_bias", bv, dv)):
        if t is not None:
            _shape(name, _tensor(name, t, x.dtype, x.device), (n,), "one per output channel")
    _tensor("gamma", gamma, device=x.device)
    if gamma.numel() != 1:
        raise ValueError(f"gamma must hold a single value, got shape {tuple(gamma.shape)}")


def check_spectral_norm(weight, u, v, dim: int, n_power_iterations: int, eps: float) -> tuple[int, int]:
    """Returns the (h, w) of the matrix view."""
    _tensor("weight", weight)
    if weight.dim() < 1 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty tensor of rank >= 1, got shape {tuple(weight.shape)}")
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"dim must be in [{-weight.dim()}, {weight.dim()}) for a rank-{weight.dim()} weight, "
                         f"got {dim}")
    h = weight.shape[dim]
    w = weight.numel() // h
    for name, t, n in (("u", u, h), ("v", v, w)):
        _tensor(name, t, weight.dtype, weight.device)
        _shape(name, t, (n,), f"the weight viewed as a {h} x {w} matrix")
    if not isinstance(n_power_iterations, int) or n_power_iterations < 0:
        raise ValueError(f"n_power_iterations must be a non-negative int, got {n_power_iterations!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    return h, w
