"""Text-to-image metrics on images and their prompts, each from local weights only (nothing is downloaded).

CLIP score (``100 * max(cos, 0)`` of CLIP image and text embeddings, as torchmetrics' ``CLIPScore``; a
``transformers`` ``CLIPModel`` folder), PickScore (``logit_scale * cos``, Kirstain et al. 2023; its model is a
``CLIPModel`` folder too), FID and KID (Inception pool features against a folder of reference images; KID is the
unbiased MMD^2 with the cubic polynomial kernel, averaged over subsets, Binkowski et al. 2018) and LPIPS diversity
(the mean pairwise LPIPS between the images of one prompt across seeds, averaged over prompts; the ADM paper's
Table 6).

The Inception network is the TorchScript file used by StyleGAN2-ADA / EDM / clean-fid
(``inception-2015-12-05.pt``: uint8 images in, any size, 2048 pool features out with ``return_features=True``).
torch-fidelity, clean-fid and lpips all import torchvision, which has no build for the CPU torch wheels dmdx
installs, so the FID/KID maths is written here (on the Frechet distance of :mod:`dmdx.eval.images`) and LPIPS's
AlexNet is rebuilt here in the ``lpips`` package's state-dict layout.  The Python API takes any feature function
(``features=``), which the tests use with tiny stand-ins.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data.files import files_in
from .images import frechet_distance

Tensor = torch.Tensor
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
UNSUPPORTED_SCORES = {
    "hpsv2": "HPSv2 needs the hpsv2 package's open_clip ViT-H-14 wrapper, which fetches its tokenizer and "
             "checkpoints from the hub when it scores",
    "imagereward": "ImageReward needs the image-reward package's BLIP model, which downloads its BERT tokenizer and "
                   "config when it loads",
}


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float -> uint8 [N, 3, H, W] (the PNG pixels)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder, sorted by name."""
    return files_in(folder, IMAGE_SUFFIXES, "reference image folder", "images")


def load_images(files: Sequence[Path]) -> list[Tensor]:
    """Image files as uint8 [3, H, W] tensors (RGB); sizes may differ."""
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
    return out


# -- CLIP score, PickScore -------------------------------------------------------------------------------------
class CLIPScorer:
    """A local ``transformers`` ``CLIPModel`` folder (with its processor files) scoring (image, prompt) pairs."""

    def __init__(self, folder: str | Path, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"CLIP model folder not found or without config.json: {folder} (a local "
                                    "transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14 downloaded "
                                    "beforehand)")
        try:
            self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{folder}: no CLIP tokenizer / image processor files ({e}); save the model's "
                             "CLIPProcessor into the same folder") from None
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
        self.device = device

    @torch.no_grad()
    def embed(self, images_u8: Tensor, prompts: Sequence[str], batch_size: int = 16) -> tuple[Tensor, Tensor]:
        """Unit-norm (image, text) embeddings, [N, D] each."""
        ims, txts = [], []
        for i in range(0, len(prompts), batch_size):
            pics = [im.permute(1, 2, 0).numpy() for im in images_u8[i:i + batch_size]]
            batch = self.processor(text=list(prompts[i:i + batch_size]), images=pics, return_tensors="pt",
                                   padding=True, truncation=True)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            img = _as_tensor(self.model.get_image_features(pixel_values=batch["pixel_values"]))
            txt = _as_tensor(self.model.get_text_features(input_ids=batch["input_ids"],
                                                          attention_mask=batch.get("attention_mask")))
            ims.append(nn.functional.normalize(img.float(), dim=-1).cpu())
            txts.append(nn.functional.normalize(txt.float(), dim=-1).cpu())
        return torch.cat(ims), torch.cat(txts)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


def _as_tensor(out) -> Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, name, None)
        if v is not None:
            return v
    raise TypeError(f"unexpected CLIP output {type(out).__name__}")


def clip_score(image_emb: Tensor, text_emb: Tensor) -> float:
    """CLIP score of matched rows: ``100 * mean(max(cos(image_i, text_i), 0))``."""
    cos = nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return float(100 * cos.clamp(min=0).mean())


def pick_score(image_emb: Tensor, text_emb: Tensor, logit_scale: float) -> float:
    """PickScore of matched rows: ``logit_scale * cos(image_i, text_i)``, averaged."""
    cos = nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return float(logit_scale * cos.mean())


# -- FID, KID --------------------------------------------------------------------------------------------------
FeatureFn = Callable[[Tensor], Tensor]  # uint8 [N, 3, H, W] -> float [N, D]


def load_inception(path: str | Path | None, device="cpu") -> FeatureFn:
    """The FID Inception network from a local TorchScript file (``inception-2015-12-05.pt``)."""
    if path is None:
        raise ValueError("FID/KID need the Inception network: pass --inception FILE, the TorchScript file "
                         "inception-2015-12-05.pt (StyleGAN2-ADA / clean-fid), downloaded beforehand")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path} (the TorchScript file "
                                "inception-2015-12-05.pt; nothing is downloaded)")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a TorchScript Inception file ({e})") from None

    @torch.no_grad()
    def features(x: Tensor) -> Tensor:
        return net(x.to(device), return_features=True).float().cpu()

    return features


def image_features(fn: FeatureFn, images: Sequence[Tensor] | Tensor, batch_size: int = 32) -> Tensor:
    """Features of uint8 images; images of different sizes go in separate batches."""
    if isinstance(images, Tensor):
        images = list(images)
    out: list[Tensor | None] = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape), []).append(i)
    for idx in by_size.values():
        for j in range(0, len(idx), batch_size):
            sel = idx[j:j + batch_size]
            f = fn(torch.stack([images[i] for i in sel]))
            for i, row in zip(sel, f):
                out[i] = row
    return torch.stack(out)  # type: ignore[arg-type]


def folder_features(fn: FeatureFn, files: Sequence[Path], chunk: int = 256) -> Tensor:
    """Features of image files, read ``chunk`` files at a time (a large reference set never sits in memory)."""
    return torch.cat([image_features(fn, load_images(files[i:i + chunk])) for i in range(0, len(files), chunk)])


def fid(real: Tensor, fake: Tensor) -> float:
    """Frechet distance of two feature sets (Heusel et al. 2017)."""
    return frechet_distance(real, fake)


def kid(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
        ) -> tuple[float, float]:
    """(mean, std) over subsets of the unbiased MMD^2 with ``k(x, y) = (x.y / d + 1)^3`` (Binkowski et al. 2018)."""
    n = min(subset_size, len(real), len(fake))
    if n < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(real)} and {len(fake)}")
    rng = np.random.default_rng(seed)
    x, y = real.double(), fake.double()
    d = x.shape[1]
    vals = []
    for _ in range(subsets):
        a = x[torch.from_numpy(rng.choice(len(x), n, replace=False))]
        b = y[torch.from_numpy(rng.choice(len(y), n, replace=False))]
        kxx, kyy, kxy = [(u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b))]
        off = n * (n - 1)
        vals.append(float((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
                          - 2 * kxy.mean()))
    return float(np.mean(vals)), float(np.std(vals))


# -- LPIPS diversity -------------------------------------------------------------------------------------------
class LPIPS(nn.Module):
    """LPIPS with AlexNet features (Zhang et al. 2018, v0.1), with the ``lpips`` package's state-dict names.

    Load a file saved once where lpips and torchvision work:
    ``torch.save(lpips.LPIPS(net="alex").state_dict(), "lpips_alex.pth")`` (or the same as safetensors).
    Inputs are images in [-1, 1]; the output is one distance per pair.  Images under 64 pixels a side are
    upsampled to 64 first (tiny test pipelines).
    """

    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        layers = [nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                  nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]
        cuts = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # torchvision alexnet.features indices per slice
        self.net = nn.Module()
        for k, (a, b) in enumerate(cuts, 1):
            sl = nn.Sequential()
            for i in range(a, b):
                sl.add_module(str(i), layers[i])
            setattr(self.net, f"slice{k}", sl)
        for k, c in enumerate(self.CHANNELS):
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path, device="cpu") -> "LPIPS":
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        net = cls()
        want = set(net.state_dict())
        missing = sorted(want - set(state))
        if missing:
            hint = (" (the lpips package's own weights file holds only the linear layers; save the whole model: "
                    "torch.save(lpips.LPIPS(net='alex').state_dict(), FILE))") if any("slice" in k for k in missing) \
                else ""
            raise ValueError(f"{path} is not an AlexNet LPIPS state dict: missing {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''}{hint}")
        net.load_state_dict({k: state[k] for k in want})
        return net.eval().requires_grad_(False).to(device)

    MIN_SIZE = 64  # AlexNet's strides and pools leave nothing of smaller images

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        if min(x0.shape[-2:]) < self.MIN_SIZE:  # tiny images are upsampled (bilinear) so every layer sees pixels
            size = [max(self.MIN_SIZE, s * -(-self.MIN_SIZE // min(x0.shape[-2:]))) for s in x0.shape[-2:]]
            x0, x1 = (nn.functional.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
                      for x in (x0, x1))
        f0, f1 = (self.net.slice1((x - self.shift) / self.scale) for x in (x0.float(), x1.float()))
        total = 0
        for k in range(5):
            if k:
                sl = getattr(self.net, f"slice{k + 1}")
                f0, f1 = sl(f0), sl(f1)
            n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((n0 - n1) ** 2).mean(dim=(2, 3))
        return total.view(-1)


@torch.no_grad()
def lpips_diversity(dist: Callable[[Tensor, Tensor], Tensor], images: Tensor, prompt_index: Sequence[int]) -> float:
    """Mean over prompts of the mean pairwise distance between that prompt's images (different seeds)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_index):
        groups.setdefault(p, []).append(i)
    per_prompt = []
    for idx in groups.values():
        pairs = list(itertools.combinations(idx, 2))
        if not pairs:
            continue
        a = images[[i for i, _ in pairs]]
        b = images[[j for _, j in pairs]]
        per_prompt.append(float(dist(a, b).mean()))
    if not per_prompt:
        raise ValueError("LPIPS diversity needs at least 2 images per prompt (--per-prompt 2 or more)")
    return float(np.mean(per_prompt))


# -- the table -------------------------------------------------------------------------------------------------
@dataclass
class Scorers:
    """What to measure; each is optional (None = not measured)."""

    clip: CLIPScorer | None = None
    pickscore: CLIPScorer | None = None
    inception: FeatureFn | None = None
    reference: list[Path] | None = None  # image files for FID / KID
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000


def score_images(s, scorers: Scorers) -> dict:
    """The metrics of ``s`` (images [N, 3, H, W] in [-1, 1], their prompts and prompt indices)."""
    row: dict = {}
    px = to_uint8(s.images)
    if scorers.clip is not None:
        row["clip_score"] = clip_score(*scorers.clip.embed(px, s.prompts))
    if scorers.pickscore is not None:
        img, txt = scorers.pickscore.embed(px, s.prompts)
        row["pickscore"] = pick_score(img, txt, scorers.pickscore.logit_scale)
    if scorers.reference is not None:
        if scorers.inception is None:
            raise ValueError("FID/KID against --ref need --inception FILE")
        real = folder_features(scorers.inception, scorers.reference)
        fake = image_features(scorers.inception, px)
        row["fid"] = fid(real, fake)
        row["kid"], row["kid_std"] = kid(real, fake, scorers.kid_subsets, scorers.kid_subset_size)
    if scorers.lpips is not None:
        row["lpips_diversity"] = lpips_diversity(scorers.lpips, s.images, s.prompt_index)
    return row


def check_unsupported(**given) -> None:
    for name, value in given.items():
        if value:
            raise ValueError(f"--{name} is not supported: {UNSUPPORTED_SCORES[name]}, and dmdx loads nothing from "
                             "the hub (docs/real-models.md, Known gaps)")
