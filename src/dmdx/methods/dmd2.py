"""DMD2 (Yin et al. 2024, arXiv 2405.14867): distribution matching + TTUR + GAN on the fake score + backward simulation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..denoiser import Cond
from ..nets.heads import MultiHead
from .base import Method, Phase, critic_logs, dsm_loss, frozen_copy, uniform_t

Tensor = torch.Tensor


@dataclass
class DMD2Config:
    name: str = "dmd2"
    real_guidance: float | None = None  # CFG scale of the real score; None: the teacher's default. Fake score: no CFG
    critic_every: int = 5  # two time-scale rule: critic (fake score + GAN head) updates per student update
    dm_weight: float = 1.0
    dm_t_min: float = 0.02  # DM loss times, as the reference's [0.02 T, 0.98 T]
    dm_t_max: float = 0.98
    fake_t_min: float = 1e-3  # fake-score denoising loss over the full range
    gan: bool = True
    gan_g_weight: float = 3e-3  # reference: 3e-3 (ImageNet) .. 5e-3 (SDXL)
    gan_d_weight: float = 1e-2
    gan_t_max: float = 1.0  # real and fake samples are re-noised at t ~ U[0, gan_t_max) before the fake score


def dm_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
    """DMD2 eq. (2) as in the reference: grad = (p_real - p_fake) / mean|p_real|, surrogate 0.5 mse(x, x - grad).

    ``p = x - x0_pred``; the normaliser is per sample over all non-batch dims.  Returns (loss, grad).
    """
    p_real = x.detach() - x0_real
    p_fake = x.detach() - x0_fake
    dims = tuple(range(1, x.ndim))
    grad = (p_real - p_fake) / p_real.abs().mean(dim=dims, keepdim=True)
    grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(x, (x - grad).detach()), grad


def dm_term(ctx, fake_score, x: Tensor, cond: Cond, guidance: float | None, t_min: float, t_max: float
            ) -> tuple[Tensor, dict]:
    """The DM loss (``dm_loss``) of student samples ``x`` re-noised at t ~ U[t_min, t_max]: the real score is the
    teacher with CFG ``guidance`` (None: its default), the fake score ``fake_score``.  Returns (loss, log entries)."""
    t = uniform_t(x.shape[0], t_min, t_max, x.device, ctx.schedule)
    x_t = ctx.schedule.add_noise(x.detach(), torch.randn_like(x), t)
    with torch.no_grad():
        # the real score runs in the teacher's dtype (bf16 by default); the fake score's prediction in float32 even
        # under train.bf16 autocast, as the DMD2 reference does on purpose (the DM gradient is the small difference
        # of the two predictions)
        x0_real = ctx.teacher(x_t, t, cond, guidance=ctx.real_guidance(guidance))
        with ctx.float32():
            x0_fake = fake_score(x_t, t, cond)
    loss, grad = dm_loss(x, x0_real, x0_fake)
    return loss, {"loss/dm": loss.item(), "dm/grad_norm": grad.flatten(1).norm(dim=1).mean().item()}


class DMD2(Method):
    name = "dmd2"
    network_names = ("fake_score", "gan_head")
    Config = DMD2Config

    def __init__(self, cfg: DMD2Config, ctx):
        super().__init__(cfg, ctx)
        if cfg.critic_every < 1:
            raise ValueError(f"critic_every must be >= 1, got {cfg.critic_every}")
        self.fake_score = frozen_copy(ctx.teacher_net)
        self.head = None
        if cfg.gan:
            bb = self.fake_score.backbone
            self.bottleneck = bb.feature_layers[-1]
            n = 2
            x = ctx.noise(n)
            t = torch.full((n,), 0.5, dtype=torch.float64, device=ctx.device)
            with torch.no_grad():
                (f,) = self.fake_score.features(x, t, ctx.cond(n), [self.bottleneck])
            self.head = MultiHead([tuple(f.shape[1:])]).to(ctx.device)

    def networks(self):
        nets = {"fake_score": self.fake_score}
        if self.head is not None:
            nets["gan_head"] = self.head
        return nets

    def phases(self):
        return [
            Phase("student", ("student",), self.student_loss, every=self.cfg.critic_every),
            Phase("critic", tuple(self.networks()), self.critic_loss),
        ]

    # -- pieces ----------------------------------------------------------------------------------------------
    def dm_term(self, x: Tensor, cond: Cond) -> tuple[Tensor, dict]:
        cfg = self.cfg
        return dm_term(self.ctx, self.fake_score, x, cond, cfg.real_guidance, cfg.dm_t_min, cfg.dm_t_max)

    def logits(self, x0: Tensor, cond: Cond) -> Tensor:
        """GAN classifier on the fake score's bottleneck, after re-noising x0 at t ~ U[0, gan_t_max); the fake score's
        pass stops at the bottleneck (``Denoiser.features``)."""
        t = uniform_t(x0.shape[0], 0.0, self.cfg.gan_t_max, x0.device, self.ctx.schedule)
        x_t = self.ctx.schedule.add_noise(x0, torch.randn_like(x0), t)
        return self.head(self.fake_score.features(x_t, t, cond, [self.bottleneck]))

    # -- phases ----------------------------------------------------------------------------------------------
    def student_loss(self):
        cfg, ctx = self.cfg, self.ctx
        x, cond, _ = ctx.student_x0(ctx.batch_size)
        loss, logs = self.dm_term(x, cond)
        loss = cfg.dm_weight * loss
        if self.head is not None:
            g = F.softplus(-self.logits(x, cond)).mean()
            logs["loss/gan_g"] = g.item()
            loss = loss + cfg.gan_g_weight * g
        extra, extra_logs = self.student_extra(x, cond)
        logs.update(extra_logs)
        return loss + extra, logs

    def student_extra(self, x: Tensor, cond: Cond) -> tuple[Tensor | float, dict]:
        """Hook for additional student losses (DMD's regression)."""
        return 0.0, {}

    def critic_loss(self):
        cfg, ctx = self.cfg, self.ctx
        with torch.no_grad():
            x, cond, _ = ctx.student_x0(ctx.batch_size, grad=False)
        loss = dsm_loss(self.fake_score, x, cond, cfg.fake_t_min)
        logs = {"loss/fake_dsm": loss.item()}
        if self.head is not None:
            real, rcond = ctx.real_batch(ctx.batch_size)
            d_fake = self.logits(x, cond)
            d_real = self.logits(real, rcond)
            d = (F.softplus(d_fake) + F.softplus(-d_real)).mean()
            logs.update({"loss/gan_d": d.item(), "gan/d_real": d_real.mean().item(), "gan/d_fake": d_fake.mean().item()})
            logs.update(critic_logs(d_real, d_fake, "gan"))
            loss = loss + cfg.gan_d_weight * d
        return loss, logs
