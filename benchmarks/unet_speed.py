"""CPU speed of dmdx's UNet vs the diffusers UNet2DModel wrapper: 16x16x1, batch 64, forward + backward.

Usage: python benchmarks/unet_speed.py [--threads 2] [--iters 10] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dmdx.nets import DiffusersUNet2D, UNet

# (label, class, constructor kwargs): the same kwargs for both, and a dmdx UNet with more parameters than diffusers.
# (Odd widths such as 34 channels are slow on CPU, so widths stay multiples of 16.)
CONFIGS = [
    ("dmdx UNet base32 (1,2) nrb1", UNet, dict(base_channels=32)),
    ("diffusers UNet2D base32 (1,2) nrb1", DiffusersUNet2D, dict(base_channels=32)),
    ("dmdx UNet base32 (1,2) nrb2", UNet, dict(base_channels=32, num_res_blocks=2)),
]


def step(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> float:
    """Seconds for one forward + backward of a denoising MSE."""
    start = time.perf_counter()
    loss = (net(x, t, cond) - x).square().mean()
    loss.backward()
    net.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, 1x16x16, fwd+bwd")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 16, 16)
    t = torch.rand(args.batch) * 1000
    cond = {"labels": torch.randint(0, 10, (args.batch,))}
    nets = [cls(in_channels=1, image_size=16, num_classes=10, **kw) for _, cls, kw in CONFIGS]
    for net in nets:  # warm-up
        for _ in range(3):
            step(net, x, t, cond)
    # Interleave the models so that background load hits them alike; report the median.
    times = [[] for _ in nets]
    for _ in range(args.iters):
        for i, net in enumerate(nets):
            times[i].append(step(net, x, t, cond))
    print("| model | params | median ms/iter | min ms/iter |\n|---|---:|---:|---:|")
    for (label, _, _), net, ts in zip(CONFIGS, nets, times):
        params = sum(p.numel() for p in net.parameters())
        print(f"| {label} | {params:,} | {1000 * statistics.median(ts):.1f} | {1000 * min(ts):.1f} |")


if __name__ == "__main__":
    main()
