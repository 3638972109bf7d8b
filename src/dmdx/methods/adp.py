"""ADP: adversarial distillation pre-training on teacher ODE pairs (the first stage of DMDX, arXiv 2507.18569).

The student sees a point of the pair's path at ``t' = 1 - u^3`` (u uniform: biased to high noise) and predicts x0:
at or above its first conditioning time, that time with the sampler's own input (``adp_input``); below it,
``x_t' = alpha(t') x0_pair + sigma(t') noise_pair``.  Two hinge discriminators judge the prediction
against the teacher's x0: a latent one (frozen teacher backbone + heads, both re-noised at a uniform time) and a
pixel one (a frozen vision backbone + heads on decoded samples), weighted 0.85 / 0.15.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..nets.heads import MultiHead
from ..schedules import _bcast
from .adm import TeacherDiscriminator, check_penalties, critic_penalties, hinge_d, hinge_g
from .base import Method, Phase, critic_gap, critic_logs, uniform_t

Tensor = torch.Tensor


class PixelDiscriminator(torch.nn.Module):
    """Trainable heads on the features of a frozen vision backbone (``backbone.features(x) -> list``)."""

    def __init__(self, backbone, ctx, head_arch: str = "dmd2"):
        super().__init__()
        self._bb = [backbone]
        with torch.no_grad():
            feats = backbone.features(ctx.noise(2).clamp(-1, 1))
        self.heads = MultiHead([tuple(f.shape[1:]) for f in feats], arch=head_arch).to(ctx.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self._bb[0].features(x))


@dataclass
class ADPConfig:
    name: str = "adp"
    latent_weight: float = 0.85
    pixel_weight: float = 0.15  # only used when a pixel backbone exists (image data); 0 turns it off
    cubic: bool = True  # student times t' = 1 - u^3; False: uniform
    d_t_min: float = 0.0  # latent discriminator times, uniform
    d_t_max: float = 1.0
    # Optional regression anchor: ``reg_weight * mse(G(x_t'), x0_pair)`` on the same pair inputs, trained into the
    # student only.  0 is the pure-GAN form of the paper's abstract; one secondary source adds an MSE on the pairs.
    reg_weight: float = 0.0
    head_arch: Literal["paper", "dmd2"] = "paper"  # conv heads: the paper's (appendix B.1) or DMD2's (nets/heads)
    # The latent critic's smoothness penalties (adm.smoothness_penalty): R1 on the re-noised teacher x0, R2 on the student's
    r1_weight: float = 0.0
    r2_weight: float = 0.0
    r1_sigma: float = 0.01
    lr_scale: dict = field(default_factory=dict)  # this stage's rates over train.lr_scale (as ADMConfig.lr_scale)


def adp_times(n: int, cubic: bool, device) -> Tensor:
    """Student times of ADP: ``t = 1 - u^3`` for u ~ U[0, 1] (density 1 / (3 (1-t)^(2/3)), biased to t = 1)."""
    u = torch.rand(n, device=device, dtype=torch.float64)
    return 1 - u**3 if cubic else u


def adp_input(schedule, x0: Tensor, noise: Tensor, t: Tensor, first_time: float) -> tuple[Tensor, Tensor]:
    """The student's input on the pair (noise, x0) at path times ``t``, and the times it is fed at.

    A time at or above the student's first conditioning time ``first_time`` *is* that time, and gets exactly what
    sampling feeds there, ``schedule.prior(noise)`` (``sampling.student_sample``); a time below it gets the pair's path
    ``alpha(t) x0 + sigma(t) noise``, the form the few-step sampler feeds at its later times.  (On VP schedules
    ``alpha(1) > 0``: the path at t = 1 would leak ``alpha(1) x0`` into an input that sampling gives as pure noise.)
    """
    t = t.clamp(max=first_time)
    first = _bcast(t >= first_time, x0)
    return torch.where(first, schedule.prior(noise), schedule.add_noise(x0, noise, t)), t


class ADP(Method):
    name = "adp"
    network_names = ("latent_heads", "pixel_heads")
    Config = ADPConfig
    needs_pairs = True
    uses_pixel_backbone = True

    @classmethod
    def check(cls, cfg: ADPConfig, shape) -> None:
        """Config-only checks, run at start-up before pairs are collected."""
        for key in ("latent_weight", "pixel_weight", "reg_weight"):
            if getattr(cfg, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
        if cfg.latent_weight == 0 and cfg.pixel_weight == 0 and cfg.reg_weight == 0:
            raise ValueError("ADP has nothing to train: latent_weight, pixel_weight and reg_weight are all 0")
        if not 0 <= cfg.d_t_min < cfg.d_t_max <= 1:
            raise ValueError(f"need 0 <= d_t_min < d_t_max <= 1, got d_t_min={cfg.d_t_min}, d_t_max={cfg.d_t_max}")
        check_penalties(cfg)

    def __init__(self, cfg: ADPConfig, ctx):
        super().__init__(cfg, ctx)
        self.check(cfg, ctx.shape)
        self.latent = TeacherDiscriminator(ctx.teacher_net, ctx, cfg.head_arch)
        self.pixel = None
        if cfg.pixel_weight > 0 and ctx.pixel_backbone is not None:
            self.pixel = PixelDiscriminator(ctx.pixel_backbone, ctx, cfg.head_arch)

    def networks(self):
        nets = {"latent_heads": self.latent.heads}
        if self.pixel is not None:
            nets["pixel_heads"] = self.pixel.heads
        return nets

    def phases(self):
        return [Phase("student", ("student",), self.student_loss),
                Phase("critic", tuple(self.networks()), self.critic_loss)]

    def predict(self, grad: bool):
        ctx = self.ctx
        noise, x0, cond = ctx.pairs.batch(ctx.batch_size, ctx.device)
        t = ctx.schedule.training_time(adp_times(x0.shape[0], self.cfg.cubic, ctx.device))
        x_in, t = adp_input(ctx.schedule, x0, noise, t, ctx.times[0])
        with torch.set_grad_enabled(grad):
            return ctx.student(x_in, t, cond), x0, cond

    def renoise(self, *xs: Tensor):
        """Re-noise each tensor with its own noise at one shared uniform time per sample."""
        t = uniform_t(xs[0].shape[0], self.cfg.d_t_min, self.cfg.d_t_max, xs[0].device, self.ctx.schedule)
        return [self.ctx.schedule.add_noise(x, torch.randn_like(x), t) for x in xs], t

    def student_loss(self):
        cfg = self.cfg
        x_hat, x0, cond = self.predict(grad=True)
        (x_t,), t = self.renoise(x_hat)
        lat = hinge_g(self.latent(x_t, t, cond))
        loss, logs = cfg.latent_weight * lat, {"loss/gan_g_latent": lat.item()}
        if self.pixel is not None:
            pix = hinge_g(self.pixel(x_hat))
            loss = loss + cfg.pixel_weight * pix
            logs["loss/gan_g_pixel"] = pix.item()
        logs["loss/gan_g"] = loss.item()
        if cfg.reg_weight > 0:
            reg = F.mse_loss(x_hat.float(), x0.float())
            loss = loss + cfg.reg_weight * reg
            logs["loss/reg"] = reg.item()
        return loss, logs

    def critic_loss(self):
        cfg = self.cfg
        with torch.no_grad():
            x_hat, x0, cond = self.predict(grad=False)
            (f_t, r_t), t = self.renoise(x_hat, x0)
        d_real, d_fake = self.latent(r_t, t, cond), self.latent(f_t, t, cond)
        lat = hinge_d(d_real, d_fake)
        pen, pen_logs = critic_penalties(lambda z: self.latent(z, t, cond), r_t, d_real, f_t, d_fake, cfg)
        loss = cfg.latent_weight * (lat + pen)
        logs = {"loss/gan_d_latent": lat.item(), **pen_logs, **critic_logs(d_real, d_fake, "latent")}
        # its signal: the re-noised pair's x0 difference (each input carries its own noise on top)
        alpha, _ = self.ctx.schedule.alpha_sigma(t)
        logs.update(critic_gap(_bcast(alpha, x0).float() * (x0.float() - x_hat.float()), f_t, "latent"))
        if self.pixel is not None:
            p_real, p_fake = self.pixel(x0), self.pixel(x_hat)
            pix = hinge_d(p_real, p_fake)
            loss = loss + cfg.pixel_weight * pix
            logs["loss/gan_d_pixel"] = pix.item()
            logs.update(critic_logs(p_real, p_fake, "pixel"))
            logs.update(critic_gap(x0.float() - x_hat.float(), x_hat, "pixel"))
        logs["loss/gan_d"] = loss.item()
        return loss, logs
