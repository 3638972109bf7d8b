"""Image metrics with small networks trained once per data set and cached as safetensors.

Two networks, deliberately unrelated:

- :class:`FeatureClassifier` (evaluation only): a VGG-style conv classifier with max-pooling, trained with
  cross-entropy on the labels.  Its penultimate 128-d features give the Frechet distance and precision/recall,
  its logits the class accuracy of conditional samples.
- :class:`PixelBackbone` (for ADP's pixel-space discriminator): a label-free denoising autoencoder with strided
  convs and a different width schedule.  A student trained against a discriminator that looked through the
  evaluation classifier's features could learn to please exactly those features and inflate FD without better
  images; keeping the two networks apart in weights, design and objective avoids grading the student with its own
  critic.  Denoising is also a natural objective for multi-scale pixel features (edges, strokes, shapes).

Files live in ``cache_dir(name)/classifier.{safetensors,json}`` and ``cache_dir(name)/pixel_backbone.*``; only
safetensors is ever loaded.  A cache file that cannot be read (or was built for another shape) is retrained with a
warning.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset, cache_dir, load_dataset

Tensor = torch.Tensor

CACHE_VERSION = 1
FD_REFERENCE_SPLIT = "test"  # see image_metrics


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


def _conv(c_in: int, c_out: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2 if stride == 1 else 1), _norm(c_out), nn.SiLU())


class FeatureClassifier(nn.Module):
    """Conv classifier: 3 stages (width, 2 width, 4 width) with max-pooling, global average pool, 128-d features."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes,
                       "width": width, "feature_dim": feature_dim}
        w = width
        self.body = nn.Sequential(
            _conv(in_channels, w), _conv(w, w), nn.MaxPool2d(2),
            _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2) if image_size >= 8 else nn.Identity(),
            _conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.proj = nn.Sequential(nn.Linear(4 * w, feature_dim), nn.SiLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [B, feature_dim]."""
        return self.proj(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class PixelBackbone(nn.Module):
    """Denoising autoencoder (strided-conv encoder, upsampling decoder, no skips); ``features`` = encoder maps."""

    def __init__(self, in_channels: int, image_size: int, widths: tuple[int, ...] = (24, 48, 96)):
        super().__init__()
        self.config = {"in_channels": in_channels, "image_size": image_size, "widths": list(widths)}
        c = [in_channels, *widths]
        self.enc = nn.ModuleList(
            [_conv(c[0], c[1])] + [_conv(c[i], c[i + 1], stride=2, k=4) for i in range(1, len(widths))])
        self.dec = nn.ModuleList([_conv(c[i + 1], c[i]) for i in range(len(widths) - 1, 0, -1)])
        self.out = nn.Conv2d(widths[0], in_channels, 3, padding=1)

    def features(self, x: Tensor) -> list[Tensor]:
        """Encoder feature maps at full, 1/2 and 1/4 resolution: [B, C_i, h_i, w_i]."""
        feats = []
        for layer in self.enc:
            x = layer(x)
            feats.append(x)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Denoised image."""
        feats = self.features(x)
        h = feats[-1]
        for layer, skip_shape in zip(self.dec, [f.shape[-2:] for f in feats[-2::-1]]):
            h = layer(F.interpolate(h, size=tuple(skip_shape), mode="nearest"))
        return self.out(h)


# --------------------------------------------------------------------------------------------- training helpers
def _shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Random integer translations of up to ``max_shift`` pixels (edge padding)."""
    if max_shift <= 0:
        return x
    H, W = x.shape[-2:]
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    d = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    out = torch.empty_like(x)
    for dy, dx in torch.unique(d, dim=0).tolist():
        m = (d[:, 0] == dy) & (d[:, 1] == dx)
        out[m] = padded[m, :, dy:dy + H, dx:dx + W]
    return out


DEFAULT_STEPS = 600  # optimiser steps when epochs is not given: ~30 s on digits, ~2 min on mnist (2 CPU cores)


def _default_epochs(n: int, batch_size: int) -> int:
    return max(3, min(40, math.ceil(DEFAULT_STEPS / math.ceil(max(n, 1) / batch_size))))


def _subset(ds: Dataset, max_train: int | None, seed: int) -> Dataset:
    if max_train is None or max_train >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:max_train]
    return Dataset(ds.name, ds.kind, ds.x[idx], None if ds.labels is None else ds.labels[idx], ds.num_classes)


def _fit(model: nn.Module, loss_fn, ds: Dataset, epochs: int, batch_size: int, lr: float, seed: int, desc: str,
         progress: bool) -> float:
    """AdamW with a cosine learning rate; returns the mean loss of the last epoch.  Gradients are on inside, whatever
    the caller's mode: an evaluation network trained on first use may be asked for under ``torch.no_grad()``."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(ds) / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    model.train()
    last = math.nan
    with torch.enable_grad(), tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(ds), generator=g)
            losses = []
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                loss = loss_fn(model, ds.x[idx], None if ds.labels is None else ds.labels[idx], g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            last = float(np.mean(losses))
    model.eval()
    return last


@torch.no_grad()
def _batched(fn, x: Tensor, batch_size: int = 512) -> Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _max_shift(image_size: int) -> int:
    return max(1, image_size // 14)


# ------------------------------------------------------------------------------------------------------ caching
def _save(model: nn.Module, info: dict, stem: Path) -> None:
    from safetensors.torch import save_file

    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_name(stem.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp) + ".safetensors")
    os.replace(str(tmp) + ".safetensors", str(stem) + ".safetensors")
    Path(str(tmp) + ".json").write_text(json.dumps(info, indent=2))
    os.replace(str(tmp) + ".json", str(stem) + ".json")


def _load(model: nn.Module, stem: Path) -> dict | None:
    """Load cached weights into ``model``; None (with a warning) if the cache is missing, corrupt or mismatched."""
    from safetensors.torch import load_file

    weights, meta = Path(str(stem) + ".safetensors"), Path(str(stem) + ".json")
    if not weights.exists() or not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("architecture") != model.config or info.get("version") != CACHE_VERSION:
            warnings.warn(f"{meta}: cached network was built for {info.get('architecture')}, need {model.config}; "
                          "retraining", stacklevel=3)
            return None
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        warnings.warn(f"cannot read cached network {weights} ({type(e).__name__}: {e}); retraining", stacklevel=3)
        return None
    return info


def _image_shape(dataset_name: str) -> tuple[Dataset, int, int]:
    train = load_dataset(dataset_name, "train")
    if train.kind != "image":
        raise ValueError(f"{dataset_name!r} is a {train.kind} data set; image metrics need an image data set")
    C, H, W = train.shape
    if H != W:
        raise ValueError(f"{dataset_name!r}: expected square images, got {H}x{W}")
    return train, C, H


# ------------------------------------------------------------------------------------------------- the networks
def train_classifier(dataset_name: str, epochs: int | None = None, max_train: int | None = None,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress: bool = True
                     ) -> tuple[FeatureClassifier, dict]:
    """Train a :class:`FeatureClassifier` on the train split (random shifts as augmentation), score the test split."""
    train, C, S = _image_shape(dataset_name)
    if train.labels is None or train.num_classes < 2:
        raise ValueError(f"{dataset_name!r} has no class labels; the evaluation classifier needs at least 2 classes")
    train = _subset(train, max_train, seed)
    epochs = _default_epochs(len(train), batch_size) if epochs is None else epochs
    shift = _max_shift(S)

    def loss_fn(model, x, labels, g):
        return F.cross_entropy(model(_shift(x, shift, g)), labels, label_smoothing=0.05)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FeatureClassifier(C, S, train.num_classes)
        t0 = time.perf_counter()
        loss = _fit(model, loss_fn, train, epochs, batch_size, lr, seed, f"classifier {dataset_name}", progress)
        seconds = time.perf_counter() - t0
    test = load_dataset(dataset_name, "test")
    pred = _batched(model, test.x).argmax(1)
    info = {"version": CACHE_VERSION, "dataset": dataset_name, "architecture": model.config,
            "test_acc": float((pred == test.labels).double().mean()), "num_test": len(test),
            "num_train": len(train), "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "final_train_loss": loss, "train_seconds": round(seconds, 2)}
    return model.requires_grad_(False), info


def get_classifier(dataset_name: str, retrain: bool = False, **train_kwargs) -> tuple[FeatureClassifier, dict]:
    """The evaluation classifier of a data set (eval mode, frozen), trained once and cached as safetensors.

    ``train_kwargs`` (epochs, max_train, batch_size, lr, seed, progress) only matter when it is (re)trained.
    """
    train, C, S = _image_shape(dataset_name)
    stem = cache_dir(dataset_name) / "classifier"
    model = FeatureClassifier(C, S, max(train.num_classes, 2))
    info = None if retrain else _load(model, stem)
    if info is None:
        model, info = train_classifier(dataset_name, **train_kwargs)
        _save(model, info, stem)
    info = {**info, "path": str(stem) + ".safetensors"}
    return model.eval().requires_grad_(False), info


def train_pixel_backbone(dataset_name: str, epochs: int | None = None, max_train: int | None = None,
                         batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress: bool = True
                         ) -> tuple[PixelBackbone, dict]:
    """Train a :class:`PixelBackbone` to denoise ``x + sigma * eps`` with sigma ~ U(0.1, 1) (MSE on x)."""
    train, C, S = _image_shape(dataset_name)
    train = _subset(train, max_train, seed)
    epochs = _default_epochs(len(train), batch_size) if epochs is None else epochs

    def loss_fn(model, x, labels, g):
        sigma = 0.1 + 0.9 * torch.rand(x.shape[0], 1, 1, 1, generator=g)
        return F.mse_loss(model(x + sigma * torch.randn(x.shape, generator=g)), x)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PixelBackbone(C, S)
        t0 = time.perf_counter()
        loss = _fit(model, loss_fn, train, epochs, batch_size, lr, seed, f"pixel backbone {dataset_name}", progress)
        seconds = time.perf_counter() - t0
        test = load_dataset(dataset_name, "test")
        noisy = test.x + 0.5 * torch.randn(test.x.shape, generator=torch.Generator().manual_seed(seed))
        test_mse = float(F.mse_loss(_batched(model, noisy), test.x))
    info = {"version": CACHE_VERSION, "dataset": dataset_name, "architecture": model.config,
            "objective": "denoising autoencoder, sigma ~ U(0.1, 1)", "test_mse_sigma_0.5": test_mse,
            "num_train": len(train), "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "final_train_loss": loss, "train_seconds": round(seconds, 2)}
    return model.requires_grad_(False), info


def get_pixel_backbone(dataset_name: str, retrain: bool = False, return_info: bool = False, **train_kwargs):
    """The frozen (eval mode) pixel backbone for ADP's discriminator; ``features(x)`` gives 3 feature maps."""
    _, C, S = _image_shape(dataset_name)
    stem = cache_dir(dataset_name) / "pixel_backbone"
    model = PixelBackbone(C, S)
    info = None if retrain else _load(model, stem)
    if info is None:
        model, info = train_pixel_backbone(dataset_name, **train_kwargs)
        _save(model, info, stem)
    model = model.eval().requires_grad_(False)
    return (model, {**info, "path": str(stem) + ".safetensors"}) if return_info else model


# ---------------------------------------------------------------------------------------------------- metrics
def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1^1/2 S2 S1^1/2))`` in float64 (eigendecompositions)."""
    a, b = np.asarray(torch.as_tensor(f1).detach().cpu(), np.float64), np.asarray(torch.as_tensor(f2).detach().cpu(),
                                                                                  np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"expected two feature sets [N, F] with the same F and N >= 2, got {list(a.shape)} and "
                         f"{list(b.shape)}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    ev, V = np.linalg.eigh(s1)
    r1 = (V * np.sqrt(np.clip(ev, 0, None))) @ V.T  # S1^1/2
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, 0.0))


def _kth_nn_radius(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance of each point to its k-th nearest neighbour within the set (self excluded)."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _in_manifold(query: Tensor, support: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    return torch.cat([(torch.cdist(query[i:i + chunk], support) <= radii[None]).any(1)
                      for i in range(0, len(query), chunk)])


def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3, max_samples: int = 5000,
                     seed: int = 0) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls around each set approximate its manifold.

    Precision = fraction of fake points inside the real manifold, recall = fraction of real points inside the fake
    manifold.  Each set is subsampled (fixed seed) to at most ``max_samples`` points.
    """
    g = torch.Generator().manual_seed(seed)
    real, fake = real_feats.detach().float().cpu(), fake_feats.detach().float().cpu()
    if len(real) > max_samples:
        real = real[torch.randperm(len(real), generator=g)[:max_samples]]
    if len(fake) > max_samples:
        fake = fake[torch.randperm(len(fake), generator=g)[:max_samples]]
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(real)} real and "
                         f"{len(fake)} fake")
    precision = _in_manifold(fake, real, _kth_nn_radius(real, k)).double().mean()
    recall = _in_manifold(real, fake, _kth_nn_radius(fake, k)).double().mean()
    return float(precision), float(recall)


def image_metrics(samples: Tensor, labels: Tensor | None, dataset_name: str,
                  classifier: tuple[FeatureClassifier, dict] | None = None, k: int = 3) -> dict:
    """FD, class accuracy, precision and recall of image samples [N, C, H, W] (clamped to [-1, 1]).

    - ``fd``: Frechet distance between classifier features of the samples and of the *test* split.  The classifier
      was fitted on the train split, so its train features are tighter than those of any unseen image; the test
      split is what a perfect generator's samples look like to it.  ``fd_train_vs_test`` gives the floor: the FD of
      as many real train images (at most the train size) against the same reference.
    - ``class_acc``: fraction of samples whose classifier argmax equals the conditioning label (labels outside
      ``[0, num_classes)``, e.g. the null label, are skipped); None without labels.
    - ``precision`` / ``recall``: :func:`precision_recall` against the test split.
    """
    model, info = classifier if classifier is not None else get_classifier(dataset_name)
    test = load_dataset(dataset_name, FD_REFERENCE_SPLIT)
    if samples.ndim != 4 or tuple(samples.shape[1:]) != test.shape:
        raise ValueError(f"expected samples of shape [N, {', '.join(map(str, test.shape))}] for {dataset_name!r}, "
                         f"got {list(samples.shape)}")
    x = samples.detach().float().cpu().nan_to_num(0.0).clamp(-1, 1)
    model = model.cpu().eval()
    fake = _batched(model.features, x)
    real = _batched(model.features, test.x)
    train = load_dataset(dataset_name, "train")
    n_floor = min(len(x), len(train))
    floor_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n_floor]
    out = {"num_samples": len(x), "fd": frechet_distance(real, fake),
           "fd_train_vs_test": frechet_distance(real, _batched(model.features, train.x[floor_idx])),
           "fd_reference": f"{FD_REFERENCE_SPLIT} split ({len(test)} images)", "class_acc": None}
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (len(x),):
            raise ValueError(f"expected labels of shape [{len(x)}], got {list(labels.shape)}")
        keep = (labels >= 0) & (labels < test.num_classes)
        if keep.any():
            pred = _batched(model, x[keep]).argmax(1)
            out["class_acc"] = float((pred == labels[keep]).double().mean())
    out["precision"], out["recall"] = precision_recall(real, fake, k=k)
    out["classifier_test_acc"] = info["test_acc"]
    return out
