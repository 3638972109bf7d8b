"""Prediction kinds and exact conversions between them, given ``x_t = alpha x0 + sigma eps``.

- ``x0``: the clean sample.
- ``epsilon``: the noise.
- ``v``: ``alpha eps - sigma x0`` (Salimans & Ho; for VP schedules where alpha^2 + sigma^2 = 1).
- ``flow``: the rectified-flow velocity ``eps - x0`` (d x_t / d sigma for ``alpha = 1 - sigma``).

Conversions are computed in float64 (as the DMD2 reference does for epsilon -> x0) and returned in the input
dtype.
"""

from __future__ import annotations

from typing import Literal

import torch

from .schedules import _bcast

Tensor = torch.Tensor
Prediction = Literal["epsilon", "v", "x0", "flow"]
PREDICTIONS = ("epsilon", "v", "x0", "flow")


def check_prediction(kind: str) -> str:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction kind {kind!r}; allowed: {', '.join(PREDICTIONS)}")
    return kind


def _ab(alpha, sigma, x: Tensor) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if a.ndim == 0:
        a = a.expand(x.shape[0])
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return _bcast(a, x), _bcast(s, x)


def to_x0_eps(pred: Tensor, kind: str, x_t: Tensor, alpha, sigma) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a prediction of the given kind at (x_t, alpha, sigma)."""
    check_prediction(kind)
    a, s = _ab(alpha, sigma, x_t)
    p, x = pred.double(), x_t.double()
    if kind == "x0":
        x0 = p
        eps = (x - a * x0) / s
    elif kind == "epsilon":
        eps = p
        x0 = (x - s * eps) / a
    elif kind == "v":
        x0 = (a * x - s * p) / (a * a + s * s)
        eps = (s * x + a * p) / (a * a + s * s)
    else:  # flow: u = eps - x0
        x0 = (x - s * p) / (a + s)
        eps = x0 + p
    return x0.to(pred.dtype), eps.to(pred.dtype)


def to_x0(pred: Tensor, kind: str, x_t: Tensor, alpha, sigma) -> Tensor:
    """x0 implied by a prediction; for ``x0`` kind, the prediction itself (no division by sigma)."""
    if kind == "x0":
        return pred
    return to_x0_eps(pred, kind, x_t, alpha, sigma)[0]


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, alpha, sigma) -> Tensor:
    """The prediction target of the given kind for a known (x0, eps) pair."""
    check_prediction(kind)
    a, s = _ab(alpha, sigma, x0)
    if kind == "x0":
        return x0
    if kind == "epsilon":
        return eps
    if kind == "v":
        return (a * eps.double() - s * x0.double()).to(x0.dtype)
    return eps - x0


def convert(pred: Tensor, src: str, dst: str, x_t: Tensor, alpha, sigma) -> Tensor:
    """Convert a prediction of kind ``src`` to kind ``dst`` at the same (x_t, alpha, sigma)."""
    if src == dst:
        check_prediction(src)
        return pred
    x0, eps = to_x0_eps(pred, src, x_t, alpha, sigma)
    return from_x0_eps(x0, eps, dst, alpha, sigma)
