"""DMD (Yin et al. 2023, arXiv 2311.18828): distribution matching plus a regression loss on teacher ODE pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .dmd2 import DMD2, DMD2Config


LPIPS_MIN_SIZE = 64  # LPIPS was calibrated on 64x64 patches; its VGG needs at least 16x16 (four 2x poolings)


def lpips_input(x):
    """Images in [-1, 1] as LPIPS takes them: grey repeated to RGB, sides below 64 upsampled (bilinear) to 64."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if min(h, w) < LPIPS_MIN_SIZE:
        k = LPIPS_MIN_SIZE / min(h, w)
        x = F.interpolate(x, size=(round(h * k), round(w * k)), mode="bilinear", align_corners=False)
    return x


@dataclass
class DMDConfig(DMD2Config):
    name: str = "dmd"
    critic_every: int = 1  # the original DMD updates the fake score and the student alternately
    gan: bool = False
    reg_weight: float = 0.25  # lambda_reg of the DMD paper
    reg_loss: str = "mse"  # "mse", or "lpips" when the lpips package is installed (images only)


class DMD(DMD2):
    name = "dmd"
    Config = DMDConfig
    needs_pairs = True

    @classmethod
    def check(cls, cfg: DMDConfig, shape) -> None:
        if cfg.reg_loss not in ("mse", "lpips"):
            raise ValueError(f"unknown reg_loss {cfg.reg_loss!r}; allowed: mse, lpips")
        if cfg.reg_loss == "lpips":
            if len(shape) != 3:
                raise ValueError("reg_loss=lpips needs image data")
            if shape[0] not in (1, 3):
                raise ValueError(f"reg_loss=lpips compares RGB or grey images, but this teacher works on "
                                 f"{shape[0]}-channel latents (LPIPS through the VAE decoder is not "
                                 "implemented); use reg_loss=mse")
            try:
                import lpips  # noqa: F401
            except ImportError:
                raise ValueError("reg_loss=lpips needs the lpips package (pip install lpips) and its weights "
                                 "installed locally") from None

    def __init__(self, cfg: DMDConfig, ctx):
        super().__init__(cfg, ctx)
        self.check(cfg, ctx.shape)
        self.lpips = None
        if cfg.reg_loss == "lpips":
            import lpips

            self.lpips = lpips.LPIPS(net="vgg", pretrained=True).to(ctx.device).eval().requires_grad_(False)

    def student_extra(self, x, cond):
        """Regression on teacher pairs: the one-step student from the pair's noise should give the teacher's x0."""
        ctx = self.ctx
        noise, x0, pcond = ctx.pairs.batch(ctx.batch_size, ctx.device)
        pred = ctx.student(ctx.schedule.prior(noise), ctx.times[0], pcond)
        if self.lpips is not None:
            reg = self.lpips(lpips_input(pred), lpips_input(x0)).mean()
        else:
            reg = F.mse_loss(pred, x0)
        return self.cfg.reg_weight * reg, {"loss/reg": reg.item()}
