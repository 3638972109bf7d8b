"""VSD / SwiftBrush (Nguyen & Tran, CVPR 2024, arXiv 2312.05239): variational score distillation into a one-step
student, image-free; with SNOOPI's proper guidance (Nguyen et al. 2024, arXiv 2412.02687) as an option.

Per iteration (``train_swiftbrush.py`` of github.com/VinAIResearch/SwiftBrush) the student's sample x is noised to
``t ~ U[0.02, 0.98]`` and both scores, the frozen teacher and the fake score ("LoRA teacher"), predict with the
*same* classifier-free guidance scale; the student descends

    grad = sigma_t^2 * (eps_teacher - eps_fake) = alpha_t * sigma_t * (x0_fake - x0_teacher)

through the surrogate ``0.5 * mse(x, stopgrad(x - grad))`` (no normalisation, unlike DMD2).  The fake score then
takes one denoising step on detached student samples (drawn afresh, as every method's critic phase here does;
SwiftBrush reuses the student update's), the condition replaced by the empty one 10% of the time (it is evaluated
with guidance, so it must know the unconditional score too).  On pipeline teachers the
fake score is a LoRA on the teacher where ``real.fake_lora.rank > 0`` (the recipe sets SwiftBrush's rank 64);
elsewhere a full copy.

SNOOPI's proper guidance (PG-SB): ``guidance_range=[lo, hi]`` draws the guidance scale of both scores uniformly
from that range at every student update instead of using one fixed scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schedules import _bcast
from .base import Method, Phase, drop_labels, dsm_loss, frozen_copy, uniform_t

Tensor = torch.Tensor


@dataclass
class VSDConfig:
    name: str = "vsd"
    # the CFG scale of both scores; None: the teacher's default.  SwiftBrush's README trains SD2.1 at 4.5 (the
    # "sd" recipe sets it)
    real_guidance: float | None = None
    # SNOOPI's PG-SB: [lo, hi] draws the scale uniformly per student update (both scores); None: off (SwiftBrush)
    guidance_range: tuple[float, float] | None = None
    t_min: float = 0.02  # SwiftBrush: timesteps randint(0.02 * 1000, 0.981 * 1000)
    t_max: float = 0.98
    fake_t_min: float = 1e-3  # SwiftBrush's LoRA loss draws every timestep in [0, 1000)
    fake_p_uncond: float = 0.1  # SwiftBrush: the LoRA teacher trains on the empty prompt with probability 0.1


def vsd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """SwiftBrush's VSD step: ``grad = sigma^2 (eps_real - eps_fake)``, written on x0 predictions at ``(alpha,
    sigma)`` [B] of the same ``x_t``, applied through ``0.5 * mse(x, stopgrad(x - grad))``.  Returns (loss, grad)."""
    w = _bcast((alpha * sigma).float(), x)
    grad = torch.nan_to_num(w * (x0_fake.float() - x0_real.float()))
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach()), grad


class VSD(Method):
    name = "vsd"
    Config = VSDConfig
    network_names = ("fake_score",)

    @classmethod
    def check(cls, cfg: VSDConfig, shape) -> None:
        if not 0 <= cfg.t_min < cfg.t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={cfg.t_min}, t_max={cfg.t_max}")
        if cfg.guidance_range is not None and not 0 <= cfg.guidance_range[0] <= cfg.guidance_range[1]:
            raise ValueError(f"guidance_range must be [lo, hi] with 0 <= lo <= hi, got {list(cfg.guidance_range)}")
        if not 0 <= cfg.fake_p_uncond < 1:
            raise ValueError(f"fake_p_uncond must be in [0, 1), got {cfg.fake_p_uncond}")

    def __init__(self, cfg: VSDConfig, ctx):
        super().__init__(cfg, ctx)
        self.check(cfg, ctx.shape)
        self.fake_score = frozen_copy(ctx.teacher_net)

    def networks(self):
        return {"fake_score": self.fake_score}

    def phases(self):
        # SwiftBrush's loop: the student's VSD update, then the LoRA teacher's, once each per iteration
        return [Phase("student", ("student",), self.student_loss), Phase("critic", ("fake_score",), self.fake_loss)]

    def guidance(self) -> float:
        """This update's CFG scale: fixed, or drawn from ``guidance_range`` (SNOOPI's proper guidance)."""
        if self.cfg.guidance_range is None:
            return self.ctx.real_guidance(self.cfg.real_guidance)
        lo, hi = self.cfg.guidance_range
        return lo + (hi - lo) * float(torch.rand(()))

    def student_loss(self):
        cfg, ctx = self.cfg, self.ctx
        x, cond, _ = ctx.student_x0(ctx.batch_size)
        t = uniform_t(x.shape[0], cfg.t_min, cfg.t_max, x.device, ctx.schedule)
        x_t = ctx.schedule.add_noise(x.detach(), torch.randn_like(x), t)
        g = self.guidance()
        with torch.no_grad():
            x0_real = ctx.teacher(x_t, t, cond, guidance=g)
            with ctx.float32():
                x0_fake = self.fake_score(x_t, t, cond, guidance=g)
        alpha, sigma = ctx.schedule.alpha_sigma(t)
        loss, grad = vsd_loss(x, x0_real, x0_fake, alpha.to(x.device), sigma.to(x.device))
        return loss, {"loss/vsd": loss.item(), "vsd/grad_norm": grad.flatten(1).norm(dim=1).mean().item(),
                      "vsd/guidance": g}

    def fake_loss(self):
        cfg, ctx = self.cfg, self.ctx
        with torch.no_grad():
            x, cond, _ = ctx.student_x0(ctx.batch_size, grad=False)
        loss = dsm_loss(self.fake_score, x, drop_labels(self.fake_score, cond, cfg.fake_p_uncond), cfg.fake_t_min)
        return loss, {"loss/fake_dsm": loss.item()}
