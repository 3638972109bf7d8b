"""Exact Gaussian mixtures: isotropic mixtures whose denoiser E[x0 | x_t] is exact for every schedule.

For ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x_t = alpha x0 + sigma eps``:
``x_t | k ~ N(alpha mu_k, v_k I)`` with ``v_k = alpha^2 s_k^2 + sigma^2``, and
``E[x0 | x_t, k] = mu_k + (alpha s_k^2 / v_k)(x_t - alpha mu_k)``; the posterior over k is
``r_k ∝ w_k N(x_t; alpha mu_k, v_k I)``.  Conditioning on a label k restricts the mixture to component k; the null
label (= number of components) keeps the whole mixture, so classifier-free guidance is well defined.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .denoiser import Cond, Denoiser
from .schedules import Schedule, _as_batch

Tensor = torch.Tensor


def _ring(n: int, radius: float) -> list[list[float]]:
    return [[radius * math.cos(2 * math.pi * i / n), radius * math.sin(2 * math.pi * i / n)] for i in range(n)]


BUILTIN_MIXTURES: dict[str, dict] = {
    "ring8": {"means": _ring(8, 2.0), "weights": [1 / 8] * 8, "std": 0.1,
              "about": "8 equal Gaussians on a circle of radius 2, std 0.1"},
    "grid25": {"means": [[float(i), float(j)] for i in range(-2, 3) for j in range(-2, 3)], "weights": [1 / 25] * 25,
               "std": 0.1, "about": "5x5 grid of equal Gaussians, spacing 1, std 0.1"},
    "unequal": {"means": _ring(5, 2.0), "weights": [0.5, 0.2, 0.15, 0.1, 0.05], "std": 0.15,
                "about": "5 Gaussians on a circle of radius 2 with weights 0.5/0.2/0.15/0.1/0.05, std 0.15"},
    # No symmetry to lean on: modes at uneven distances from the origin and from each other, weights 8:1 from the
    # largest to the smallest, two different widths.
    "scatter7": {"means": [[0.0, 0.0], [2.2, 0.4], [-1.6, 1.7], [0.5, -2.3], [-2.4, -1.2], [1.3, 2.4], [2.6, -1.9]],
                 "weights": [0.32, 0.2, 0.14, 0.11, 0.09, 0.08, 0.06], "std": [0.15, 0.12, 0.15, 0.12, 0.15, 0.12, 0.12],
                 "about": "7 Gaussians scattered without symmetry (one at the origin), weights 0.32 down to 0.06, "
                          "std 0.12-0.15"},
}


class GaussianMixture(nn.Module):
    """An isotropic Gaussian mixture in any dimension (means [K, D], weights [K], std [K])."""

    def __init__(self, means, weights, std):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be a [K, D] array, got shape {tuple(means.shape)}")
        K = means.shape[0]
        weights = torch.as_tensor(weights, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        if std.ndim == 0:
            std = std.expand(K).clone()
        if weights.shape != (K,) or std.shape != (K,):
            raise ValueError(f"weights and std must have {K} entries (one per mean), got {tuple(weights.shape)} "
                             f"and {tuple(std.shape)}")
        if (weights < 0).any() or weights.sum() <= 0 or (std <= 0).any():
            raise ValueError("weights must be >= 0 with a positive sum, and std > 0")
        self.register_buffer("means", means)
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("std", std)
        self.feature_layers: tuple[str, ...] = ()

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to_spec(self) -> dict:
        return {"means": self.means.tolist(), "weights": self.weights.tolist(), "std": self.std.tolist()}

    def null_cond(self, cond: Cond) -> Cond:
        if cond is None:
            return None
        return {"labels": torch.full_like(cond["labels"], self.num_components)}

    def sample(self, n: int, generator: torch.Generator | None = None, labels: Tensor | None = None):
        """Exact samples and their component labels."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.std[labels, None] * eps
        return x.float(), labels

    def log_resp(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Log posterior component weights [B, K] (unnormalised) and the variances v_k [B, K]."""
        x = x_t.double()
        a, s = alpha.double()[:, None], sigma.double()[:, None]
        v = a**2 * self.std[None] ** 2 + s**2  # [B, K]
        d2 = ((x[:, None, :] - a[:, :, None] * self.means[None]) ** 2).sum(-1)  # [B, K]
        logp = torch.log(self.weights)[None] - 0.5 * d2 / v - 0.5 * self.dim * torch.log(2 * math.pi * v)
        return logp, v

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """E[x0 | x_t] in closed form (restricted to component ``labels[i]`` where it is below K)."""
        logp, v = self.log_resp(x_t, alpha, sigma)
        if labels is not None:
            K = self.num_components
            keep = (labels[:, None] == torch.arange(K, device=labels.device)[None]) | (labels[:, None] >= K)
            logp = logp.masked_fill(~keep, -math.inf)
        r = torch.softmax(logp, dim=1)  # [B, K]
        a = alpha.double()[:, None, None]
        gain = (a * self.std[None, :, None] ** 2) / v[:, :, None]  # [B, K, 1]
        comp = self.means[None] + gain * (x_t.double()[:, None, :] - a * self.means[None])
        return (r[:, :, None] * comp).sum(1)

    def forward(self, *args, **kwargs):  # pragma: no cover - the analytic denoiser never calls it
        raise RuntimeError("GaussianMixture is evaluated through AnalyticDenoiser")


class AnalyticDenoiser(Denoiser):
    """The exact denoiser of a :class:`GaussianMixture` under any schedule (prediction kind ``x0``)."""

    def __init__(self, gmm: GaussianMixture, schedule: Schedule):
        super().__init__(gmm, schedule, "x0")

    def _x0(self, x_t: Tensor, t, cond: Cond) -> Tensor:
        tb = _as_batch(t, x_t)
        alpha, sigma = self.schedule.alpha_sigma(tb)
        labels = None if cond is None else cond["labels"]
        return self.backbone.posterior_mean(x_t, alpha, sigma, labels).float()


def load_mixture(spec: str) -> GaussianMixture:
    """``ring8`` / ``grid25`` / ``unequal`` or a JSON file with keys ``means``, ``weights`` and ``std``."""
    if spec in BUILTIN_MIXTURES:
        m = BUILTIN_MIXTURES[spec]
        return GaussianMixture(m["means"], m["weights"], m["std"])
    path = Path(spec)
    if path.suffix.lower() != ".json":
        raise ValueError(f"unknown Gaussian mixture {spec!r}; allowed: {', '.join(BUILTIN_MIXTURES)} or a .json file "
                         "with keys means, weights, std")
    if not path.is_file():
        raise FileNotFoundError(f"Gaussian mixture file not found: {path}")
    try:
        d = json.loads(path.read_text())
        return GaussianMixture(d["means"], d["weights"], d["std"])
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e}; a mixture file needs keys means, weights, std") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
