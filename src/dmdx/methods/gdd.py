"""GDD, "Diffusion Models Are Innate One-Step Generators" (Zheng & Yang 2024, arXiv 2405.20750): distillation by a
GAN loss alone, with most of the student frozen (GDD-I).

The one-step student starts as the teacher and is trained only by a non-saturating GAN (``training/loss.py`` of
github.com/Zyriix/GDD, ``loss_type='ns'``): student ``softplus(-D(G(z)))``; critic ``softplus(D(G(z))) +
softplus(-D(real))`` plus an R1 penalty on the real samples (``r1_gamma=1e-4``).  No score, no regression: the
"exclusive distributional loss" of the abstract.  The real samples are the teacher's own (its ODE pairs' x0, which
the run's set-up collects; ``real=pairs``) or the dataset (``real=data``, the paper's setting).

GDD-I freezes the student's convolutions inside its blocks (``--freeze=1``: parameters named ``conv`` or ``proj``
in the UNet blocks) and trains the rest (normalisation, embeddings and their per-block projections, attention
``qkv``, skip connections, input and output layers).  Here ``freeze=conv`` freezes every spatial convolution
(kernel > 1) but the network's first and last; LoRA adapters are never frozen (a LoRA student trains only them).

Discriminator (ours, see docs/methods.md): GDD's is a projected GAN on frozen ImageNet networks (EfficientNet-lite0
with VGG16 or DeiT), which are not available offline.  dmdx uses ADP's two critics: trainable heads on the frozen
teacher's features of the sample re-noised at ``t ~ U[0, d_t_max]`` (``TeacherDiscriminator``), and, where the run
has one (built-in image data, a pipeline's ``real.vision_encoder``), heads on a frozen pixel-space backbone
(``PixelDiscriminator``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .adm import TeacherDiscriminator, smoothness_penalty
from .adp import PixelDiscriminator
from .base import Method, Phase, critic_logs, uniform_t

Tensor = torch.Tensor


@dataclass
class GDDConfig:
    name: str = "gdd"
    # what the critic calls real: the teacher's samples (its ODE pairs) or the dataset (the paper's; --data)
    real: Literal["pairs", "data"] = "pairs"
    # "conv": GDD-I (the student's spatial convolutions frozen, but its first and last); "none": GDD (all trains);
    # "auto": "conv" where the student has such convolutions (UNets), else "none" (MLPs, transformers)
    freeze: Literal["auto", "conv", "none"] = "auto"
    latent_weight: float = 1.0  # the teacher-feature critic
    pixel_weight: float = 1.0  # the pixel-space critic, where the run has a pixel backbone; GDD sums its critics
    d_t_max: float = 0.5  # the teacher-feature critic sees samples re-noised at t ~ U[0, d_t_max] (GDD's: clean)
    # GDD's R1 (r1_gamma 1e-4, weight gamma / 2 on ||grad D||^2) as the finite-difference penalty
    # E (D(x) - D(x + sigma eps))^2 ~ sigma^2 ||grad D||^2 (adm.smoothness_penalty): weight gamma / (2 sigma^2)
    r1_weight: float = 0.5
    r1_sigma: float = 0.01
    # small heads: GDD's projected discriminators are 64 channels wide; the paper's ADM heads (256) cost 16x on
    # digits (docs/methods.md, ADM)
    head_arch: Literal["paper", "dmd2"] = "dmd2"


def frozen_convolutions(net: nn.Module) -> set[str]:
    """Names of the parameters GDD-I freezes in ``net``: those of every spatial convolution (some kernel side > 1)
    but the first and the last registered (the input and output layers), outside LoRA adapters."""
    convs = [(n, m) for n, m in net.named_modules()
             if isinstance(m, nn.modules.conv._ConvNd) and max(m.kernel_size) > 1 and "lora_" not in n]
    return {f"{n}.{pn}" for n, m in convs[1:-1] for pn, _ in m.named_parameters(recurse=False)}


class GDD(Method):
    name = "gdd"
    Config = GDDConfig
    network_names = ("latent_heads", "pixel_heads")
    uses_pixel_backbone = True

    @classmethod
    def pairs_needed(cls, cfg: GDDConfig) -> bool:
        return cfg.real == "pairs"

    @classmethod
    def check(cls, cfg: GDDConfig, shape) -> None:
        for key in ("latent_weight", "pixel_weight", "r1_weight"):
            if getattr(cfg, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
        if cfg.latent_weight == 0 and cfg.pixel_weight == 0:
            raise ValueError("GDD has no critic: latent_weight and pixel_weight are both 0")
        if not 0 <= cfg.d_t_max <= 1:
            raise ValueError(f"d_t_max must be in [0, 1], got {cfg.d_t_max}")
        if cfg.r1_sigma <= 0:
            raise ValueError(f"r1_sigma must be > 0, got {cfg.r1_sigma}")

    def __init__(self, cfg: GDDConfig, ctx):
        super().__init__(cfg, ctx)
        self.check(cfg, ctx.shape)
        if cfg.real == "data" and ctx.data is None:
            raise ValueError("GDD with real=data needs a dataset (--data); real=pairs uses the teacher's samples")
        if cfg.real == "pairs" and ctx.pairs is None:
            raise ValueError("GDD with real=pairs needs teacher ODE pairs (the run's set-up collects them; "
                             "pairs.path to use existing ones)")
        self.frozen = set() if cfg.freeze == "none" else frozen_convolutions(ctx.student)
        if cfg.freeze == "conv" and not self.frozen:
            raise ValueError(f"freeze=conv (GDD-I) freezes spatial convolutions, and this student "
                             f"({type(ctx.student.backbone).__name__}) has none besides its input and output layers "
                             "(an MLP or a transformer); allowed here: freeze=none (GDD) or auto")
        self.latent = None
        if cfg.latent_weight > 0:
            self.latent = TeacherDiscriminator(ctx.teacher_net, ctx, cfg.head_arch)
        self.pixel = None
        if cfg.pixel_weight > 0 and ctx.pixel_backbone is not None:
            self.pixel = PixelDiscriminator(ctx.pixel_backbone, ctx, cfg.head_arch)
        if self.latent is None and self.pixel is None:
            raise ValueError("GDD has no critic: latent_weight is 0 and this run has no pixel backbone")

    def networks(self):
        nets = {}
        if self.latent is not None:
            nets["latent_heads"] = self.latent.heads
        if self.pixel is not None:
            nets["pixel_heads"] = self.pixel.heads
        return nets

    def trainable(self, name: str):
        if name != "student" or not self.frozen:
            return None
        return lambda n, _p: n not in self.frozen

    def phases(self):
        # GDD's loop: the generator's update first, then the discriminator's, once each per iteration
        return [Phase("student", ("student",), self.student_loss), Phase("critic", tuple(self.networks()),
                                                                           self.critic_loss)]

    def real_batch(self) -> tuple[Tensor, object]:
        ctx = self.ctx
        if self.cfg.real == "data":
            return ctx.real_batch(ctx.batch_size)
        _, x0, cond = ctx.pairs.batch(ctx.batch_size, ctx.device)
        return x0, cond

    def critics(self, x: Tensor, cond) -> dict[str, tuple]:
        """Each critic's (weight, logits [B, heads], its D as a function of its input, that input) on samples ``x``
        (the teacher-feature critic's input is ``x`` re-noised)."""
        out = {}
        if self.latent is not None:
            t = uniform_t(x.shape[0], 0.0, self.cfg.d_t_max, x.device, self.ctx.schedule)
            x_t = self.ctx.schedule.add_noise(x, torch.randn_like(x), t)

            def d_latent(z, t=t):
                return self.latent(z, t, cond)

            out["latent"] = (self.cfg.latent_weight, d_latent(x_t), d_latent, x_t)
        if self.pixel is not None:
            out["pixel"] = (self.cfg.pixel_weight, self.pixel(x), self.pixel, x)
        return out

    def student_loss(self):
        ctx = self.ctx
        x, cond, _ = ctx.student_x0(ctx.batch_size)
        loss, logs = 0.0, {}
        for name, (w, d, _, _) in self.critics(x, cond).items():
            g = F.softplus(-d.float()).mean()
            loss, logs[f"loss/gan_g_{name}"] = loss + w * g, g.item()
        logs["loss/gan_g"] = float(loss.detach())
        return loss, logs

    def critic_loss(self):
        cfg, ctx = self.cfg, self.ctx
        with torch.no_grad():
            fake, fcond, _ = ctx.student_x0(ctx.batch_size, grad=False)
        real, rcond = self.real_batch()
        d_fake, d_real = self.critics(fake, fcond), self.critics(real, rcond)
        loss, logs = 0.0, {}
        for name, (w, df, _, _) in d_fake.items():
            _, dr, d_of, x_real = d_real[name]
            d = (F.softplus(df.float()) + F.softplus(-dr.float())).mean()
            term = d
            if cfg.r1_weight > 0:
                r1 = smoothness_penalty(d_of, x_real, dr, cfg.r1_sigma)
                term, logs[f"loss/r1_{name}"] = term + cfg.r1_weight * r1, r1.item()
            loss = loss + w * term
            logs[f"loss/gan_d_{name}"] = d.item()
            logs.update(critic_logs(dr, df, name))
        logs["loss/gan_d"] = float(loss.detach())
        return loss, logs
