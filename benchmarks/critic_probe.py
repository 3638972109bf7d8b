"""Probes of the latent discriminators (frozen teacher features + trainable heads); heads only, fixed networks.

ADP's critic: can it separate the teacher's one-step output (the student's initial output) from real digits?
    python benchmarks/critic_probe.py --t-max 1.0     # re-noising times uniform in [0, 1]  (ADP's default)
    python benchmarks/critic_probe.py --t-max 0.3
    python benchmarks/critic_probe.py --t-max 0.5 --head-arch paper   # the ADM paper's heads (appendix B.1)
ADM's critic at a saved ADM run's latest checkpoint (student and fake score frozen there): how far apart are the
real- and fake-score ODE steps, and how fast do fresh heads learn to tell them apart?
    python benchmarks/critic_probe.py --adm-run RUN [--dt 0.25] [--t-max 0.98]
Both print the hinge loss (chance: 2.0) while training the heads.
Where ADM's student gradient points, with the run's own trained heads: per sample, the cosine between the ADM
generator's move of x0 (``d D(x_fake) / d x0``) and the DM loss's move (``x0_real(x_t) - x0_fake(x_t)``, DMD2's
direction) at the same x_t, by time:
    python benchmarks/critic_probe.py --adm-run RUN --align
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from dmdx.data import load_dataset
from dmdx.methods.adm import TeacherDiscriminator, hinge_d
from dmdx.teachers import load_model


def train_heads(disc, batches, steps: int, lr: float):
    n = sum(p.numel() for p in disc.heads.parameters())
    print(f"heads: {[tuple(h.net[0].weight.shape) for h in disc.heads.heads]}, {n / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(disc.heads.parameters(), lr=lr)
    t0 = time.perf_counter()
    for it in range(steps):
        real, fake, t, cond = batches()
        loss = hinge_d(disc(real, t, cond), disc(fake, t, cond))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 25 == 0 or it == steps - 1:
            print(f"step {it:4d}  hinge loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)


def adp_probe(args):
    model = load_model(args.teacher)
    den, guidance = model.denoiser.requires_grad_(False), model.info.guidance
    ds = load_dataset(args.data)
    x_all, y_all = ds.x, ds.labels
    shape = tuple(x_all.shape[1:])
    ctx = SimpleNamespace(noise=lambda n: torch.randn(n, *shape), device=torch.device("cpu"),
                          cond=lambda n: {"labels": torch.zeros(n, dtype=torch.long)})

    @torch.no_grad()
    def batches():
        idx = torch.randint(len(x_all), (args.batch,))
        cond = {"labels": y_all[idx]}
        fake = den(torch.randn(args.batch, *shape), torch.ones(args.batch, dtype=torch.float64), cond,
                   guidance=guidance)
        t = torch.rand(args.batch, dtype=torch.float64) * args.t_max
        return (den.schedule.add_noise(x_all[idx], torch.randn(args.batch, *shape), t),
                den.schedule.add_noise(fake, torch.randn(args.batch, *shape), t), t, cond)

    train_heads(TeacherDiscriminator(den, ctx, args.head_arch), batches, args.steps, args.lr)


def adm_probe(args):
    from dmdx.train.checkpoint import latest_checkpoint
    from dmdx.train.loop import Trainer
    from dmdx.teachers import build_run
    from dmdx.train.run import load_run_config

    run = Path(args.adm_run)
    cfg = load_run_config(run)
    scratch = Path(args.scratch)
    ctx, info = build_run(cfg, scratch)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"{run} has no checkpoint")
    method = Trainer(scratch, cfg.method, cfg.train, ctx, info).restore(ckpt).method
    if not hasattr(method, "real_step"):
        raise SystemExit(f"{run}: the checkpoint's stage is {method.name}, not ADM")
    if args.dt is not None:
        method.cfg.dt = args.dt
    if args.align:
        return align_probe(method, ctx, args)
    method.cfg.t_max = args.t_max
    print(f"{run}, step {ckpt['step']}, dt {method.cfg.dt}, t in [{method.cfg.t_min}, {method.cfg.t_max}]")
    with torch.no_grad():
        for t0 in (0.1, 0.25, 0.5, 0.75, 0.9):
            x, cond, _ = ctx.student_x0(256, grad=False)
            t = torch.full((256,), t0, dtype=torch.float64)
            s = (t - method.cfg.dt).clamp(min=0.0)
            x_t = ctx.schedule.add_noise(x, torch.randn_like(x), t)
            xr, xf = method.real_step(x_t, t, s, cond), method.fake_step(x_t, t, s, cond)
            _, sigma_s = ctx.schedule.alpha_sigma(s[:1])
            print(f"t {t0:.2f} -> {float(s[0]):.2f}: rms(x_real - x_fake) {(xr - xf).pow(2).mean().sqrt():.4f}, "
                  f"rms(x_real - x_t) {(xr - x_t).pow(2).mean().sqrt():.4f}, noise std at s {float(sigma_s):.3f}")

    @torch.no_grad()
    def batches():
        x, cond, _ = ctx.student_x0(args.batch, grad=False)
        x_t, t, s = method.noised(x)
        return method.real_step(x_t, t, s, cond), method.fake_step(x_t, t, s, cond), s, cond

    train_heads(TeacherDiscriminator(ctx.teacher_net, ctx, args.head_arch), batches, args.steps, args.lr)


def align_probe(method, ctx, args):
    """Cosine between ADM's generator direction on x0 and the DM direction, both from the same x_t."""
    cfg, g = method.cfg, ctx.real_guidance(method.cfg.real_guidance)
    print(f"dt {cfg.dt}; per-sample cosine of dD(x_fake)/dx0 with x0_real(x_t) - x0_fake(x_t), {args.batch} samples "
          "per time; |dm| = rms of the DM direction, |adm| = rms of dD/dx0")
    print("| t | cosine mean | cosine median | fraction > 0 | abs(dm) | abs(adm) |")
    print("|---|---|---|---|---|---|")
    for t0 in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9):
        x, cond, _ = ctx.student_x0(args.batch, grad=False)
        x = x.detach().requires_grad_(True)
        t = torch.full((args.batch,), t0, dtype=torch.float64)
        s = ctx.schedule.training_time((t - cfg.dt).clamp(min=0.0))
        x_t = ctx.schedule.add_noise(x, torch.randn_like(x), t)
        d = method.disc(method.fake_step(x_t, t, s, cond), s, cond).mean(dim=1).sum()
        (adm,) = torch.autograd.grad(d, x)
        with torch.no_grad():
            dm = ctx.teacher(x_t, t, cond, guidance=g) - method.fake_score(x_t, t, cond)
        cos = torch.nn.functional.cosine_similarity(adm.flatten(1).float(), dm.flatten(1).float(), dim=1)
        print(f"| {t0:.2f} | {cos.mean():.3f} | {cos.median():.3f} | {(cos > 0).float().mean():.2f} | "
              f"{dm.pow(2).mean().sqrt():.4f} | {adm.pow(2).mean().sqrt():.2e} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="src/dmdx/assets/teacher_digits")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--adm-run", help="probe ADM's critic at this run's latest checkpoint instead of ADP's")
    ap.add_argument("--scratch", default="runs/critic-probe", help="scratch folder for rebuilding the ADM run")
    ap.add_argument("--dt", type=float, help="ADM step size (default: the run's)")
    ap.add_argument("--t-max", type=float, default=None)
    ap.add_argument("--align", action="store_true", help="with --adm-run: ADM's student direction against DM's")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--head-arch", default="dmd2", choices=["paper", "dmd2"], help="conv head design (nets/heads)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.adm_run:
        args.t_max = 0.98 if args.t_max is None else args.t_max
        adm_probe(args)
    else:
        args.t_max = 1.0 if args.t_max is None else args.t_max
        adp_probe(args)


if __name__ == "__main__":
    main()
