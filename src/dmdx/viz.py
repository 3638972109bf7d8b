"""Pictures and tables: image grids (PIL), 2-D scatter plots (matplotlib, Agg backend), text tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [H', W', 3] grid."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = \
            x[i, :3].permute(1, 2, 0).numpy()
    return grid


def save_image_grid(x: torch.Tensor, path: Path, nrow: int | None = None, scale: int = 4) -> None:
    from PIL import Image

    img = Image.fromarray(image_grid(x, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def save_scatter(x: torch.Tensor, path: Path, title: str = "", reference: torch.Tensor | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="lightgray", label="reference")
    x = x.detach().cpu()
    ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_title(title)
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_samples(x: torch.Tensor, path: Path, title: str = "") -> None:
    """A grid for images, a scatter plot of the first two coordinates for vectors."""
    path = Path(path)
    if x.ndim == 5:  # videos [N, C, T, H, W]: one row of frames per video
        save_image_grid(x.transpose(1, 2).flatten(0, 1), path, nrow=x.shape[2])
    elif x.ndim == 4:
        save_image_grid(x, path)
    else:
        save_scatter(x, path, title)


def format_table(rows: list[dict], cols: list[str]) -> str:
    """``rows`` as a right-aligned text table with the columns ``cols`` (what ``dmdx eval`` and the demo print)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[c for c in cols]] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
