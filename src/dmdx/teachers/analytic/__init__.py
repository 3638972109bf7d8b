"""The analytic teacher kind: exact Gaussian mixtures, ``gmm:NAME`` (:mod:`.kind`)."""

from ...kinds import register
from .kind import AnalyticKind, fit_surrogate, gmm_model

KIND = register(AnalyticKind())

__all__ = ["KIND", "AnalyticKind", "fit_surrogate", "gmm_model"]
