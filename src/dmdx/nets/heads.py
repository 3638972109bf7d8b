"""Discriminator heads on backbone features: the ADM paper's heads (appendix B.1) and DMD2's GAN classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..denoiser import FeatureTap
from .unet import num_groups

Tensor = torch.Tensor


HEAD_ARCHS = ("paper", "dmd2")


class ConvHead(nn.Module):
    """A conv discriminator head on one feature map, ``[B, C, *spatial] -> [B]`` logits.

    ``arch="paper"``, the ADM paper's appendix B.1 as third parties read it: ``hidden`` (default 256) channels,
    3 x [conv 4x4 stride 2, GroupNorm(32), SiLU], then conv 3x3 + GroupNorm + SiLU, global average pooling and a
    linear layer to one logit.  Small maps cannot take three stride-2 convs: an axis already at size 1 is not
    strided again (that conv becomes 3x3, stride 1, padding 1), so an 8x8 map goes 4, 2, 1, a 2x2 map 1, 1, 1, and
    a 1x1 map stays 1x1 through every layer.

    ``arch="dmd2"``, DMD2's GAN classifier: [conv 4x4 s2, GroupNorm, SiLU] until the spatial size is 1, then a 1x1
    conv to a logit; ``hidden`` defaults to ``max(in_channels, 16)``.

    ``dims=2`` takes feature maps [B, C, H, W], ``dims=3`` video latents [B, C, T, H, W] (3x3x3 convs in the paper
    design; the pooling covers time).  Odd sizes (7 -> 3 -> 1) and unequal axes (T=2, H=W=8) work.
    """

    def __init__(self, in_channels: int, spatial: Sequence[int], hidden: int | None = None, dims: int = 2,
                 arch: str = "dmd2"):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if arch not in HEAD_ARCHS:
            raise ValueError(f"unknown head arch {arch!r}; allowed: {', '.join(HEAD_ARCHS)}")
        spatial = list(spatial)
        assert len(spatial) == dims, f"spatial {spatial} does not match dims={dims}"
        self.arch = arch
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
        layers: list[nn.Module] = []
        if arch == "paper":
            hidden = hidden or 256
            groups = num_groups(hidden, max_groups=32)
            ch = in_channels
            for _ in range(3):
                # a stride-2 conv (k4 p1 in 2-D, k3 p1 for video) on axes > 1, k3 s1 p1 on axes already at 1
                k4 = 4 if dims == 2 else 3
                k, st, p = zip(*[(k4, 2, 1) if n > 1 else (3, 1, 1) for n in spatial])
                layers += [conv(ch, hidden, k, stride=st, padding=p), nn.GroupNorm(groups, hidden), nn.SiLU()]
                ch = hidden
                spatial = [_strided(n, k4) if n > 1 else 1 for n in spatial]
            layers += [conv(hidden, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU(), pool(1),
                       nn.Flatten(1), nn.Linear(hidden, 1)]
        else:
            hidden = hidden or max(in_channels, 16)
            # GroupNorm on the last, 1x1 map normalises each group over its channels alone: with one or two
            # channels per group (32 groups of a 32- or 64-channel map) the output is constant and the head is blind
            # to its input.  At least 16 channels per group (DMD2's 1280-channel head: 32 groups of 40) keeps it
            # informative.
            groups = num_groups(hidden, max_groups=max(1, min(32, hidden // 16)))
            ch = in_channels
            while max(spatial) > 1:
                # k4 s2 p1 maps n >= 2 to floor(n / 2); axes already at 1 (a short time axis) get a k1 s1 p0 conv.
                k, st, p = zip(*[(4, 2, 1) if n > 1 else (1, 1, 0) for n in spatial])
                layers += [conv(ch, hidden, k, stride=st, padding=p), nn.GroupNorm(groups, hidden), nn.SiLU()]
                ch = hidden
                spatial = [n // 2 if n > 1 else 1 for n in spatial]
            layers += [pool(1), conv(ch, 1, 1), nn.Flatten(1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, 0]


def _strided(n: int, k: int) -> int:
    """Output size of a stride-2 conv with kernel k and padding 1 on an axis of size n."""
    return (n + 2 - k) // 2 + 1


class VectorHead(nn.Module):
    """MLP head for vector features [B, F] -> logits [B]."""

    def __init__(self, in_features: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        f = in_features
        for _ in range(depth):
            layers += [nn.Linear(f, hidden), nn.SiLU()]
            f = hidden
        layers.append(nn.Linear(f, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, 0]


class MultiHead(nn.Module):
    """One head per feature tensor; ``forward(features) -> [B, n_heads]`` per-head logits.

    ``shapes`` are per-sample feature shapes (no batch dim): (F,) gets a :class:`VectorHead`, (C, H, W) a 2-D
    and (C, T, H, W) a 3-D :class:`ConvHead`.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], hidden: int | None = None, arch: str = "dmd2"):
        super().__init__()
        heads = []
        for shape in shapes:
            shape = tuple(shape)
            if len(shape) == 1:
                heads.append(VectorHead(shape[0], hidden or 256))
            elif len(shape) in (3, 4):
                heads.append(ConvHead(shape[0], shape[1:], hidden, dims=len(shape) - 1, arch=arch))
            else:
                raise ValueError(f"feature shape {shape} not supported; allowed: (F,), (C, H, W), (C, T, H, W)")
        self.heads = nn.ModuleList(heads)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        assert len(features) == len(self.heads), f"{len(features)} features for {len(self.heads)} heads"
        # Features come in the backbone's dtype (bf16 for the default pipeline teacher); the heads train in float32
        # (bf16 autocast, when on, still casts inside each op).  The cast keeps gradients flowing to the input.
        dtype = next(self.parameters()).dtype
        return torch.stack([head(f.to(dtype)) for head, f in zip(self.heads, features)], dim=1)


@torch.no_grad()
def feature_shapes(backbone: nn.Module, x: Tensor, time: Tensor, cond=None) -> list[tuple[int, ...]]:
    """Per-sample shapes of ``backbone.feature_layers`` outputs, from one no-grad forward pass (stopped at the last)."""
    with FeatureTap(backbone, backbone.feature_layers, stop=True) as tap:
        backbone(x, time, cond)
    return [tuple(f.shape[1:]) for f in tap.features]
