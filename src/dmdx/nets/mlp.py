"""An MLP denoiser for vector data (toy mixtures, low-dimensional latents)."""

from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor
Cond = dict[str, Tensor] | None


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the raw time input followed by a 2-layer MLP.

    Frequencies are spaced geometrically over [1e-3, 1e3] so that the features separate nearby values whatever
    the schedule feeds the backbone: t in [0, 1], t * 1000, step indices, sigma in [0.002, 80] or EDM's
    log(sigma) / 4.
    """

    def __init__(self, dim: int, out_dim: int, min_freq: float = 1e-3, max_freq: float = 1e3):
        super().__init__()
        assert dim % 2 == 0, "time embedding size must be even"
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, time: Tensor) -> Tensor:
        arg = time.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(arg), torch.sin(arg)], dim=1))


class LabelEmbedding(nn.Module):
    """Class embedding with an extra null class at index ``num_classes`` (all-zero when unconditional)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None

    def forward(self, cond: Cond, batch: int, device) -> Tensor | None:
        if self.embed is None:
            return None
        if cond is None or cond.get("labels") is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            labels = cond["labels"].long()
        return self.embed(labels)


def null_labels(cond: Cond, num_classes: int) -> Cond:
    """``cond`` with every label replaced by the null class ``num_classes``."""
    if cond is None:
        return None
    return {**cond, "labels": torch.full_like(cond["labels"], num_classes)}


class ResidualBlock(nn.Module):
    """``h + W2 silu(W1 silu(norm(h)) + E silu(emb))``: pre-norm, with the embedding projected per block."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        r = self.fc1(self.act(self.norm(h))) + self.emb(self.act(emb))
        return h + self.fc2(self.act(r))


class LastHidden(nn.Module):
    """The final normalised hidden activation [B, hidden]; exists so it can be tapped as a feature."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor) -> Tensor:
        return self.act(self.norm(h))


class MLPDenoiser(nn.Module):
    """Residual MLP ``forward(x [B, D], time [B], cond) -> [B, D]`` with time and optional class conditioning."""

    feature_layers = ("last_hidden",)

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, num_classes: int = 0, time_dim: int = 64):
        super().__init__()
        self.config = dict(dim=dim, hidden=hidden, depth=depth, num_classes=num_classes, time_dim=time_dim)
        self.num_classes = num_classes
        self.time_embed = TimeEmbedding(time_dim, hidden)
        self.label_embed = LabelEmbedding(num_classes, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(depth))
        self.last_hidden = LastHidden(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, time: Tensor, cond: Cond = None) -> Tensor:
        emb = self.time_embed(time.to(x.device).expand(x.shape[0]))
        lab = self.label_embed(cond, x.shape[0], x.device)
        if lab is not None:
            emb = emb + lab
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.last_hidden(h))

    def null_cond(self, cond: Cond) -> Cond:
        return null_labels(cond, self.num_classes)
