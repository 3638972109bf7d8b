"""How much bf16 moves ADM's real ODE step, against the real-minus-fake gap the critic has to see.

    python benchmarks/adm_study/bf16_step.py [--teacher digits] [--n 256]
The shipped teacher's 10-step samples are noised at t ~ U[0.02, 0.98]; from each x_t one DDIM step of size dt is taken
with the real score (the teacher with its CFG) in float32 and under bf16 autocast, and with a stand-in fake score
(the same teacher without CFG) in float32: the gap a critic sees at the start of ADM, when the fake score is the
teacher.  Prints rms(real bf16 - real float32), rms(real - fake) and their ratio for dt = 1/64, 0.25, 1.
"""

import argparse

import torch

from dmdx.demo import shipped_teacher
from dmdx.teachers import load_model
from dmdx.sampling import ode_step, sample_ode

p = argparse.ArgumentParser()
p.add_argument("--teacher", default="digits")
p.add_argument("--n", type=int, default=256)
args = p.parse_args()
torch.manual_seed(0)
model = load_model(str(shipped_teacher(args.teacher)))
den, g = model.denoiser.eval(), model.info.guidance
cond = {"labels": torch.arange(args.n) % 10}
x0 = sample_ode(lambda a, b, c: den(a, b, c, guidance=g), den.schedule, torch.randn(args.n, *model.info.shape), 10,
                cond)


def real(x, t, c):
    return den(x, t, c, guidance=g)


def rms(v):
    return v.pow(2).mean().sqrt().item()


for dt in (1 / 64, 0.25, 1.0):
    t = 0.02 + 0.96 * torch.rand(args.n, dtype=torch.float64)
    s = (t - dt).clamp(min=0)
    x_t = den.schedule.add_noise(x0, torch.randn_like(x0), t)
    with torch.no_grad():
        r32, f32 = ode_step(real, den.schedule, x_t, t, s, cond), ode_step(den, den.schedule, x_t, t, s, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r16 = ode_step(real, den.schedule, x_t, t, s, cond)
    print(f"dt {dt:.4f}, guidance {g}: rms(real bf16 - real float32) {rms(r16 - r32):.2e}, "
          f"rms(real - fake) {rms(r32 - f32):.2e}, ratio {rms(r16 - r32) / rms(r32 - f32):.3f}")
