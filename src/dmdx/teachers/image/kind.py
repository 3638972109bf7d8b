"""The image-pipeline teacher kind: local SD1.5 / SD2 / SDXL / SD3 / Flux diffusers folders (and their students).

The folder is read by :mod:`dmdx.pipelines.image` and its networks wrapped by :mod:`dmdx.nets.pipeline`; this kind
loads the frozen teacher, sets up a run from it (prompts encoded once into RUN/prompts.safetensors, real images
VAE-encoded once into RUN/latents.safetensors, the student with an optional LoRA, resumable teacher pairs), exports
its student (:mod:`.export`) and writes or scores its samples (:mod:`.evaluate`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...config import EvalRequest, SampleRequest
from ...data import Dataset
from ...data import files as data_files
from ...denoiser import Denoiser
from ...eval.scorers import LPIPS, CLIPScorer, Scorers, check_unsupported, image_files, load_inception
from ...methods import get_method
from ...methods.base import Context
from ...models import MODEL_JSON, Model, ModelInfo, device_of, load_folder
from ...nets.pipeline import BACKBONES, FAMILY_BACKBONE, PixelBackbone
from ...pipelines.folder import check_folder, is_pipeline_folder, load_cond, looks_like_hub_id, read_prompts, save_cond
from ...pipelines.image import (DEFAULT_GUIDANCE, check_shape, denoiser_component, encode_images, encode_prompts,
                                latent_shape, pipeline_kind, schedule_from_folder, vae_scale_factor)
from ...train.setup import pipeline_pairs, pipeline_student_info, real_guidance, student_times, trainable_student
from .evaluate import evaluate_pipeline, generate_images, save_images
from .export import export_pipeline_student, student_call

IMAGE_FAMILIES = ("unet", "sd3", "flux")


def load_teacher(path: str | Path, device="cpu", dtype: str = "float32", resolution: int | None = None,
                 cond_file: str | None = None, guidance: float | None = None, flux_guidance: float = 3.5):
    """A :class:`dmdx.models.Model` for a pipeline folder: frozen backbone, schedule and prediction from it."""
    path = check_folder(path)
    comp, family = denoiser_component(path)
    shape = latent_shape(path, resolution)
    check_shape(path, shape)
    sched, pred = schedule_from_folder(path, shape)
    name = FAMILY_BACKBONE[family]
    config = dict(path=str(path.resolve()), dtype=dtype, cond_file=cond_file, shape=list(shape),
                  guidance=flux_guidance)
    bb = BACKBONES[name](**config)
    den = Denoiser(bb, sched, pred).to(device).eval().requires_grad_(False)
    g = DEFAULT_GUIDANCE[family] if guidance is None else guidance
    info = ModelInfo(kind="teacher", backbone={"name": name, "config": config}, schedule=sched.to_dict(),
                     prediction=pred, shape=list(shape), guidance=g, solver="euler", steps=28,
                     extra={"family": family, "pipeline": str(path.resolve()), "component": comp})
    return Model(den, info)


def load_model(spec: str | Path, device="cpu") -> Model:
    """A pipeline folder (the teacher) or a student distilled from one (its run or model folder)."""
    if (Path(spec).expanduser() / MODEL_JSON).is_file():
        return load_folder(spec, device)
    return load_teacher(spec, device)


class ImagePipelineKind:
    name = "image"

    def matches(self, spec: str) -> bool:
        # a hub id is claimed too: loading it gives the clear "download it first" error, never a download
        return is_pipeline_folder(spec) or looks_like_hub_id(spec)

    def owns(self, info) -> bool:
        return "pipeline" in info.extra and info.extra.get("family") in IMAGE_FAMILIES

    def recipe_kind(self, spec: str) -> str | None:
        path = Path(spec).expanduser()
        return pipeline_kind(path) if is_pipeline_folder(path) else None

    def load_teacher(self, spec: str, device="cpu"):
        return load_teacher(spec, device)

    # -- conditioning and data ------------------------------------------------------------------------------
    def conditioning(self, path: Path, prompts_file: str, shape, run_dir: Path) -> Path:
        """Encode the prompts once into RUN/prompts.safetensors."""
        cond_file = run_dir / "prompts.safetensors"
        if not cond_file.is_file():
            bank, null = encode_prompts(path, read_prompts(prompts_file), shape)
            save_cond(cond_file, bank, null)
        return cond_file

    def data(self, spec: str, path: Path, shape, run_dir: Path):
        """(latent Dataset, caption row per image or None, caption embeddings or None), cached in
        RUN/latents.safetensors.

        Images are resized to the training resolution and VAE-encoded once; a captioned folder (``name.png`` +
        ``name.txt``) also gets each unique caption encoded once, and every image the row of its caption (-1: none).
        """
        vs = vae_scale_factor(path)
        px = (shape[1] * vs, shape[2] * vs)
        lat_file = run_dir / "latents.safetensors"
        if not lat_file.is_file():
            folder = spec if "@" in spec else f"{spec}@{px[0]}x{px[1]}"
            _, images, _ = data_files.load_folder(folder)
            if tuple(images.shape[-2:]) != px or images.shape[1] != 3:
                raise ValueError(f"data {spec!r} has images of shape {list(images.shape[1:])}; the teacher "
                                 f"works at 3x{px[0]}x{px[1]} pixels (real.resolution)")
            tensors = {"x": encode_images(path, images)}
            captions = data_files.folder_captions(folder)
            unique = sorted({c for c in captions if c is not None})
            if unique:
                row = {c: i for i, c in enumerate(unique)}
                cap_bank, _ = encode_prompts(path, unique, shape)
                tensors["caption_rows"] = torch.tensor([row.get(c, -1) for c in captions])
                tensors.update({f"caption.{k}": v.contiguous() for k, v in cap_bank.items()})
            save_file(tensors, str(lat_file))
        lat = load_file(str(lat_file))
        ds = Dataset(name=str(spec), kind="image", x=lat["x"])
        if tuple(ds.shape) != tuple(shape):
            raise ValueError(f"cached latents {lat_file} have shape {list(ds.shape)}, the teacher {list(shape)}")
        if "caption_rows" not in lat:
            return ds, None, None
        return ds, lat["caption_rows"], {k[8:]: v for k, v in lat.items() if k.startswith("caption.")}

    # -- the run ---------------------------------------------------------------------------------------------
    def build_run(self, cfg, run_dir: Path):
        """Teacher, cached prompt embeddings, cached VAE latents, student (maybe LoRA), pairs; checked first."""
        rc = cfg.real
        method = get_method(cfg.method.name)
        dev = device_of(cfg.train.device)
        path = check_folder(cfg.teacher).resolve()
        _, family = denoiser_component(path)
        shape = latent_shape(path, rc.resolution)
        check_shape(path, shape)
        method.check(cfg.method, tuple(shape))
        if not rc.prompts:
            raise ValueError("a diffusers teacher needs --prompts FILE (one prompt a line)")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cond_file = self.conditioning(path, rc.prompts, shape, run_dir)
        bank, _ = load_cond(cond_file)
        teacher = load_teacher(path, dev, rc.teacher_dtype, rc.resolution, str(cond_file.resolve()), rc.guidance,
                                   rc.flux_guidance)
        if family == "flux" and teacher.denoiser.backbone.guidance_distilled and real_guidance(cfg, 1.0) != 1.0:
            raise ValueError("this Flux teacher is guidance-distilled: it has no real classifier-free guidance; set "
                             "real_guidance to 1 and choose the guidance embedding with real.flux_guidance")
        ds, caption_rows, caption_bank = self.data(cfg.data, path, shape, run_dir) if cfg.data else (None, None, None)
        times = student_times(cfg.student.times, teacher.denoiser.schedule)
        teacher_net = teacher.denoiser
        student = trainable_student(teacher_net, rc, cfg.train.seed)
        pairs = pipeline_pairs(cfg, teacher, bank, run_dir, dev) if method.pairs_needed(cfg.method) else None
        pixel = None
        if method.uses_pixel_backbone and rc.vision_encoder:
            pixel = PixelBackbone(path, rc.vision_encoder).to(dev)
        ctx = Context(teacher=teacher_net, teacher_net=teacher_net, student=student, data=ds, num_classes=0,
                      shape=tuple(shape), batch_size=cfg.train.batch_size, device=dev, times=times, pairs=pairs,
                      pixel_backbone=pixel, guidance=teacher.info.guidance, cond_bank=bank, caption_rows=caption_rows,
                      caption_bank=caption_bank)
        return ctx, pipeline_student_info(cfg, teacher, student, times)

    # -- after distilling ------------------------------------------------------------------------------------
    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path:
        return export_pipeline_student(run, out, fmt)

    def student_call(self, info):
        """How a stock pipeline runs this kind's exported student (:func:`.export.student_call`)."""
        return student_call(info)

    def hint(self, run: Path) -> str:
        return f"dmdx sample --model {run} --prompts PROMPTS --out {run}/images (or dmdx eval, dmdx export)"

    @staticmethod
    def _prompts(req: SampleRequest) -> list[str]:
        if not req.prompts:
            raise ValueError(f"{req.model} is a text-to-image model: pass --prompts FILE (one prompt a line)")
        if req.solver:
            raise ValueError("--solver is for built-in teachers; pipeline teachers sample with their own solver")
        return read_prompts(req.prompts)

    def sample(self, req: SampleRequest) -> str:
        prompts = self._prompts(req)
        out = Path(req.out)
        if out.suffix.lower() in (".png", ".npz"):
            raise ValueError(f"--out is a folder for a text-to-image model (PNG per image + grid.png), got "
                             f"{out.name!r}")
        m = load_model(req.model, req.device)
        s = generate_images(m, prompts, req.per_prompt, req.seed, req.steps, req.guidance, req.batch_size, req.device)
        paths = save_images(s, out)
        return (f"{len(paths)} images ({s.steps} steps, {s.nfe} network evaluations each, "
                f"{1000 * s.seconds_per_image:.1f} ms/image) -> {out}/ (grid.png, images.json)")

    def evaluate(self, req: EvalRequest) -> list[dict]:
        check_unsupported(hpsv2=req.hpsv2, imagereward=req.imagereward)
        prompts = self._prompts(req)
        if req.inception and not req.ref:
            raise ValueError("--inception is used for FID/KID against --ref DIR; pass --ref too")
        dev = req.device
        sc = Scorers(kid_subset_size=req.kid_subset_size)
        if req.ref:  # check every local file before the (long) sampling
            sc.inception = load_inception(req.inception, dev)
            sc.reference = image_files(req.ref)
        if req.clip:
            sc.clip = CLIPScorer(req.clip, dev)
        if req.pickscore:
            sc.pickscore = CLIPScorer(req.pickscore, dev)
        if req.lpips:
            sc.lpips = LPIPS.from_file(req.lpips, dev)
        m = load_model(req.model, dev)
        teacher = None
        if m.info.kind == "student" and req.teacher_steps != 0:
            teacher = load_teacher(m.info.extra["pipeline"], dev)
        return evaluate_pipeline(m, prompts, sc, req.per_prompt, req.seed, req.steps, req.guidance, teacher,
                                 req.teacher_steps, req.batch_size, dev, name=req.model)
