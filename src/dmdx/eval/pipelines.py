"""Prompted sampling and text-to-image metrics for diffusers-pipeline teachers and their students.

``dmdx sample`` / ``dmdx eval`` on a pipeline model (a run folder distilled from a pipeline, or the pipeline
folder itself) go through here:

- :func:`generate_images`: prompts encoded with the pipeline's own ``encode_prompt``, latents drawn with the
  model's own sampler (a student: its few-step loop at its times; a teacher: the ODE at ``steps`` with CFG),
  decoded with the pipeline's VAE.  Image ``(prompt p, seed s)`` depends on ``s`` only (one generator per image,
  for the start noise and every re-noise), so the same seed gives the same image in any batch.
- Metrics, each from local weights only (nothing is downloaded):
  CLIP score (``100 * max(cos, 0)`` of CLIP image and text embeddings, as torchmetrics' ``CLIPScore``; a
  ``transformers`` ``CLIPModel`` folder), PickScore (``logit_scale * cos``, Kirstain et al. 2023; its model is a
  ``CLIPModel`` folder too), FID and KID (Inception pool features against a folder of reference images; KID is
  the unbiased MMD^2 with the cubic polynomial kernel, averaged over subsets, Binkowski et al. 2018) and LPIPS
  diversity (the mean pairwise LPIPS between the images of one prompt across seeds, averaged over prompts; the
  ADM paper's Table 6).

The Inception network is the TorchScript file used by StyleGAN2-ADA / EDM / clean-fid
(``inception-2015-12-05.pt``: uint8 images in, any size, 2048 pool features out with ``return_features=True``).
torch-fidelity, clean-fid and lpips all import torchvision, which has no build for the CPU torch wheels dmdx
installs, so the FID/KID maths is written here (on the Frechet distance of :mod:`dmdx.eval.images`) and LPIPS's
AlexNet is rebuilt here in the ``lpips`` package's state-dict layout.  The Python API takes any feature function
(``features=``), which the tests use with tiny stand-ins.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# diffusers' default num_inference_steps of each family's pipeline: "the teacher at its usual step count"
USUAL_STEPS = {"sd": 50, "sdxl": 50, "sd3": 28, "flux": 28}
UNSUPPORTED_SCORES = {
    "hpsv2": "HPSv2 needs the hpsv2 package's open_clip ViT-H-14 wrapper, which fetches its tokenizer and "
             "checkpoints from the hub when it scores",
    "imagereward": "ImageReward needs the image-reward package's BLIP model, which downloads its BERT tokenizer and "
                   "config when it loads",
}


def is_pipeline_model(info) -> bool:
    return "pipeline" in (info.extra or {})


def pipeline_kind_of(info) -> str:
    from ..teachers import diffusers as dfs

    return dfs.pipeline_kind(Path(info.extra["pipeline"]))


def usual_steps(info) -> int:
    return USUAL_STEPS.get(pipeline_kind_of(info), info.steps)


# -- sampling --------------------------------------------------------------------------------------------------
@dataclass
class ImageSamples:
    images: Tensor  # [N, 3, H, W] in [-1, 1]
    prompts: list[str]  # per image
    prompt_index: list[int]
    seeds: list[int]
    steps: int
    nfe: int
    guidance: float
    seconds_per_image: float  # denoising network passes only (no text encoding, no VAE decode)


@torch.no_grad()
def generate_images(model, prompts: Sequence[str], per_prompt: int = 1, seed: int = 0, steps: int | None = None,
                    guidance: float | None = None, batch_size: int = 4, device="cpu", decode: bool = True
                    ) -> ImageSamples:
    """``per_prompt`` images for each prompt, seeds ``seed .. seed + per_prompt - 1``, with the model's own sampler."""
    from ..sampling import nfe as solver_nfe
    from ..sampling import sample_ode, student_sample, time_grid
    from ..teachers import diffusers as dfs

    info = model.info
    if not is_pipeline_model(info):
        raise ValueError("generate_images needs a model distilled from (or being) a diffusers pipeline")
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    pipe_dir = Path(info.extra["pipeline"])
    shape = tuple(info.shape)
    student = info.kind == "student"
    if student:
        times = list(info.times)
        if steps is not None and steps != len(times):
            times = time_grid(steps)[:-1]  # evenly spaced times, as for built-in students
        steps = len(times)
        guidance = 1.0 if guidance is None else guidance
    else:
        steps = steps or usual_steps(info)
        guidance = info.guidance if guidance is None else guidance
    if guidance != 1.0 and getattr(model.denoiser.backbone, "guidance_distilled", False):
        raise ValueError("a guidance-distilled Flux model has no real classifier-free guidance: its guidance is the "
                         "fixed embedding real.flux_guidance; leave --guidance unset (1)")
    bank, _ = dfs.encode_prompts(pipe_dir, prompts, shape)
    den = model.denoiser
    jobs = [(p, s) for p in range(len(prompts)) for s in range(seed, seed + per_prompt)]
    lat, secs = [], 0.0
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        idx = torch.tensor([p for p, _ in chunk])
        cond = {k: v[idx].to(device) for k, v in bank.items()}

        def fn(x, t, c, _g=guidance):
            return den(x, t, c, guidance=_g)

        start = time.perf_counter()
        if student:
            z = student_sample(fn, den.schedule, noise, times, cond, generator=gens)
        else:
            z = sample_ode(fn, den.schedule, noise, steps, cond, solver=info.solver)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        secs += time.perf_counter() - start
        lat.append(z.float().cpu())
    z = torch.cat(lat)
    images = decode_latents(pipe_dir, z, batch_size, device) if decode else z
    passes = steps if student else solver_nfe(info.solver, steps)  # the student loop: one pass a step
    nfe = passes * (2 if guidance != 1.0 else 1)  # CFG runs the conditional and the unconditional pass
    return ImageSamples(images, [prompts[p] for p, _ in jobs], [p for p, _ in jobs], [s for _, s in jobs], steps,
                        nfe, guidance, secs / len(jobs))


@torch.no_grad()
def decode_latents(pipe_dir: Path, z: Tensor, batch_size: int = 4, device="cpu") -> Tensor:
    """Scaled latents -> images in [-1, 1] with the pipeline's VAE (float32), on CPU."""
    from ..teachers import diffusers as dfs

    vae = dfs.VAEDecoder(Path(pipe_dir)).to(device)
    return torch.cat([vae(z[i:i + batch_size].to(device)).clamp(-1, 1).cpu() for i in range(0, len(z), batch_size)])


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float -> uint8 [N, 3, H, W] (the PNG pixels)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_images(samples: ImageSamples, out: Path) -> list[Path]:
    """One PNG per image (``p{prompt:03d}_s{seed}.png``), ``grid.png`` (a row per prompt) and ``images.json``."""
    import json

    from PIL import Image

    from ..viz import save_image_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    px = to_uint8(samples.images)
    paths, meta = [], []
    for img, p, s, text in zip(px, samples.prompt_index, samples.seeds, samples.prompts):
        f = out / f"p{p:03d}_s{s}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(f)
        paths.append(f)
        meta.append({"file": f.name, "prompt": text, "prompt_index": p, "seed": s})
    per_prompt = len(samples.seeds) // max(1, len(set(samples.prompt_index)))
    save_image_grid(samples.images, out / "grid.png", nrow=per_prompt, scale=1)
    (out / "images.json").write_text(json.dumps({"steps": samples.steps, "nfe": samples.nfe,
                                                 "guidance": samples.guidance, "images": meta}, indent=2) + "\n")
    return paths


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder, sorted by name."""
    from ..data.files import files_in

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
    from .images import frechet_distance

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


def score_images(s: ImageSamples, scorers: Scorers) -> dict:
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


def evaluate_pipeline(model, prompts: Sequence[str], scorers: Scorers, per_prompt: int = 1, seed: int = 0,
                      steps: int | None = None, guidance: float | None = None, teacher=None,
                      teacher_steps: int | None = None, batch_size: int = 4, device="cpu", name: str = "model"
                      ) -> list[dict]:
    """Rows of the table: the model with its metrics, then (for a student, when ``teacher`` is given) the teacher
    at its usual step count with its CFG, timed on one batch of the same size (no metrics), and the speed-up of
    each row against it (the ratio of milliseconds per image)."""
    s = generate_images(model, prompts, per_prompt, seed, steps, guidance, batch_size, device)
    row = {"model": name, "kind": model.info.kind, "steps": s.steps, "nfe": s.nfe, "images": len(s.seeds),
           "ms_per_image": 1000 * s.seconds_per_image, "guidance": s.guidance, **score_images(s, scorers)}
    rows = [row]
    if teacher is not None:
        t_steps = teacher_steps or usual_steps(teacher.info)
        n = min(batch_size, len(s.seeds))  # one batch of the same size as the model's, for a fair time
        ts = generate_images(teacher, (list(prompts) * n)[:n], 1, seed, t_steps, None, n, device, decode=False)
        rows.append({"model": "teacher", "kind": "teacher", "steps": ts.steps, "nfe": ts.nfe, "images": n,
                     "ms_per_image": 1000 * ts.seconds_per_image, "guidance": ts.guidance})
        for r in rows:
            r["speedup"] = ts.seconds_per_image / max(r["ms_per_image"] / 1000, 1e-12)
    elif model.info.kind == "teacher":
        row["speedup"] = 1.0
    return rows


def check_unsupported(**given) -> None:
    for name, value in given.items():
        if value:
            raise ValueError(f"--{name} is not supported: {UNSUPPORTED_SCORES[name]}, and dmdx loads nothing from "
                             "the hub (docs/real-models.md, Known gaps)")
