"""SiD, Score identity Distillation (Zhou et al., ICML 2024, arXiv 2404.04057), with SiD-LSG's guidance
(arXiv 2406.01561).

Per iteration the fake score takes one denoising step on detached student samples, then the student one step on
the paper's alpha-weighted generator loss as the reference computes it (``generator_loss`` in
``training/sid_loss.py`` of github.com/mingyuanzhou/SiD): the student's sample x is noised to x_t *with*
gradients, both scores predict x0 from x_t (their weights frozen, gradients flowing through them to x), and per
element

    L = (x0_real - x0_fake) * ((x0_real - x) - alpha * (x0_real - x0_fake)) / mean|x - x0_real|

with the normaliser per sample and outside autograd (the reference's "L2 - alpha * L1"; at alpha = 1 it is
``(x0_real - x0_fake) * (x0_fake - x)``).  SiD-LSG (github.com/mingyuanzhou/SiD-LSG) adds classifier-free
guidance to the fake score: ``fake_train_guidance`` (kappa_1) in its denoising loss, ``fake_guidance``
(kappa_2 = kappa_3) in the student's, beside the teacher's ``real_guidance`` (kappa_4), with the condition dropped
10% of the time in the fake score's updates whenever the fake score is guided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Phase, drop_labels, dsm_loss, frozen_copy, uniform_t

Tensor = torch.Tensor


@dataclass
class SiDConfig:
    name: str = "sid"
    # alpha of the generator loss: SiD's sid_train.py default, run_sid.sh's CIFAR-10 / ImageNet 64 / FFHQ 64 runs
    # (AFHQv2: 1.0); SiD-LSG's Stable Diffusion runs use 1 (the "sd" recipe)
    alpha: float = 1.2
    # The student's loss times, t ~ U[t_min, t_max] on the teacher's schedule: SiD-LSG's timesteps
    # randint(tmin=20, tmax=980) of 1000 (sid_training_loop.py).  SiD's EDM runs draw t uniform on the
    # rho = 7 sampling grid up to tmax = 800 of 1000 (sigma 0.002 .. ~24), which has no counterpart on other schedules
    t_min: float = 0.02
    t_max: float = 0.98
    fake_t_min: float = 1e-3  # the fake score's denoising loss, over the full range as in the other methods
    real_guidance: float | None = None  # kappa_4, the teacher's CFG scale; None: the teacher's default
    fake_guidance: float = 1.0  # kappa_2 = kappa_3: the fake score's CFG scale in the student's loss (1: off)
    fake_train_guidance: float = 1.0  # kappa_1: the fake score's CFG scale in its own denoising loss (1: off)
    # SiD-LSG: when the fake score is guided, its updates see the empty condition 10% of the time
    # (sid_training_loop.py, use_context_dropout_train_fake)
    fake_p_uncond: float = 0.1


def sid_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor, alpha: float) -> Tensor:
    """SiD's generator loss with the reference code's normaliser, mean over elements (the reference sums).

    ``x`` the student's samples, ``x0_real`` / ``x0_fake`` the two scores' x0 predictions from the same ``x_t``
    (each a function of ``x``); the normaliser ``mean|x - x0_real|`` per sample carries no gradient."""
    dims = tuple(range(1, x.ndim))
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    with torch.no_grad():
        w = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
    diff = x0_real - x0_fake
    return (diff * ((x0_real - x) - alpha * diff) / w).mean()


class SiD(Method):
    name = "sid"
    Config = SiDConfig
    network_names = ("fake_score",)

    @classmethod
    def check(cls, cfg: SiDConfig, shape) -> None:
        if not 0 <= cfg.t_min < cfg.t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={cfg.t_min}, t_max={cfg.t_max}")
        if not 0 <= cfg.fake_p_uncond < 1:
            raise ValueError(f"fake_p_uncond must be in [0, 1), got {cfg.fake_p_uncond}")

    def __init__(self, cfg: SiDConfig, ctx):
        super().__init__(cfg, ctx)
        self.check(cfg, ctx.shape)
        self.fake_score = frozen_copy(ctx.teacher_net)

    @property
    def lsg(self) -> bool:
        return self.cfg.fake_guidance != 1.0 or self.cfg.fake_train_guidance != 1.0

    def networks(self):
        return {"fake_score": self.fake_score}

    def phases(self):
        # SiD's loop: the fake score's update first, then the generator's, once each per iteration
        return [Phase("critic", ("fake_score",), self.fake_loss), Phase("student", ("student",), self.student_loss)]

    def student_loss(self):
        cfg, ctx = self.cfg, self.ctx
        x, cond, _ = ctx.student_x0(ctx.batch_size)
        t = uniform_t(x.shape[0], cfg.t_min, cfg.t_max, x.device, ctx.schedule)
        x_t = ctx.schedule.add_noise(x, torch.randn_like(x), t)  # with gradients: both scores see x through x_t
        x0_real = ctx.teacher(x_t, t, cond, guidance=ctx.real_guidance(cfg.real_guidance))
        with ctx.float32():
            x0_fake = self.fake_score(x_t, t, cond, guidance=cfg.fake_guidance)
        loss = sid_loss(x, x0_real, x0_fake, cfg.alpha)
        gap = (x0_real.detach().float() - x0_fake.detach().float()).flatten(1).norm(dim=1).mean()
        return loss, {"loss/sid": loss.item(), "sid/score_gap": gap.item()}

    def fake_loss(self):
        cfg, ctx = self.cfg, self.ctx
        with torch.no_grad():
            x, cond, _ = ctx.student_x0(ctx.batch_size, grad=False)
        if self.lsg:
            cond = drop_labels(self.fake_score, cond, cfg.fake_p_uncond)
        loss = dsm_loss(self.fake_score, x, cond, cfg.fake_t_min, guidance=cfg.fake_train_guidance)
        return loss, {"loss/fake_dsm": loss.item()}
