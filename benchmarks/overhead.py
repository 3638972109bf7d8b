"""Training-loop overhead: time of each DMD2 / ADM phase vs the sum of the network passes it needs.

    python benchmarks/overhead.py --teacher runs/teacher-digits --batch 64 --reps 20
The floor times each pass the phase makes (forward, or forward + backward) on its own with the same shapes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dmdx.train.loop import Trainer
from dmdx.teachers import build_run
from dmdx.train.run import default_run_config


def timeit(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def passes(ctx, fake, B: int, reps: int) -> dict[str, float]:
    x = ctx.noise(B)
    t = torch.rand(B, dtype=torch.float64)
    cond = ctx.cond(B)

    def fwd(net, n=B, grad=False):
        def f():
            with torch.set_grad_enabled(grad):
                xx = ctx.noise(n).requires_grad_(grad)
                out = net(xx, torch.rand(n, dtype=torch.float64), ctx.cond(n))
                if grad:
                    out.square().mean().backward()
        return f

    del x, t, cond
    return {"student fwd+bwd": timeit(fwd(ctx.student, grad=True), reps),
            "student fwd": timeit(fwd(ctx.student), reps),
            "teacher fwd (CFG, 2B)": timeit(fwd(ctx.teacher, n=2 * B), reps),
            "fake fwd": timeit(fwd(fake), reps),
            "fake fwd+bwd": timeit(fwd(fake, grad=True), reps)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for method in ("dmd2", "adm"):
        cfg = default_run_config(method)
        cfg.teacher = args.teacher
        cfg.train.batch_size = args.batch
        cfg.train.progress = False
        with tempfile.TemporaryDirectory() as d:
            ctx, info = build_run(cfg, Path(d))
            tr = Trainer(Path(d), cfg.method, cfg.train, ctx, info)
            stage = tr.build_stage(0)
            p = passes(ctx, stage.method.fake_score, args.batch, args.reps)
            for phase in stage.method.phases():
                ph = timeit(lambda: tr.run_phase(stage, phase, 0), args.reps)
                if method == "dmd2":
                    need = {"student": ["student fwd+bwd", "teacher fwd (CFG, 2B)", "fake fwd", "fake fwd+bwd"],
                            "critic": ["student fwd", "fake fwd+bwd", "fake fwd+bwd", "fake fwd+bwd"]}[phase.name]
                else:  # ADM: D is the frozen teacher backbone + heads, costed as a fake fwd+bwd pass
                    need = {"student": ["student fwd+bwd", "fake fwd+bwd", "fake fwd+bwd"],
                            "critic": ["student fwd", "teacher fwd (CFG, 2B)", "fake fwd", "fake fwd+bwd",
                                       "fake fwd+bwd", "fake fwd+bwd"]}[phase.name]
                floor = sum(p[k] for k in need)
                rows.append((method, phase.name, ph * 1000, floor * 1000, ph / floor, " + ".join(need)))
    print(f"batch {args.batch}, {torch.get_num_threads()} threads\n")
    print("| method | phase | phase ms | floor ms | ratio | passes in the floor |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]} |")


if __name__ == "__main__":
    main()
