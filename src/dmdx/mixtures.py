"""Exact Gaussian mixtures: isotropic mixtures whose denoiser E[x0 | x_t] is exact for every schedule.

For ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x_t = alpha x0 + sigma eps``:
``x_t | k ~ N(alpha mu_k, v_k I)`` with ``v_k = alpha^2 s_k^2 + sigma^2``, and
``E[x0 | x_t, k] = mu_k + (alpha s_k^2 / v_k)(x_t - alpha mu_k)``; the posterior over k is
``r_k ∝ w_k N(x_t; alpha mu_k, v_k I)``.

Components are grouped into classes (``classes[k]``, the class of component k; by default each component is its own
class).  Conditioning on a class c restricts the posterior to c's components, renormalised: that is
``E[x0 | x_t, c]`` exactly; the null label (= number of classes) keeps the whole mixture, so classifier-free guidance
``uncond + s (cond - uncond)`` is computed on the exact posteriors.

A mixture *spec* (a built-in entry or a JSON file) holds ``means``, ``weights``, ``std`` and optionally ``classes``
(which makes its teacher class-conditional), ``schedule`` (``"flow"`` by default; e.g. ``{"name": "vp"}``, SD's
scaled-linear VP on 1,000 integer steps, :class:`dmdx.schedules.VPDiscrete`) and ``guidance`` (the teacher's default
CFG scale, 1 by default).
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
    # The paper's regime, exactly: SD's scaled-linear VP schedule on integer times and classes to guide.  Each class is
    # two opposite modes (0.7 / 0.3 of the class), so a label decides which half of the ring a sample may use and the
    # unconditional posterior mixes all three classes: CFG has something to push against.
    "classes3": {"means": _ring(6, 2.0), "weights": [0.7 / 3, 0.7 / 3, 0.7 / 3, 0.3 / 3, 0.3 / 3, 0.3 / 3],
                 "std": 0.15, "classes": [0, 1, 2, 0, 1, 2], "schedule": {"name": "vp"},
                 "about": "6 Gaussians on a circle of radius 2 in 3 classes of two opposite modes (0.7 / 0.3 within "
                          "a class), std 0.15; class-conditional, on SD's VP schedule (1,000 integer steps)"},
}

SPEC_KEYS = ("means", "weights", "std", "classes", "schedule", "guidance", "about")


class GaussianMixture(nn.Module):
    """An isotropic Gaussian mixture in any dimension (means [K, D], weights [K], std [K]), its components grouped
    into classes (``classes`` [K] in 0..C-1 with every class used; None: each component its own class)."""

    def __init__(self, means, weights, std, classes=None):
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
        self.conditional = classes is not None  # a teacher that takes labels (a spec with "classes")
        classes = torch.arange(K) if classes is None else torch.as_tensor(classes)
        if classes.shape != (K,) or classes.is_floating_point() or (classes < 0).any() or \
                set(classes.tolist()) != set(range(int(classes.max()) + 1)):
            raise ValueError(f"classes must hold one integer class per mean ({K}), using every class 0..C-1 with no "
                             f"gap, got {classes.tolist()}")
        self.register_buffer("classes", classes.long())
        self.feature_layers: tuple[str, ...] = ()

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    def class_weights(self) -> Tensor:
        """The weight of each class [C] (the sum of its components' weights)."""
        return torch.zeros(self.num_classes, dtype=torch.float64, device=self.weights.device).index_add_(
            0, self.classes, self.weights)

    def class_mixture(self, c: int) -> "GaussianMixture":
        """The mixture of class ``c`` alone, its weights renormalised (what a sample conditioned on c follows)."""
        keep = self.classes == c
        return GaussianMixture(self.means[keep], self.weights[keep], self.std[keep])

    def to_spec(self) -> dict:
        spec = {"means": self.means.tolist(), "weights": self.weights.tolist(), "std": self.std.tolist()}
        return {**spec, "classes": self.classes.tolist()} if self.conditional else spec

    def null_cond(self, cond: Cond) -> Cond:
        if cond is None:
            return None
        return {"labels": torch.full_like(cond["labels"], self.num_classes)}

    def sample(self, n: int, generator: torch.Generator | None = None, labels: Tensor | None = None,
               classes: Tensor | None = None):
        """Exact samples and their component labels; ``labels`` fixes each sample's component, ``classes`` its class
        (its component then drawn from the class's weights)."""
        if labels is None and classes is not None:
            w = self.weights[None].expand(len(classes), -1) * (self.classes[None] == torch.as_tensor(classes)[:, None])
            labels = torch.multinomial(w, 1, generator=generator)[:, 0]
        elif labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(len(labels), self.dim, generator=generator, dtype=torch.float64)
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
        """E[x0 | x_t] in closed form (restricted to class ``labels[i]``'s components where it is below C)."""
        logp, v = self.log_resp(x_t, alpha, sigma)
        if labels is not None:
            labels = labels.to(self.classes.device)
            keep = (labels[:, None] == self.classes[None]) | (labels[:, None] >= self.num_classes)
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


def mixture_spec(spec: str) -> dict:
    """The spec of a built-in mixture (``ring8``, ``scatter7``, ``classes3``, ...) or of a JSON file with keys
    ``means``, ``weights``, ``std`` and optionally ``classes``, ``schedule``, ``guidance``."""
    if spec in BUILTIN_MIXTURES:
        return dict(BUILTIN_MIXTURES[spec])
    path = Path(spec)
    if path.suffix.lower() != ".json":
        raise ValueError(f"unknown Gaussian mixture {spec!r}; allowed: {', '.join(BUILTIN_MIXTURES)} or a .json file "
                         "with keys means, weights, std (optional: classes, schedule, guidance)")
    if not path.is_file():
        raise FileNotFoundError(f"Gaussian mixture file not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in ("means", "weights", "std") if k not in d]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}; a mixture file needs keys means, weights, std")
    unknown = sorted(set(d) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {', '.join(SPEC_KEYS)}")
    return d


def load_mixture(spec: str) -> GaussianMixture:
    """The :class:`GaussianMixture` of a spec (see :func:`mixture_spec`)."""
    d = mixture_spec(spec)
    return GaussianMixture(d["means"], d["weights"], d["std"], d.get("classes"))
