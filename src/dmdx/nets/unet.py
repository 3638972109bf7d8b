"""Small class-conditional UNets for 8x8 to 32x32 images: our own, and a wrapper around diffusers' UNet2DModel.

Both follow the backbone contract of :mod:`dmdx.denoiser`: ``forward(x, time, cond) -> prediction``,
``null_cond(cond)``, ``feature_layers`` (shallow to deep, the last one the bottleneck) and ``config``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import LabelEmbedding, TimeEmbedding, null_labels

Tensor = torch.Tensor
Cond = dict[str, Tensor] | None


def num_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels`` (for GroupNorm)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding entering as scale and shift of the second norm."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over pixels, residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """``num_res_blocks`` ResBlocks, each optionally followed by attention; returns one tensor [B, C, h, w]."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_res_blocks: int, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, emb_dim) for i in range(num_res_blocks)
        )
        self.attn = nn.ModuleList(Attention(out_ch) if attention else nn.Identity() for _ in range(num_res_blocks))

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for block, attn in zip(self.blocks, self.attn):
            h = attn(block(h, emb))
        return h


class Mid(nn.Module):
    """The bottleneck: ResBlock, optional attention, ResBlock."""

    def __init__(self, ch: int, emb_dim: int, attention: bool):
        super().__init__()
        self.block1 = ResBlock(ch, ch, emb_dim)
        self.attn = Attention(ch) if attention else nn.Identity()
        self.block2 = ResBlock(ch, ch, emb_dim)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return self.block2(self.attn(self.block1(h, emb)), emb)


class UNet(nn.Module):
    """A small UNet: one skip per resolution level, stride-2 conv down, nearest up + conv.

    Level ``i`` runs at resolution ``image_size / 2**i`` with ``base_channels * channel_mult[i]`` channels; odd
    sizes work (28 -> 14 -> 7 -> 4 and back, upsampling to the skip's exact size). With ``attention=True`` the
    lowest-resolution level and the bottleneck get self-attention. Features: ``down.i`` is level i's output
    before downsampling, ``mid`` the bottleneck.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 16,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        num_classes: int = 0,
        time_dim: int = 128,
        attention: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            base_channels=base_channels,
            channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks,
            num_classes=num_classes,
            time_dim=time_dim,
            attention=attention,
        )
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        chans = [base_channels * m for m in channel_mult]
        n = len(chans)
        self.time_embed = TimeEmbedding(time_dim, emb_dim)
        self.label_embed = LabelEmbedding(num_classes, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = base_channels
        for i, c in enumerate(chans):
            self.down.append(Level(ch, c, emb_dim, num_res_blocks, attention and i == n - 1))
            ch = c
            if i < n - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = Mid(ch, emb_dim, attention)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(n)):
            c = chans[i]
            if i < n - 1:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
            self.up.append(Level(ch + c, c, emb_dim, num_res_blocks, attention and i == n - 1))
            ch = c
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        self.feature_layers = tuple(f"down.{i}" for i in range(n)) + ("mid",)
        self._feature_channels = chans + [chans[-1]]

    def feature_channels(self) -> list[int]:
        """Channel counts of the ``feature_layers`` outputs, in the same order."""
        return list(self._feature_channels)

    def forward(self, x: Tensor, time: Tensor, cond: Cond = None) -> Tensor:
        b = x.shape[0]
        emb = self.time_embed(time.to(x.device).expand(b))
        lab = self.label_embed(cond, b, x.device)
        if lab is not None:
            emb = emb + lab
        h = self.conv_in(x)
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for j, level in enumerate(self.up):
            skip = skips.pop()
            if j > 0:
                h = self.upsample[j - 1](F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = level(torch.cat([h, skip], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def null_cond(self, cond: Cond) -> Cond:
        return null_labels(cond, self.num_classes)


class DiffusersUNet2D(nn.Module):
    """diffusers' ``UNet2DModel`` behind the dmdx backbone contract (labels via ``num_class_embeds``).

    The time input goes to diffusers' positional embedding unchanged, which is built for step-like values: use a
    schedule whose ``time_input`` is ``"t1000"`` or ``"index"``. Features: each down block's output (after its
    downsampler) and ``unet.mid_block``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 16,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        num_classes: int = 0,
        attention: bool = False,
    ):
        super().__init__()
        from diffusers import UNet2DModel

        channel_mult = tuple(channel_mult)
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            base_channels=base_channels,
            channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks,
            num_classes=num_classes,
            attention=attention,
        )
        self.num_classes = num_classes
        chans = tuple(base_channels * m for m in channel_mult)
        n = len(chans)
        groups = min(num_groups(c) for c in chans)
        down = tuple("AttnDownBlock2D" if attention and i == n - 1 else "DownBlock2D" for i in range(n))
        up = tuple("AttnUpBlock2D" if attention and i == 0 else "UpBlock2D" for i in range(n))
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=chans,
            layers_per_block=num_res_blocks,
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=groups,
            attention_head_dim=chans[-1],
            add_attention=attention,
            num_class_embeds=num_classes + 1 if num_classes > 0 else None,
        )
        self.feature_layers = tuple(f"unet.down_blocks.{i}" for i in range(n)) + ("unet.mid_block",)

    def forward(self, x: Tensor, time: Tensor, cond: Cond = None) -> Tensor:
        b = x.shape[0]
        labels = None
        if self.num_classes > 0:
            if cond is None or cond.get("labels") is None:
                labels = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            else:
                labels = cond["labels"].long()
        time = time.to(x.device).float().expand(b)
        return self.unet(x, time, class_labels=labels, return_dict=False)[0]

    def null_cond(self, cond: Cond) -> Cond:
        return null_labels(cond, self.num_classes)
