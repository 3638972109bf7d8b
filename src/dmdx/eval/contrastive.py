"""A second, independent feature space for image FD: a contrastive encoder (SimCLR, Chen et al. 2020).

The FD of :func:`dmdx.eval.images.image_metrics` is read through the evaluation classifier's penultimate features,
which are trained to forget everything but the label.  A student can match those features and still differ from the
data in what they discard (stroke width, slant, position), and an FD from one network is one judge.  This module
gives a second judge built differently in every respect that matters:

- **objective**: contrastive and label-free (NT-Xent on two augmented views of each image, temperature 0.2), not
  cross-entropy on labels (the classifier) nor denoising (ADP's pixel backbone);
- **architecture**: :class:`ContrastiveEncoder`, a BatchNorm / ReLU network with a 5x5 stem, strided convs and a
  concatenated average + max pool, where the classifier is a GroupNorm / SiLU VGG with max-pooling and the pixel
  backbone a GroupNorm / SiLU auto-encoder;
- **training**: its own seed (1), its own augmentations (random rotation, scale and translation, pixel noise), on
  the train split; FD is measured against the test split, which it never saw.

No training network shares it: the student, the fake score and every discriminator see the teacher's UNet or the
pixel backbone.  ``fd_contrastive`` is reported next to ``fd`` wherever dmdx makes a quality claim (``dmdx eval``,
``dmdx demo``, ``benchmarks/``).  Cached as ``cache_dir(name)/contrastive.{safetensors,json}`` (safetensors only).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..data import cache_dir, load_dataset
from .images import (CACHE_VERSION, _batched, _default_epochs, _fit, _image_shape, _load, _save, _subset,
                     frechet_distance, precision_recall)

Tensor = torch.Tensor

SEED = 1  # the evaluation classifier and the pixel backbone train with seed 0
TEMPERATURE = 0.2


class ContrastiveEncoder(nn.Module):
    """Conv encoder (BatchNorm, ReLU): 5x5 stem, two strided stages, average + max pool -> ``4 * width`` features;
    a 2-layer projection head used only by the contrastive loss."""

    def __init__(self, in_channels: int, image_size: int, width: int = 32, proj_dim: int = 32):
        super().__init__()
        self.config = {"in_channels": in_channels, "image_size": image_size, "width": width, "proj_dim": proj_dim}

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        w = width
        self.body = nn.Sequential(nn.Conv2d(in_channels, w, 5, 1, 2, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                  *block(w, w, 2 if image_size > 8 else 1), *block(w, 2 * w, 2),
                                  *block(2 * w, 2 * w, 1))
        self.proj = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, proj_dim))

    def features(self, x: Tensor) -> Tensor:
        """The representation [B, 4 * width]: average and max pool of the last feature map, concatenated."""
        h = self.body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """The unit-norm projection the contrastive loss compares."""
        return F.normalize(self.proj(self.features(x)), dim=1)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """A random view: rotation within +-15 degrees, scale 0.85-1.1, translation up to an eighth of the image,
    then pixel noise of std 0.1 (clamped to [-1, 1]); edge padding."""
    n = x.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle, scale = u(-math.pi / 12, math.pi / 12), u(0.85, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u(-0.25, 0.25)], 1), torch.stack([sin, cos, u(-0.25, 0.25)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (out + 0.1 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """SimCLR's loss: each view must pick its partner among the 2B - 1 others (unit-norm projections)."""
    z = torch.cat([z1, z2])
    logits = z @ z.T / temperature
    logits.fill_diagonal_(-math.inf)
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def knn_accuracy(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, k: int = 5) -> float:
    """Test accuracy of a k-nearest-neighbour vote in cosine similarity (how much class the features hold)."""
    sim = F.normalize(test_f, dim=1) @ F.normalize(train_f, dim=1).T
    votes = train_y[sim.topk(k, dim=1).indices]
    pred = torch.mode(votes, dim=1).values
    return float((pred == test_y).double().mean())


def train_contrastive(dataset_name: str, epochs: int | None = None, max_train: int | None = None,
                      batch_size: int = 128, lr: float = 2e-3, seed: int = SEED, progress: bool = True
                      ) -> tuple[ContrastiveEncoder, dict]:
    """Train a :class:`ContrastiveEncoder` on the train split with NT-Xent (no labels)."""
    train, C, S = _image_shape(dataset_name)
    train = _subset(train, max_train, seed)
    epochs = _default_epochs(len(train), batch_size) if epochs is None else epochs

    def loss_fn(model, x, labels, g):
        return nt_xent(model(augment(x, g)), model(augment(x, g)))

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ContrastiveEncoder(C, S)
        t0 = time.perf_counter()
        loss = _fit(model, loss_fn, train, epochs, batch_size, lr, seed, f"contrastive encoder {dataset_name}",
                    progress)
        seconds = time.perf_counter() - t0
    info = {"version": CACHE_VERSION, "dataset": dataset_name, "architecture": model.config,
            "objective": f"SimCLR NT-Xent, temperature {TEMPERATURE}, no labels", "num_train": len(train),
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "final_train_loss": loss,
            "train_seconds": round(seconds, 2)}
    if train.labels is not None:
        test = load_dataset(dataset_name, "test")
        info["knn_test_acc"] = knn_accuracy(_batched(model.features, train.x), train.labels,
                                            _batched(model.features, test.x), test.labels)
    return model.requires_grad_(False), info


def get_contrastive(dataset_name: str, retrain: bool = False, **train_kwargs) -> tuple[ContrastiveEncoder, dict]:
    """The contrastive encoder of a data set (eval mode, frozen), trained once and cached as safetensors."""
    _, C, S = _image_shape(dataset_name)
    stem = cache_dir(dataset_name) / "contrastive"
    model = ContrastiveEncoder(C, S)
    info = None if retrain else _load(model, stem)
    if info is None:
        model, info = train_contrastive(dataset_name, **train_kwargs)
        _save(model, info, stem)
    return model.eval().requires_grad_(False), {**info, "path": str(stem) + ".safetensors"}


def contrastive_metrics(samples: Tensor, dataset_name: str,
                        encoder: tuple[ContrastiveEncoder, dict] | None = None) -> dict:
    """FD and recall of image samples [N, C, H, W] (clamped to [-1, 1]) in the contrastive encoder's features, both
    against the test split, as :func:`dmdx.eval.images.image_metrics` does in the classifier's:

    - ``fd_contrastive``; ``fd_contrastive_train_vs_test``: as many real train images against the same reference
      (the floor a perfect generator's sample of that size reaches);
    - ``recall_contrastive``: the k-NN recall (k = 3) of the test split by the samples.
    """
    model, _ = encoder if encoder is not None else get_contrastive(dataset_name)
    test = load_dataset(dataset_name, "test")
    if samples.ndim != 4 or tuple(samples.shape[1:]) != test.shape:
        raise ValueError(f"expected samples of shape [N, {', '.join(map(str, test.shape))}] for {dataset_name!r}, "
                         f"got {list(samples.shape)}")
    x = samples.detach().float().cpu().nan_to_num(0.0).clamp(-1, 1)
    model = model.cpu().eval()
    fake, real = _batched(model.features, x), _batched(model.features, test.x)
    train = load_dataset(dataset_name, "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:min(len(x), len(train))]
    _, recall = precision_recall(real, fake)
    return {"fd_contrastive": frechet_distance(real, fake),
            "fd_contrastive_train_vs_test": frechet_distance(real, _batched(model.features, train.x[idx])),
            "recall_contrastive": recall}
