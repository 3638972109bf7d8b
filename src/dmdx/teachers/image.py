"""The image-pipeline teacher kind: local SD1.5 / SD2 / SDXL / SD3 / Flux diffusers folders (and their students).

Loading and wrapping the pipeline's networks is :mod:`dmdx.teachers.diffusers`; this adapter sets up a run from
one (prompts encoded once into RUN/prompts.safetensors, real images VAE-encoded once into RUN/latents.safetensors,
the student with an optional LoRA, resumable teacher pairs), exports its student (:mod:`dmdx.export`) and writes
or scores its samples (:mod:`dmdx.eval.pipelines`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import diffusers as dfs
from .adapter import EvalRequest, SampleRequest
from .common import pipeline_pairs, pipeline_student_info, real_guidance, student_times

IMAGE_FAMILIES = ("unet", "sd3", "flux")


class ImagePipelineAdapter:
    name = "image"

    def matches(self, spec: str) -> bool:
        # a hub id is claimed too: loading it gives the clear "download it first" error, never a download
        return dfs.is_pipeline_folder(spec) or dfs.looks_like_hub_id(spec)

    def owns(self, info) -> bool:
        return "pipeline" in info.extra and info.extra.get("family") in IMAGE_FAMILIES

    def kind(self, spec: str) -> str | None:
        path = Path(spec).expanduser()
        return dfs.pipeline_kind(path) if dfs.is_pipeline_folder(path) else None

    def load_teacher(self, spec: str, device="cpu"):
        return dfs.load_teacher(spec, device)

    # -- conditioning and data ------------------------------------------------------------------------------
    def conditioning(self, path: Path, prompts_file: str, shape, run_dir: Path) -> Path:
        """Encode the prompts once into RUN/prompts.safetensors."""
        cond_file = run_dir / "prompts.safetensors"
        if not cond_file.is_file():
            bank, null = dfs.encode_prompts(path, dfs.read_prompts(prompts_file), shape)
            dfs.save_cond(cond_file, bank, null)
        return cond_file

    def data(self, spec: str, path: Path, shape, run_dir: Path):
        """(latent Dataset, caption row per image or None, caption embeddings or None), cached in
        RUN/latents.safetensors.

        Images are resized to the training resolution and VAE-encoded once; a captioned folder (``name.png`` +
        ``name.txt``) also gets each unique caption encoded once, and every image the row of its caption (-1: none).
        """
        from safetensors.torch import load_file, save_file

        from ..data import Dataset
        from ..data.files import folder_captions, load_folder

        vs = dfs.vae_scale_factor(path)
        px = (shape[1] * vs, shape[2] * vs)
        lat_file = run_dir / "latents.safetensors"
        if not lat_file.is_file():
            folder = spec if "@" in spec else f"{spec}@{px[0]}x{px[1]}"
            _, images, _ = load_folder(folder)
            if tuple(images.shape[-2:]) != px or images.shape[1] != 3:
                raise ValueError(f"data {spec!r} has images of shape {list(images.shape[1:])}; the teacher "
                                 f"works at 3x{px[0]}x{px[1]} pixels (real.resolution)")
            tensors = {"x": dfs.encode_images(path, images)}
            captions = folder_captions(folder)
            unique = sorted({c for c in captions if c is not None})
            if unique:
                row = {c: i for i, c in enumerate(unique)}
                cap_bank, _ = dfs.encode_prompts(path, unique, shape)
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
        from ..methods import get_method
        from ..methods.base import Context
        from ..models import device_of

        rc = cfg.real
        method = get_method(cfg.method.name)
        dev = device_of(cfg.train.device)
        path = dfs.check_folder(cfg.teacher).resolve()
        _, family = dfs.denoiser_component(path)
        shape = dfs.latent_shape(path, rc.resolution)
        dfs.check_shape(path, shape)
        method.check(cfg.method, tuple(shape))
        if not rc.prompts:
            raise ValueError("a diffusers teacher needs --prompts FILE (one prompt a line)")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cond_file = self.conditioning(path, rc.prompts, shape, run_dir)
        bank, _ = dfs.load_cond(cond_file)
        teacher = dfs.load_teacher(path, dev, rc.teacher_dtype, rc.resolution, str(cond_file.resolve()), rc.guidance,
                                   rc.flux_guidance)
        if family == "flux" and teacher.denoiser.backbone.guidance_distilled and real_guidance(cfg, 1.0) != 1.0:
            raise ValueError("this Flux teacher is guidance-distilled: it has no real classifier-free guidance; set "
                             "real_guidance to 1 and choose the guidance embedding with real.flux_guidance")
        ds, caption_rows, caption_bank = self.data(cfg.data, path, shape, run_dir) if cfg.data else (None, None, None)
        times = student_times(cfg.student.times, teacher.denoiser.schedule)
        teacher_net = teacher.denoiser
        student = dfs.trainable_student(teacher_net, rc, cfg.train.seed)
        pairs = pipeline_pairs(cfg, teacher, bank, run_dir, dev) if method.pairs_needed(cfg.method) else None
        pixel = None
        if method.uses_pixel_backbone and rc.vision_encoder:
            pixel = dfs.PixelBackbone(path, rc.vision_encoder).to(dev)
        ctx = Context(teacher=teacher_net, teacher_net=teacher_net, student=student, data=ds, num_classes=0,
                      shape=tuple(shape), batch_size=cfg.train.batch_size, device=dev, times=times, pairs=pairs,
                      pixel_backbone=pixel, guidance=teacher.info.guidance, cond_bank=bank, caption_rows=caption_rows,
                      caption_bank=caption_bank)
        return ctx, pipeline_student_info(cfg, teacher, student, times)

    # -- after distilling ------------------------------------------------------------------------------------
    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path:
        from ..export import export_pipeline_student

        return export_pipeline_student(run, out, fmt)

    def hint(self, run: Path) -> str:
        return f"dmdx sample --model {run} --prompts PROMPTS --out {run}/images (or dmdx eval, dmdx export)"

    @staticmethod
    def _prompts(req: SampleRequest) -> list[str]:
        if not req.prompts:
            raise ValueError(f"{req.model} is a text-to-image model: pass --prompts FILE (one prompt a line)")
        if req.solver:
            raise ValueError("--solver is for built-in teachers; pipeline teachers sample with their own solver")
        return dfs.read_prompts(req.prompts)

    def sample(self, req: SampleRequest) -> str:
        from ..eval.pipelines import generate_images, save_images
        from ..models import load_model

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
        from ..eval.pipelines import (LPIPS, CLIPScorer, Scorers, check_unsupported, evaluate_pipeline, image_files,
                                      load_inception)
        from ..models import load_model

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
            teacher = load_model(m.info.extra["pipeline"], dev)
        return evaluate_pipeline(m, prompts, sc, req.per_prompt, req.seed, req.steps, req.guidance, teacher,
                                 req.teacher_steps, req.batch_size, dev, name=req.model)
