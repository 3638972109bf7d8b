"""ADM (Lu et al. 2025, arXiv 2507.18569): adversarial distribution matching.

The reverse-KL DM loss is replaced by a hinge GAN.  A noised student sample x_t takes one probability-flow ODE
step of size dt with the real score (teacher, with CFG) and with the fake score; the discriminator (frozen
teacher backbone + small trainable heads on its intermediate features) scores both latents at time t - dt.
Critic: ``relu(1 + D(x_fake)) + relu(1 - D(x_real))``; student: ``-D(x_fake)``, its gradient flowing through the
fake score's step.  The fake score keeps its denoising loss on student samples, as in DMD.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..denoiser import Cond
from ..nets.heads import MultiHead
from ..sampling import SOLVERS, ode_step
from .base import Method, Phase, critic_gap, critic_logs, dsm_loss, frozen_copy, uniform_t
from .dmd2 import dm_term

Tensor = torch.Tensor


class TeacherDiscriminator(torch.nn.Module):
    """D(x, t, cond): trainable heads on the features of a frozen teacher backbone (Sec. 3 of the ADM paper).

    Heads are 2-D conv heads on image feature maps, vector heads on MLP features; ``nets.heads.ConvHead(dims=3)``
    is the same design for video latents.  The backbone's parameters never train here; gradients reach the
    input x (the student) through it.
    """

    def __init__(self, teacher_net, ctx, head_arch: str = "dmd2"):
        super().__init__()
        self.layers = list(teacher_net.backbone.feature_layers)
        self._net = [teacher_net]  # a list keeps the frozen teacher out of this module's parameters/state_dict
        n = 2
        with torch.no_grad():
            feats = teacher_net.features(ctx.noise(n), torch.full((n,), 0.5, dtype=torch.float64, device=ctx.device),
                                         ctx.cond(n), self.layers)
        self.heads = MultiHead([tuple(f.shape[1:]) for f in feats], arch=head_arch).to(ctx.device)

    def forward(self, x: Tensor, t, cond: Cond) -> Tensor:
        """The heads' logits [B, n_heads]; the teacher's pass stops at its last feature layer."""
        return self.heads(self._net[0].features(x, t, cond, self.layers))


def hinge_d(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Critic hinge loss ``E[relu(1 - D(real))] + E[relu(1 + D(fake))]``."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def hinge_g(d_fake: Tensor, weight: Tensor | None = None) -> Tensor:
    """Generator hinge loss ``-E[D(fake)]``; with ``weight`` [B] (no gradient) each sample's term is scaled by its own
    weight, so its gradient is that sample's gradient of ``-E[D(fake)]`` times the weight."""
    if weight is None:
        return -d_fake.mean()
    return -(weight.detach().reshape(-1, *[1] * (d_fake.ndim - 1)) * d_fake).mean()


def dmd2_scale(x: Tensor, x0_real: Tensor) -> Tensor:
    """DMD2's per-sample normaliser ``mean |x - x0_real|`` over each sample's elements (``dm_loss``'s denominator).

    ``x`` is the student's sample, ``x0_real`` the real score's (CFG) prediction from its noised copy; it does not
    depend on any gradient, so a normalised gradient stays proportional to the raw one."""
    dims = tuple(range(1, x.ndim))
    return (x.detach().float() - x0_real.float()).abs().mean(dim=dims)


def smoothness_penalty(disc, x: Tensor, d_x: Tensor, sigma: float) -> Tensor:
    """Approximate R1 (on real inputs) or R2 (on fake ones): ``E ||D(x) - D(x + sigma eps)||^2``.

    A finite-difference stand-in for the gradient penalty ``||grad_x D(x)||^2`` without a double backward (the
    "approximated R1" of Lin et al. 2025, Seaweed-APT: sigma 0.01, weight 100).  ``disc(x) -> logits``; ``d_x`` are
    the logits already computed on ``x``.  Only the critic's parameters receive its gradient.
    """
    with torch.no_grad():
        x_noisy = x + sigma * torch.randn_like(x)
    return (d_x.float() - disc(x_noisy).float()).pow(2).mean()


def critic_penalties(disc, x_real, d_real, x_fake, d_fake, cfg) -> tuple[Tensor | float, dict[str, float]]:
    """``cfg.r1_weight`` x R1 + ``cfg.r2_weight`` x R2 (``smoothness_penalty``) and their log entries."""
    loss, logs = 0.0, {}
    for name, w, x, d in (("r1", cfg.r1_weight, x_real, d_real), ("r2", cfg.r2_weight, x_fake, d_fake)):
        if w > 0:
            pen = smoothness_penalty(disc, x, d, cfg.r1_sigma)
            loss, logs[f"loss/{name}"] = loss + w * pen, pen.item()
    return loss, logs


def check_penalties(cfg) -> None:
    for key in ("r1_weight", "r2_weight"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.r1_sigma <= 0:
        raise ValueError(f"r1_sigma must be > 0, got {cfg.r1_sigma}")


@dataclass
class ADMConfig:
    name: str = "adm"
    real_guidance: float | None = None  # None: the teacher's default CFG scale
    critic_every: int = 1  # the paper found 1:1 enough after ADP
    critic_warmup: int = 0  # iterations of critic-only updates (fake score + heads) before the student's first
    dt: float = 1 / 64  # ODE step size (T/64 in one description of the paper)
    t_min: float = 0.02  # x_t times; t - dt is clamped at 0
    t_max: float = 0.98
    solver: str = "ddim"  # the one-step ODE solver used by both score models
    fake_t_min: float = 1e-3
    gan_g_weight: float = 1.0
    gan_d_weight: float = 1.0
    # "none": the paper's generator loss -E[D(x_fake)] as is.  "dmd2": each sample's gradient of it divided by DMD2's
    # normaliser ``mean |x - x0_real|`` (``dmd2_scale``; x0_real the real score's CFG prediction at the same x_t, one
    # more teacher pass per student update), a scale that does not depend on the gradient.  ("sample", each sample's
    # gradient divided by its own rms, is gone: it gave a critic that knows nothing a unit push, issue 33.)
    grad_norm: Literal["none", "dmd2"] = "none"
    # The two ODE steps and the discriminator's passes run in float32 whatever the teacher's dtype: a bf16 teacher
    # computes in float32 layer by layer there (one layer's float32 copy at a time, ``PipelineBackbone.float32``).  At
    # dt = 1/64 bf16 moves the real step by 6% of the real-minus-fake gap on digits (benchmarks/adm_study/bf16_step.py).
    # False: the teacher's dtype
    float32_steps: bool = True
    head_arch: Literal["paper", "dmd2"] = "paper"  # conv heads: the paper's (appendix B.1) or DMD2's (nets/heads)
    # Optional regression anchor on teacher ODE pairs (collected or loaded by the set-up when it is on):
    # ``reg_weight * mse(G(noise_pair), x0_pair)``, into the student only.  0: the paper's pure-GAN ADM.
    reg_weight: float = 0.0
    # Optional DM term: ``dm_weight`` x DMD2's normalised DM loss (real minus fake score, on the student's samples
    # re-noised at t ~ U[t_min, t_max]) added to the student's loss.  Not in the paper, which replaces the DM loss;
    # 0: the paper's ADM
    dm_weight: float = 0.0
    # Critic smoothness penalties (``smoothness_penalty``), on the real step's latents (R1) and the fake step's (R2);
    # 0: off (the paper names none)
    r1_weight: float = 0.0
    r2_weight: float = 0.0
    r1_sigma: float = 0.01  # the perturbation's scale, for both
    # This stage's learning-rate multipliers, over ``train.lr_scale`` (the loop's ``stage_lr_scale``): in a DMDX
    # run, e.g. ``method.adm.lr_scale={"student": 0.2}`` gives ADM's stage another student rate than ADP's
    lr_scale: dict = field(default_factory=dict)


class ADM(Method):
    name = "adm"
    network_names = ("fake_score", "disc_heads")
    Config = ADMConfig

    @classmethod
    def pairs_needed(cls, cfg) -> bool:
        return cfg.reg_weight > 0

    @classmethod
    def check(cls, cfg: ADMConfig, shape) -> None:
        """Config-only checks, run at start-up (so DMDX refuses a bad ADM stage before its ADP stage trains)."""
        if not 0 < cfg.dt <= 1:
            raise ValueError(f"dt must be in (0, 1], got {cfg.dt}")
        if not 0 <= cfg.t_min < cfg.t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={cfg.t_min}, t_max={cfg.t_max}")
        if cfg.critic_every < 1:
            raise ValueError(f"critic_every must be >= 1, got {cfg.critic_every}")
        if cfg.critic_warmup < 0:
            raise ValueError(f"critic_warmup must be >= 0, got {cfg.critic_warmup}")
        if cfg.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {cfg.reg_weight}")
        if cfg.dm_weight < 0:
            raise ValueError(f"dm_weight must be >= 0, got {cfg.dm_weight}")
        if cfg.gan_g_weight == 0 and cfg.dm_weight == 0 and cfg.reg_weight == 0:
            raise ValueError("the student has no loss: gan_g_weight, dm_weight and reg_weight are all 0; set one > 0")
        if cfg.grad_norm not in ("none", "dmd2"):
            gone = " ('sample' was removed: it divided by the gradient's own rms)" if cfg.grad_norm == "sample" else ""
            raise ValueError(f"unknown grad_norm {cfg.grad_norm!r}; allowed: none, dmd2{gone}")
        if cfg.solver not in SOLVERS:
            raise ValueError(f"unknown solver {cfg.solver!r}; allowed: {', '.join(SOLVERS)}")
        check_penalties(cfg)

    def __init__(self, cfg: ADMConfig, ctx):
        super().__init__(cfg, ctx)
        self.check(cfg, ctx.shape)
        if cfg.reg_weight > 0 and ctx.pairs is None:
            raise ValueError("ADM's reg_weight > 0 needs teacher ODE pairs (the run's set-up collects them; "
                             "pairs.path to use existing ones)")
        self.fake_score = frozen_copy(ctx.teacher_net)
        self.disc = TeacherDiscriminator(ctx.teacher_net, ctx, cfg.head_arch)

    def networks(self):
        return {"fake_score": self.fake_score, "disc_heads": self.disc.heads}

    def phases(self):
        return [
            Phase("student", ("student",), self.student_loss, every=self.cfg.critic_every,
                  start=self.cfg.critic_warmup),
            Phase("critic", ("fake_score", "disc_heads"), self.critic_loss),
        ]

    def noised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        t = uniform_t(x.shape[0], cfg.t_min, cfg.t_max, x.device, self.ctx.schedule)
        s = self.ctx.schedule.training_time((t - cfg.dt).clamp(min=0.0))
        return self.ctx.schedule.add_noise(x, torch.randn_like(x), t), t, s

    def fake_step(self, x_t, t, s, cond):
        return ode_step(self.fake_score, self.ctx.schedule, x_t, t, s, cond, self.cfg.solver)

    def real_x0(self, x_t, t, cond):
        """The real score's x0 at (x_t, t): the teacher with CFG ``real_guidance`` (None: its default)."""
        return self.ctx.teacher(x_t, t, cond, guidance=self.ctx.real_guidance(self.cfg.real_guidance))

    def real_step(self, x_t, t, s, cond):
        return ode_step(self.real_x0, self.ctx.schedule, x_t, t, s, cond, self.cfg.solver)

    def steps_precision(self):
        """The block of ADM's ODE steps and discriminator passes: float32 unless ``float32_steps`` is off."""
        return self.ctx.float32(teacher=True) if self.cfg.float32_steps else contextlib.nullcontext()

    def student_loss(self):
        cfg, ctx = self.cfg, self.ctx
        x, cond, _ = ctx.student_x0(ctx.batch_size)
        logs = {}
        loss = x.new_zeros(())
        if cfg.gan_g_weight != 0:  # a term at weight 0 costs no pass (the DM-loss control of benchmarks/adm-study.md)
            with self.steps_precision():
                x_t, t, s = self.noised(x)
                d_fake = self.disc(self.fake_step(x_t, t, s, cond), s, cond)
                weight = None
                if cfg.grad_norm == "dmd2":
                    with torch.no_grad():
                        scale = dmd2_scale(x, self.real_x0(x_t, t, cond))
                    weight = 1 / scale.clamp_min(1e-12)
                    logs["adm/dmd2_scale"] = scale.mean().item()
            g = hinge_g(d_fake, weight)
            loss = cfg.gan_g_weight * g
            logs["loss/gan_g"] = g.item() if weight is None else hinge_g(d_fake).item()
        if self.cfg.dm_weight > 0:
            dm, dm_logs = dm_term(ctx, self.fake_score, x, cond, self.cfg.real_guidance, self.cfg.t_min,
                                  self.cfg.t_max)
            loss, logs = loss + self.cfg.dm_weight * dm, {**logs, **dm_logs}
        if self.cfg.reg_weight > 0:
            noise, x0, pcond = ctx.pairs.batch(ctx.batch_size, ctx.device)
            reg = F.mse_loss(ctx.student(ctx.schedule.prior(noise), ctx.times[0], pcond).float(), x0.float())
            loss = loss + self.cfg.reg_weight * reg
            logs["loss/reg"] = reg.item()
        return loss, logs

    def critic_loss(self):
        cfg, ctx = self.cfg, self.ctx
        with torch.no_grad():
            x, cond, _ = ctx.student_x0(ctx.batch_size, grad=False)
        fake = dsm_loss(self.fake_score, x, cond, cfg.fake_t_min)
        if cfg.gan_d_weight == 0:  # the heads do not train: no ODE step, no discriminator pass
            return fake, {"loss/fake_dsm": fake.item()}
        with self.steps_precision():
            with torch.no_grad():
                x_t, t, s = self.noised(x)
                x_real = self.real_step(x_t, t, s, cond)
                x_fake = self.fake_step(x_t, t, s, cond)
            d_real, d_fake = self.disc(x_real, s, cond), self.disc(x_fake, s, cond)
            pen, pen_logs = critic_penalties(lambda z: self.disc(z, s, cond), x_real, d_real, x_fake, d_fake, cfg)
        d = hinge_d(d_real, d_fake)
        logs = {"loss/gan_d": d.item(), "loss/fake_dsm": fake.item(), "gan/d_real": d_real.mean().item(),
                "gan/d_fake": d_fake.mean().item(), **pen_logs}
        logs.update(critic_logs(d_real, d_fake, "adm"))
        logs.update(critic_gap(x_real - x_fake, x_fake, "adm"))  # the signal it has: (g - 1) dt / t (docs/methods.md)
        return cfg.gan_d_weight * (d + pen) + fake, logs
