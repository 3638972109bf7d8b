"""The fake score's GAN feature pass (``Fg+`` of real_size.py: forward to the bottleneck DMD2's GAN head reads,
backward from it into the fake score's weights) whole and stopped at the bottleneck (``Denoiser.features``), timed
alternately in one process on a pipeline folder (issue 34).

    python benchmarks/feature_pass.py --teacher /tmp/size/full/sd15 --reps 3 \
        --set real.resolution=256 --set real.student_lora.rank=64 --set real.fake_lora.rank=64 \
        --set real.shared_base=true --set real.grad_checkpointing=true --set train.batch_size=1

Prints the CPU seconds (``time.process_time()``) and wall seconds of each pass and the means.  The whole pass is
what ``FeatureTap`` without ``stop`` runs (as under FSDP2, where the tap never stops).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from real_size import real_data, rss, run_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import dmdx.denoiser
    from dmdx.denoiser import FeatureTap
    from dmdx.pipelines.image import latent_shape, vae_scale_factor
    from dmdx.teachers import build_run
    from dmdx.train.loop import Trainer

    torch.manual_seed(0)
    teacher = Path(args.teacher)
    root = Path(tempfile.mkdtemp(prefix="feature-pass-"))
    cfg = run_config("dmd2", teacher, root, args.sets, video=False)
    _, h, w = latent_shape(teacher, cfg.real.resolution)
    vs = vae_scale_factor(teacher)
    real_data(root, (h * vs, w * vs))
    ctx, info = build_run(cfg, root / "run")
    stage = Trainer(root / "run", cfg.method, cfg.train, ctx, info).build_stage(0)
    net, layers = stage.method.fake_score, [stage.method.bottleneck]
    net.requires_grad_(True)  # as the critic phase sets it
    n = ctx.batch_size

    def run(stop: bool) -> tuple[float, float]:
        x, t, cond = ctx.noise(n), torch.full((n,), 0.5, dtype=torch.float64), ctx.cond(n)
        t0, c0 = time.perf_counter(), time.process_time()
        if stop:
            (f,) = net.features(x, t, cond, layers)
        else:
            with FeatureTap(net.backbone, layers) as tap:
                net.predict(x, t, cond)
            (f,) = tap.features
        f.float().square().mean().backward()
        secs = time.perf_counter() - t0, time.process_time() - c0
        net.zero_grad(set_to_none=True)
        return secs

    assert not dmdx.denoiser._sharded(net.backbone)
    run(True)  # first calls (allocations) are not timed
    times: dict[str, list[tuple[float, float]]] = {"whole": [], "stopped": []}
    for _ in range(args.reps):
        for name in times:
            times[name].append(run(name == "stopped"))
            print(f"{name}: {times[name][-1][1]:.2f} CPU-s, {times[name][-1][0]:.2f} s, RSS {rss() / 2**30:.2f} GiB",
                  flush=True)
    for name, v in times.items():
        print(f"{name} mean: {statistics.mean(c for _, c in v):.2f} CPU-s, {statistics.mean(s for s, _ in v):.2f} s "
              f"({args.reps} passes)")


if __name__ == "__main__":
    main()
