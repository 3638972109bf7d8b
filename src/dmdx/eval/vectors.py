"""Metrics for samples of vector (toy mixture) data sets.

- ``sliced_wasserstein``: sqrt of the mean over random unit directions of the squared W2 distance between the 1-D
  projections, computed by matching quantiles of the sorted projections (clouds may differ in size).
- ``mixture_metrics``: mode quality, mode weights and coverage against a known :class:`GaussianMixture`;
  ``class_metrics``: the same per class for class-conditional samples, each class against its own components.
  A sample is assigned to the mode with the smallest standardised distance ``||x - mu_k|| / s_k`` and counts as
  *high quality* when ``||x - mu_k||^2 / s_k^2`` is below the chi-square(D) quantile at level
  ``1 - exp(-4.5) = 98.9 %``; in 2-D this is exactly "within 3 std of the mode", and in any dimension 98.9 % of
  exact samples of an isolated mode pass.
"""

from __future__ import annotations

import math

import torch

from ..mixtures import GaussianMixture

Tensor = torch.Tensor

QUALITY_LEVEL = 1 - math.exp(-4.5)  # P(r < 3 s) for a 2-D isotropic Gaussian
COVERAGE_FRACTION = 0.1  # a mode is covered if it gets >= 10 % of its expected share of high-quality samples


def _quantiles(sorted_x: Tensor, q: Tensor) -> Tensor:
    """Linear interpolation of sorted columns [N, P] at levels q [M] (quantile (i + 0.5) / N sits at row i)."""
    n = sorted_x.shape[0]
    pos = (q * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo)[:, None]
    return sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced W2 distance between point clouds a [N, D] and b [M, D] (random directions drawn with ``seed``)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two [N, D] point clouds with the same D, got {list(a.shape)} and {list(b.shape)}")
    a, b = a.double().cpu(), b.double().cpu()
    dirs = torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(dim=0).values, (b @ dirs).sort(dim=0).values
    m = max(a.shape[0], b.shape[0])
    q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    if pa.shape[0] != m:
        pa = _quantiles(pa, q)
    if pb.shape[0] != m:
        pb = _quantiles(pb, q)
    return float(((pa - pb) ** 2).mean().sqrt())


def chi2_quantile(p: float, dof: int) -> float:
    """Quantile of the chi-square distribution (bisection on torch.special.gammainc, float64)."""
    lo, hi = 0.0, float(dof) + 20.0 * math.sqrt(2.0 * dof) + 50.0
    k = torch.tensor(dof / 2.0, dtype=torch.float64)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.special.gammainc(k, torch.tensor(mid / 2.0, dtype=torch.float64))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mixture_metrics(samples: Tensor, gmm: GaussianMixture, reference: Tensor | None = None,
                    n_proj: int = 256) -> dict:
    """Quality, mode weights, coverage and sliced Wasserstein of samples [N, D] from a known mixture.

    - ``quality``: fraction of high-quality samples (see the module doc; ~0.989 for exact samples);
    - ``mode_weights``: the fraction of high-quality samples assigned to each mode (all 0 if there are none);
    - ``weight_error``: total variation ``0.5 * sum_k |w_hat_k - w_k|`` (1.0 if there are no high-quality
      samples); ``max_weight_error``: ``max_k |w_hat_k - w_k|``;
    - ``modes_covered``: modes with at least 10 % of their expected share ``w_k * n_hq`` of the high-quality
      samples; ``coverage`` = modes_covered / K;
    - ``sw``: sliced Wasserstein to ``reference`` (default: as many exact mixture samples, seed 0).
    """
    if samples.ndim != 2 or samples.shape[1] != gmm.dim:
        raise ValueError(f"expected samples of shape [N, {gmm.dim}], got {list(samples.shape)}")
    x = samples.detach().double().cpu()
    finite = torch.isfinite(x).all(dim=1)
    means, std, w = gmm.means.cpu(), gmm.std.cpu(), gmm.weights.cpu()
    z2 = torch.cdist(x.nan_to_num(0.0, 0.0, 0.0), means) ** 2 / std[None] ** 2  # [N, K]
    z2_min, mode = z2.min(dim=1)
    good = finite & (z2_min < chi2_quantile(QUALITY_LEVEL, gmm.dim))
    n_good = int(good.sum())
    counts = torch.bincount(mode[good], minlength=gmm.num_components).double()
    w_hat = counts / n_good if n_good else torch.zeros_like(w)
    covered = (counts >= COVERAGE_FRACTION * w * n_good) & (counts > 0)
    if reference is None:
        reference, _ = gmm.sample(x.shape[0], generator=torch.Generator().manual_seed(0))
    return {
        "num_samples": int(x.shape[0]),
        "quality": n_good / max(x.shape[0], 1),
        "mode_weights": w_hat.tolist(),
        "weight_error": float(0.5 * (w_hat - w).abs().sum()) if n_good else 1.0,
        "max_weight_error": float((w_hat - w).abs().max()) if n_good else float(w.max()),
        "modes_covered": int(covered.sum()),
        "coverage": float(covered.double().mean()),
        "sw": sliced_wasserstein(x[finite], reference, n_proj=n_proj) if finite.any() else math.inf,
    }


def class_metrics(samples: Tensor, labels: Tensor, gmm: GaussianMixture, n_proj: int = 256) -> dict:
    """:func:`mixture_metrics` of class-conditional samples, class by class: the samples of label c against class c's
    own mixture (``gmm.class_mixture(c)``: its components, weights renormalised), which is what a sampler
    conditioned on c must reproduce exactly (at guidance 1).

    - ``class_mode_weights`` / ``class_true_weights``: per class, the recovered and the true weights of its modes;
    - ``max_weight_error``: the largest per-mode weight error over every class; ``modes_covered`` / ``coverage``:
      modes covered within their own class, summed over classes;
    - ``quality``: fraction of samples within 3 std of a mode of their own class; ``off_class``: fraction within 3
      std of a mode of another class (a label that was not followed);
    - ``sw``: mean over classes of the sliced Wasserstein distance to exact samples of the class.
    """
    x = samples.detach().double().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (x.shape[0],):
        raise ValueError(f"expected one label per sample ([{x.shape[0]}]), got {list(labels.shape)}")
    per = {}
    for c in range(gmm.num_classes):
        sel = labels == c
        if sel.any():
            per[c] = mixture_metrics(x[sel], gmm.class_mixture(c), n_proj=n_proj)
    if not per:
        raise ValueError(f"no sample has a label in 0..{gmm.num_classes - 1}")
    means, std = gmm.means.cpu(), gmm.std.cpu()
    z2 = torch.cdist(x.nan_to_num(0.0, 0.0, 0.0), means) ** 2 / std[None] ** 2
    z2_min, mode = z2.min(dim=1)
    near = torch.isfinite(x).all(dim=1) & (z2_min < chi2_quantile(QUALITY_LEVEL, gmm.dim))
    off = near & (gmm.classes.cpu()[mode] != labels) & (labels < gmm.num_classes)
    n = sum(m["num_samples"] for m in per.values())
    covered = sum(m["modes_covered"] for m in per.values())
    return {
        "num_samples": int(x.shape[0]),
        "quality": sum(m["quality"] * m["num_samples"] for m in per.values()) / n,
        "off_class": float(off.double().mean()),
        "class_mode_weights": {c: m["mode_weights"] for c, m in per.items()},
        "class_true_weights": {c: gmm.class_mixture(c).weights.tolist() for c in per},
        "max_weight_error": max(m["max_weight_error"] for m in per.values()),
        "modes_covered": covered,
        "coverage": covered / gmm.num_components,
        "sw": sum(m["sw"] for m in per.values()) / len(per),
    }
