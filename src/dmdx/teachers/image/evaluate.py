"""Prompted sampling and the metric table of image-pipeline models (``dmdx sample`` / ``dmdx eval`` on a
pipeline folder or a student distilled from one).

:func:`generate_images`: prompts encoded with the pipeline's own ``encode_prompt``, latents drawn with the model's
own sampler (a student: its few-step loop at its times; a teacher: the ODE at ``steps`` with CFG), decoded with the
pipeline's VAE.  Image ``(prompt p, seed s)`` depends on ``s`` only (one generator per image, for the start noise
and every re-noise), so the same seed gives the same image in any batch.  The metrics are
:mod:`dmdx.eval.scorers`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ...eval.scorers import Scorers, score_images, to_uint8
from ...pipelines.image import VAEDecoder, encode_prompts, pipeline_kind
from ...sampling import nfe as solver_nfe
from ...sampling import sample_ode, student_sample, time_grid
from ...viz import save_image_grid

Tensor = torch.Tensor
# diffusers' default num_inference_steps of each family's pipeline: "the teacher at its usual step count"
USUAL_STEPS = {"sd": 50, "sdxl": 50, "sd3": 28, "flux": 28}


def is_pipeline_model(info) -> bool:
    return "pipeline" in (info.extra or {})


def pipeline_kind_of(info) -> str:
    return pipeline_kind(Path(info.extra["pipeline"]))


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
    bank, _ = encode_prompts(pipe_dir, prompts, shape)
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
    vae = VAEDecoder(Path(pipe_dir)).to(device)
    return torch.cat([vae(z[i:i + batch_size].to(device)).clamp(-1, 1).cpu() for i in range(0, len(z), batch_size)])


def save_images(samples: ImageSamples, out: Path) -> list[Path]:
    """One PNG per image (``p{prompt:03d}_s{seed}.png``), ``grid.png`` (a row per prompt) and ``images.json``."""
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
