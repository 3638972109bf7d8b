"""The video teacher kind: CogVideoX (2b / 5b / 1.5) and Wan (2.1, 2.2 TI2V-5B) text-to-video pipeline folders.

The folder is read by :mod:`dmdx.pipelines.video` and its transformer wrapped by :mod:`dmdx.nets.video`; this kind
loads the frozen teacher and sets up a run from it (the prompts encoded once, real videos VAE-encoded once, the
student with an optional LoRA, resumable teacher pairs); :mod:`.export` exports its students and writes samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...config import VideoConfig
from ...data.video import load_video_folder
from ...denoiser import Denoiser
from ...methods import get_method
from ...methods.base import Context
from ...models import MODEL_JSON, Model, ModelInfo, device_of, load_folder
from ...nets.video import BACKBONES, FAMILY_BACKBONE
from ...pipelines.folder import load_cond, read_prompts, save_cond
from ...pipelines.video import (DEFAULT_GUIDANCE, Geometry, check_video_folder, encode_prompts,
                                encode_videos, encoder_placement, geometry, is_video_folder, schedule_from_folder,
                                text_length, video_family)
from ...train.setup import pipeline_pairs, pipeline_student_info, student_times, trainable_student
from .export import export_video_run, sample_videos, student_call

Tensor = torch.Tensor


def load_teacher(path: str | Path, device="cpu", dtype: str = "float32", vc: VideoConfig | None = None,
                 cond_file: str | None = None, guidance: float | None = None):
    """A :class:`dmdx.models.Model` for a video pipeline folder: frozen backbone, schedule and prediction."""
    vc = vc or VideoConfig()
    path, family = check_video_folder(path)
    geo = geometry(path, vc.frames, vc.height, vc.width)
    sched, pred = schedule_from_folder(path)
    name = FAMILY_BACKBONE[family]
    config = dict(path=str(path.resolve()), dtype=dtype, cond_file=cond_file, shape=list(geo.shape),
                  max_sequence_length=text_length(path, family, vc))
    bb = BACKBONES[name](**config)
    den = Denoiser(bb, sched, pred).to(device).eval().requires_grad_(False)
    g = DEFAULT_GUIDANCE[family] if guidance is None else guidance
    info = ModelInfo(kind="teacher", backbone={"name": name, "config": config}, schedule=sched.to_dict(),
                     prediction=pred, shape=list(geo.shape), guidance=g, solver="euler", steps=50,
                     extra={"family": family, "pipeline": str(path.resolve()), "component": "transformer",
                            "video": {"frames": geo.frames, "height": geo.height, "width": geo.width}})
    return Model(den, info)


def load_model(spec: str | Path, device="cpu") -> Model:
    """A video pipeline folder (the teacher) or a student distilled from one (its run or model folder)."""
    if (Path(spec).expanduser() / MODEL_JSON).is_file():
        return load_folder(spec, device)
    return load_teacher(spec, device)


@dataclass
class VideoData:
    """Real videos as scaled latents [N, C, T, H, W], with caption embeddings where a caption exists."""

    name: str
    x: Tensor
    cond: dict[str, Tensor] | None = None  # caption embeddings [N, L, D] (zeros where no caption)
    has_caption: Tensor | None = None  # bool [N]
    kind: str = "video"
    labels: None = None
    num_classes: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class VideoContext(Context):
    """A Context whose real batches carry their own captions (random prompts of the run where none)."""

    grid_n: int = 2  # videos in the loop's sample strips

    def real_batch(self, n: int):
        ds = self.data
        if ds is None:
            raise ValueError("this method needs real videos (--data FOLDER)")
        idx = torch.randint(len(ds.x), (n,))
        cond = self._bank_rows(n)
        if ds.cond is not None:
            own = ds.has_caption[idx].to(self.device)
            for k, v in ds.cond.items():
                cap = v[idx].to(self.device)
                cond[k] = torch.where(own.view(-1, *[1] * (cap.ndim - 1)), cap, cond[k])
        return ds.x[idx].to(self.device), cond


class VideoKind:
    """The video teacher kind: CogVideoX / Wan pipeline folders (loading, prompts, videos, export, samples)."""

    name = "video"

    def matches(self, spec) -> bool:
        return is_video_folder(spec)

    def owns(self, info) -> bool:
        return "pipeline" in info.extra and info.extra.get("family") in FAMILY_BACKBONE

    def recipe_kind(self, spec) -> str:
        return video_family(Path(str(spec)).expanduser())

    def load_teacher(self, spec, device="cpu"):
        return load_teacher(spec, device)

    # -- conditioning ----------------------------------------------------------------------------------------
    def conditioning(self, path: Path, family: str, prompts_file: str, run_dir: Path, vc: VideoConfig) -> Path:
        """Encode the prompts once into RUN/prompts.safetensors (float32)."""
        cond_file = run_dir / "prompts.safetensors"
        if not cond_file.is_file():
            bank, null = encode_prompts(path, read_prompts(prompts_file), text_length(path, family, vc),
                                        **encoder_placement())
            save_cond(cond_file, bank, null)
        return cond_file

    # -- data ------------------------------------------------------------------------------------------------
    def data(self, spec: str, path: Path, family: str, geo: Geometry, run_dir: Path, vc: VideoConfig) -> VideoData:
        """Real videos (a folder of video files + optional NAME.txt captions), VAE-encoded once into
        RUN/latents.safetensors."""
        lat_file = run_dir / "latents.safetensors"
        if not lat_file.is_file():
            folder = load_video_folder(spec, geo.frames, geo.height, geo.width)
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            state = {"x": encode_videos(path, folder.videos, device=dev)}
            caps = folder.captions
            if any(c is not None for c in caps):
                given = [c for c in caps if c is not None]
                bank, _ = encode_prompts(path, given, text_length(path, family, vc), **encoder_placement())
                text = torch.zeros(len(caps), *bank["text"].shape[1:])
                rows = [i for i, c in enumerate(caps) if c is not None]
                text[rows] = bank["text"]
                state.update({"cond.text": text, "has_caption": torch.tensor([c is not None for c in caps])})
            save_file(state, str(lat_file))
        d = load_file(str(lat_file))
        if tuple(d["x"].shape[1:]) != tuple(geo.shape):
            raise ValueError(f"cached latents {lat_file} have shape {list(d['x'].shape[1:])}, the teacher "
                             f"{list(geo.shape)}")
        cond = {"text": d["cond.text"]} if "cond.text" in d else None
        return VideoData(name=str(spec), x=d["x"], cond=cond, has_caption=d.get("has_caption"))

    # -- the run ---------------------------------------------------------------------------------------------
    def build_run(self, cfg, run_dir: Path):
        """Teacher, cached prompt embeddings, cached video latents, student (maybe LoRA), pairs; checked first."""
        rc, vc = cfg.real, cfg.video
        method = get_method(cfg.method.name)
        dev = device_of(cfg.train.device)
        path, family = check_video_folder(cfg.teacher)
        path = path.resolve()
        geo = geometry(path, vc.frames, vc.height, vc.width)
        method.check(cfg.method, tuple(geo.shape))
        sched, _ = schedule_from_folder(path)
        times = student_times(cfg.student.times, sched)
        if getattr(cfg.method, "gan", False) and not cfg.data:  # DMD2's GAN term: before the slow set-up
            raise ValueError(f"method {cfg.method.name!r} has a GAN term on real videos: pass --data FOLDER (video "
                             "files, optional NAME.txt captions), or --set method.gan=false")
        if not rc.prompts:
            raise ValueError("a video teacher needs --prompts FILE (one prompt a line)")
        if rc.resolution:
            raise ValueError("real.resolution is for image pipelines; a video teacher's size is video.height, "
                             "video.width and video.frames")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cond_file = self.conditioning(path, family, rc.prompts, run_dir, vc)
        bank, _ = load_cond(cond_file)
        ds = self.data(cfg.data, path, family, geo, run_dir, vc) if cfg.data else None
        teacher = load_teacher(path, dev, rc.teacher_dtype, vc, str(cond_file.resolve()), rc.guidance)
        teacher_net = teacher.denoiser
        student = trainable_student(teacher_net, rc, cfg.train.seed)
        pairs = pipeline_pairs(cfg, teacher, bank, run_dir, dev) if method.pairs_needed(cfg.method) else None
        ctx = VideoContext(teacher=teacher_net, teacher_net=teacher_net, student=student, data=ds, num_classes=0,
                               shape=tuple(geo.shape), batch_size=cfg.train.batch_size, device=dev, times=times,
                               pairs=pairs, guidance=teacher.info.guidance, cond_bank=bank)
        return ctx, pipeline_student_info(cfg, teacher, student, times)

    # -- export and samples ----------------------------------------------------------------------------------
    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path:
        return export_video_run(run, out, fmt)

    def student_call(self, info):
        """How a stock pipeline runs this kind's exported student (:func:`.export.student_call`)."""
        return student_call(info)

    def hint(self, run: Path) -> str:
        return f"dmdx sample --model {run} --prompts PROMPTS --out {run}/videos"

    def sample(self, req) -> str:
        if req.solver:
            raise ValueError("--solver is for built-in teachers; video teachers sample with Euler steps")
        if not req.prompts:
            raise ValueError("video models need --prompts FILE (one prompt a line)")
        files = sample_videos(load_model(req.model, req.device), req.prompts, Path(req.out), n=req.per_prompt,
                              seed=req.seed, steps=req.steps, guidance=req.guidance, device=req.device)
        return f"{len(files)} videos (mp4 + GIF preview) -> {req.out}"

    def evaluate(self, req) -> list[dict]:
        raise ValueError(f"{req.model}: dmdx eval has no metric for video models; write videos with "
                         "dmdx sample --model MODEL --prompts FILE --out DIR")
