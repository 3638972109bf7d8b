"""CPU speed of dmdx's UNet vs the diffusers UNet2DModel wrapper: 16x16x1, batch 64, forward + backward.

Usage: python benchmarks/unet_speed.py [--threads 2] [--iters 10] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from dmdx.nets import DiffusersUNet2D, UNet

# (label, class, constructor kwargs); same kwargs for both, plus one param-matched pair.
CONFIGS = [
    ("dmdx UNet base32 (1,2) nrb1", UNet, dict(base_channels=32)),
    ("diffusers UNet2D base32 (1,2) nrb1", DiffusersUNet2D, dict(base_channels=32)),
    ("dmdx UNet base34 (1,2) nrb1", UNet, dict(base_channels=34)),
]


def bench(net: torch.nn.Module, batch: int, iters: int, warmup: int = 3) -> float:
    """Mean milliseconds of one forward + backward of a denoising MSE."""
    x = torch.randn(batch, 1, 16, 16)
    t = torch.rand(batch) * 1000
    cond = {"labels": torch.randint(0, 10, (batch,))}
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        loss = (net(x, t, cond) - x).square().mean()
        loss.backward()
        net.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * sum(times) / len(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, 1x16x16, fwd+bwd")
    print("| model | params | ms/iter |\n|---|---:|---:|")
    for label, cls, kw in CONFIGS:
        torch.manual_seed(0)
        net = cls(in_channels=1, image_size=16, num_classes=10, **kw)
        params = sum(p.numel() for p in net.parameters())
        print(f"| {label} | {params:,} | {bench(net, args.batch, args.iters):.1f} |", flush=True)


if __name__ == "__main__":
    main()
