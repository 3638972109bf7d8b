"""User data: ``.npz`` arrays and folders of images.

Scaling rule for images (both sources), applied to the whole array:

- integer dtype (e.g. uint8): values in [0, 255] -> ``x / 255 * 2 - 1``;
- float with min < 0: assumed already in [-1, 1], used as is;
- float with max > 1: values in [0, 255] -> ``x / 255 * 2 - 1``;
- otherwise (float in [0, 1]): ``x * 2 - 1``.

Vectors (``[N, D]``) are used as is (float32).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

Tensor = torch.Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def scale_images(x: np.ndarray) -> Tensor:
    """Images in [0, 255] (integer or float), [0, 1] or [-1, 1] -> float32 in [-1, 1] (rule in the module doc)."""
    if np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.bool_):
        return torch.from_numpy(x.astype(np.float32) / 255.0 * 2 - 1)
    x = x.astype(np.float32)
    if x.size and x.min() < 0:
        return torch.from_numpy(x)
    if x.size and x.max() > 1:
        return torch.from_numpy(x / 255.0 * 2 - 1)
    return torch.from_numpy(x * 2 - 1)


def _labels(y: np.ndarray, n: int, where: str) -> Tensor:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{where}: labels y must have shape [N] = [{n}], got {list(y.shape)}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and (y == np.round(y)).all())):
        raise ValueError(f"{where}: labels y must be integers, got dtype {y.dtype}")
    if n and y.min() < 0:
        raise ValueError(f"{where}: labels y must be >= 0")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path: str | Path) -> tuple[str, Tensor, Tensor | None]:
    """``(kind, x, labels)`` from a .npz with key ``x`` and optional ``y``.

    ``x`` is ``[N, D]`` (vectors), ``[N, H, W]`` (grey images) or ``[N, C, H, W]`` (images; channels-last
    ``[N, H, W, C]`` with C in 1, 3, 4 is accepted when ``x.shape[1] > 4``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f.files:
            raise ValueError(f"{path}: missing key 'x'; found keys {f.files}; expected x [N, D] or [N, C, H, W] "
                             "and optional y [N]")
        x = f["x"]
        y = f["y"] if "y" in f.files else None
    if x.ndim == 2:
        kind, xt = "vector", torch.from_numpy(x.astype(np.float32))
    elif x.ndim in (3, 4):
        if x.ndim == 3:
            x = x[:, None]
        elif x.shape[1] > 4 and x.shape[-1] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        kind, xt = "image", scale_images(np.ascontiguousarray(x))
    else:
        raise ValueError(f"{path}: x has shape {list(x.shape)}; expected [N, D] vectors, [N, H, W] or "
                         "[N, C, H, W] images")
    if xt.shape[0] == 0:
        raise ValueError(f"{path}: x is empty")
    return kind, xt, None if y is None else _labels(y, xt.shape[0], str(path))


def files_in(folder: str | Path, suffixes: tuple[str, ...], what: str, kind: str) -> list[Path]:
    """The files of ``folder`` (not its sub-folders) with one of ``suffixes``, sorted by name; a clear error when the
    folder is missing (``what``: "video folder", ...) or holds none (``kind``: "video files", "images")."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"{folder} holds no {kind} ({', '.join(suffixes)})")
    return files


def parse_folder_spec(spec: str) -> tuple[Path, tuple[int, int] | None]:
    """``PATH`` or ``PATH@S`` (resize to SxS) or ``PATH@HxW`` -> (path, (H, W) or None)."""
    m = re.fullmatch(r"(.*)@(\d+)(?:x(\d+))?", spec)
    if m and not Path(spec).exists():
        h = int(m.group(2))
        return Path(m.group(1)).expanduser(), (h, int(m.group(3) or h))
    return Path(spec).expanduser(), None


def _image_files(root: Path) -> tuple[list[tuple[Path, int]], list[Path]]:
    """(image file, class index or -1) in load order, and the class folders (empty when unlabelled)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")

    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = [d for d in sorted(root.iterdir()) if d.is_dir() and images_in(d)]
    if classes:
        files = [(p, k) for k, d in enumerate(classes) for p in images_in(d)]
    else:
        files = [(p, -1) for p in images_in(root)]
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its sub-folders")
    return files, classes


def image_paths(spec: str) -> list[Path]:
    """The image files of folder spec ``PATH[@SIZE]``, in :func:`load_folder`'s order (listed, not read): a clear
    error when the folder is missing or holds no images."""
    return [p for p, _ in _image_files(parse_folder_spec(spec)[0])[0]]


def open_image(path: Path):
    """A PIL image read whole from ``path``; a file PIL cannot read (truncated, corrupt, not an image) raises a
    ``ValueError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, UnidentifiedImageError, SyntaxError) as e:  # PIL raises SyntaxError for some broken PNGs
        raise ValueError(f"cannot read image {path}: {e} (a truncated or corrupt file? remove or replace it)") from None


def folder_captions(spec: str) -> list[str | None]:
    """The caption of each image of a folder, in :func:`load_folder`'s order: the text of ``name.txt`` next to
    ``name.png`` (stripped; the common captioned-folder layout), None where there is no such file or it is empty."""
    root, _ = parse_folder_spec(spec)
    out: list[str | None] = []
    for p, _ in _image_files(root)[0]:
        txt = p.with_suffix(".txt")
        text = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        out.append(text or None)
    return out


def load_folder(spec: str) -> tuple[str, Tensor, Tensor | None]:
    """``("image", x, labels)`` from a folder of images (spec ``PATH`` or ``PATH@SIZE``, see parse_folder_spec).

    If the folder has sub-folders holding images, each one is a class (sorted by name; images directly in the
    folder are then ignored); otherwise the images are unlabelled.  All images become grey (1 channel) when every
    image is grey, else RGB; alpha is dropped.  Without a resize all images must share one size.
    """
    from PIL import Image

    root, size = parse_folder_spec(spec)
    files, classes = _image_files(root)
    pil = [open_image(p) for p, _ in files]
    grey = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in pil)
    arrays = []
    for (p, _), im in zip(files, pil):
        if grey and im.mode in ("I", "I;16", "F"):
            a = np.asarray(im, dtype=np.float32)
            im = Image.fromarray(np.clip(a / max(a.max(), 1) * 255, 0, 255).astype(np.uint8))
        im = im.convert("L" if grey else "RGB")
        if size is not None:
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        a = a[None] if grey else a.transpose(2, 0, 1)
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"{p}: image of shape {list(a.shape)} (C, H, W), expected {list(arrays[0].shape)} like "
                             f"{files[0][0].name}; add @SIZE to the spec (e.g. folder:{root}@32) to resize")
        arrays.append(a)
    x = scale_images(np.stack(arrays))
    labels = torch.tensor([k for _, k in files], dtype=torch.long) if classes else None
    return "image", x, labels
