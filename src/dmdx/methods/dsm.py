"""Teacher training: denoising score matching with label dropout for classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, Phase, drop_labels, dsm_loss


@dataclass
class DSMConfig:
    name: str = "dsm"
    p_uncond: float = 0.1  # probability of training on the null label, so that CFG works at sampling time
    t_min: float = 1e-3


class DSM(Method):
    """Train a denoiser (the network the loop calls ``student``) on real data."""

    name = "dsm"
    Config = DSMConfig
    needs_teacher = False

    def phases(self):
        return [Phase("denoise", ("student",), self.loss)]

    def loss(self):
        ctx = self.ctx
        x0, cond = ctx.real_batch(ctx.batch_size)
        loss = dsm_loss(ctx.student, x0, drop_labels(ctx.student, cond, self.cfg.p_uncond), self.cfg.t_min)
        return loss, {"loss/dsm": loss.item()}
