"""DMDX (arXiv 2507.18569): ADP pre-training on teacher ODE pairs, then ADM fine-tuning, in one run."""

from __future__ import annotations

from dataclasses import dataclass, field

from .adm import ADM, ADMConfig
from .adp import ADP, ADPConfig
from .base import Method


@dataclass
class DMDXConfig:
    name: str = "dmdx"
    adp_fraction: float = 0.5  # share of the run's iterations spent in ADP (the rest is ADM)
    adp: ADPConfig = field(default_factory=ADPConfig)
    adm: ADMConfig = field(default_factory=ADMConfig)


class DMDX(Method):
    name = "dmdx"
    Config = DMDXConfig
    needs_pairs = True
    uses_pixel_backbone = True

    @classmethod
    def stages(cls, cfg: DMDXConfig, steps: int):
        if not 0 <= cfg.adp_fraction <= 1:
            raise ValueError(f"adp_fraction must be in [0, 1], got {cfg.adp_fraction}")
        n_adp = int(round(steps * cfg.adp_fraction))
        return [(ADP, cfg.adp, n_adp), (ADM, cfg.adm, steps - n_adp)]
