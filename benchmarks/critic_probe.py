"""Can the latent discriminator separate the teacher's one-step output from real data?  Heads only, fixed student.

    python benchmarks/critic_probe.py --t-max 1.0     # re-noising times uniform in [0, 1]  (ADP's default)
    python benchmarks/critic_probe.py --t-max 0.3
Trains the heads of ADM/ADP's TeacherDiscriminator (frozen teacher features) with the hinge loss on real digits vs
the teacher's one-step x0 (the student's initial output), both re-noised at the same time, and prints the loss.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from dmdx.data import load_dataset
from dmdx.methods.adm import TeacherDiscriminator, hinge_d
from dmdx.models import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="src/dmdx/assets/teacher_digits")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--t-max", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(args.teacher)
    den, guidance = model.denoiser.requires_grad_(False), model.info.guidance
    ds = load_dataset(args.data)
    x_all, y_all = ds.x, ds.labels
    shape = tuple(x_all.shape[1:])
    ctx = SimpleNamespace(noise=lambda n: torch.randn(n, *shape), device=torch.device("cpu"),
                          cond=lambda n: {"labels": torch.zeros(n, dtype=torch.long)})
    disc = TeacherDiscriminator(den, ctx)
    opt = torch.optim.AdamW(disc.heads.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for it in range(args.steps):
        idx = torch.randint(len(x_all), (args.batch,))
        cond = {"labels": y_all[idx]}
        with torch.no_grad():
            ones = torch.ones(args.batch, dtype=torch.float64)
            fake = den(torch.randn(args.batch, *shape), ones, cond, guidance=guidance)
            t = torch.rand(args.batch, dtype=torch.float64) * args.t_max
            r_t = den.schedule.add_noise(x_all[idx], torch.randn(args.batch, *shape), t)
            f_t = den.schedule.add_noise(fake, torch.randn(args.batch, *shape), t)
        loss = hinge_d(disc(r_t, t, cond), disc(f_t, t, cond))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 15 == 0 or it == args.steps - 1:
            print(f"step {it:4d}  hinge loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
