"""Run configs and the set-up of a run: teacher, data, student, pairs; then the shared loop.

``distill(cfg, out)`` backs ``dmdx distill``; ``train_teacher(cfg, out)`` backs ``dmdx teacher train`` (the same
loop running the ``dsm`` method on a fresh network).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import StudentConfig, TrainConfig, from_dict, save_json, to_dict
from ..denoiser import Denoiser
from ..methods import get_method
from ..methods.base import Context, frozen_copy
from ..models import Model, ModelInfo, device_of, load_model, read_info
from ..schedules import make_schedule
from . import dist
from ..teachers.video import VideoConfig

CONFIG_JSON = "config.json"


@dataclass
class PairsConfig:
    """Teacher ODE pairs for DMD / ADP / DMDX: an existing folder, or collected into RUN/pairs (resumable)."""

    path: str | None = None
    # None: as many pairs as the run draws, train.steps * train.batch_size, capped at 2000 (so a short run does not
    # wait for pairs it never uses; pairs are drawn with replacement)
    n: int | None = None
    steps: int = 50
    solver: str = "heun"
    guidance: float | None = None  # CFG of the teacher's ODE; None: the method's real_guidance, else the teacher's
    batch_size: int | None = None  # integrated at once; None: 1000 (built-in teachers), train.batch_size (pipelines)

    def resolved_n(self, train: TrainConfig) -> int:
        return self.n if self.n is not None else max(1, min(2000, train.steps * train.batch_size))


@dataclass
class LoraSpec:
    """peft LoRA on a trainable copy; ``rank = 0`` trains the full network."""

    rank: int = 0
    alpha: float = 0.0  # 0: alpha = rank
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def spec(self) -> dict | None:
        if self.rank <= 0:
            return None
        return {"rank": self.rank, "alpha": self.alpha or float(self.rank), "targets": list(self.targets)}


@dataclass
class RealModelConfig:
    """Diffusers pipeline teachers (``--teacher`` a folder with model_index.json); see docs/real-models.md."""

    prompts: str | None = None  # one prompt a line, encoded once into RUN/prompts.safetensors
    resolution: int | None = None  # pixels; default: the model's native size
    teacher_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    guidance: float | None = None  # the real score's CFG; None: 7.5 (UNets), 7.0 (SD3), 1.0 (Flux)
    flux_guidance: float = 3.5  # the guidance embedding of guidance-distilled Flux teachers (fixed)
    student_lora: LoraSpec = field(default_factory=LoraSpec)
    fake_lora: LoraSpec = field(default_factory=LoraSpec)
    grad_checkpointing: bool = False
    vision_encoder: str | None = None  # local transformers folder (DINOv2) for ADP's pixel discriminator


@dataclass
class RunConfig:
    method: Any  # the method's config dataclass (its ``name`` picks the method)
    teacher: str | None = None
    data: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    real: RealModelConfig = field(default_factory=RealModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)  # video teachers (dmdx.teachers.video)
    surrogate_steps: int = 1500  # analytic teachers: steps of the MLP fitted to the exact denoiser (see docs)
    recipe: Literal["auto", "none"] = "auto"  # auto: defaults that fit the teacher's kind (dmdx.recipes); none: off


@dataclass
class TeacherConfig:
    """A built-in teacher: MLP for vectors, UNet for images, trained by denoising score matching."""

    data: str = "digits"
    schedule: dict = field(default_factory=lambda: {"name": "flow", "shift": 1.0})
    prediction: str = "flow"
    arch: dict = field(default_factory=dict)  # overrides of the backbone's constructor arguments
    conditional: bool | None = None  # default: class-conditional when the data has labels and is an image set
    guidance: float = 1.5  # default CFG scale recorded for sampling (and as the real score's in distillation)
    solver: str = "heun"
    sample_steps: int = 50
    method: Any = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=4000, batch_size=128, lr=1e-3,
                                                                   weight_decay=0.0, ema_decay=0.999,
                                                                   ckpt_every=1000, sample_every=1000))


def run_config_from_dict(d: dict) -> RunConfig:
    d = dict(d)
    m = d.pop("method", None)
    if not isinstance(m, dict) or "name" not in m:
        raise ValueError("config needs method.name")
    cls = get_method(m["name"]).Config
    cfg = from_dict(RunConfig, {**d, "method": None})
    cfg.method = from_dict(cls, m, "method")
    return cfg


def default_run_config(method: str) -> RunConfig:
    return RunConfig(method=get_method(method).Config())


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_JSON} in {run_dir}: not a dmdx run folder")
    return run_config_from_dict(json.loads(path.read_text()))


def backbone_spec(backbone) -> dict:
    from ..nets import BACKBONES

    for name, cls in BACKBONES.items():
        if type(backbone) is cls:
            return {"name": name, "config": dict(backbone.config)}
    raise ValueError(f"backbone {type(backbone).__name__} is not in the registry; cannot save it")


def _vector_backbone(dim: int, num_classes: int, arch: dict):
    from ..nets import build_backbone

    return build_backbone("mlp", **{"dim": dim, "hidden": 128, "depth": 3, "num_classes": num_classes, **arch})


def _image_backbone(shape, num_classes: int, arch: dict):
    from ..nets import build_backbone

    c, h, _ = shape
    return build_backbone("unet", **{"in_channels": c, "image_size": h, "base_channels": 32, "channel_mult": [1, 2],
                                     "num_res_blocks": 1, "num_classes": num_classes, **arch})


# -- teachers --------------------------------------------------------------------------------------------------
def train_teacher(cfg: TeacherConfig, out: Path, resume: bool = False) -> Path:
    from ..data import load_dataset
    from ..methods.dsm import DSMConfig
    from .loop import Trainer

    out = Path(out)
    ds = load_dataset(cfg.data, "train")
    dev = device_of(cfg.train.device)
    cond = cfg.conditional if cfg.conditional is not None else (ds.kind == "image" and ds.num_classes > 0)
    if cond and ds.num_classes <= 0:
        raise ValueError(f"dataset {cfg.data!r} has no labels; it cannot train a class-conditional teacher")
    k = ds.num_classes if cond else 0
    torch.manual_seed(cfg.train.seed)
    bb = _vector_backbone(ds.shape[0], k, cfg.arch) if ds.kind == "vector" else _image_backbone(ds.shape, k, cfg.arch)
    den = Denoiser(bb, make_schedule(cfg.schedule), cfg.prediction).to(dev)
    if cfg.method is None:
        cfg.method = DSMConfig()
    info = ModelInfo(kind="teacher", backbone=backbone_spec(bb), schedule=den.schedule.to_dict(),
                     prediction=cfg.prediction, shape=list(ds.shape), num_classes=k, data=cfg.data,
                     guidance=cfg.guidance if k else 1.0, solver=cfg.solver, steps=cfg.sample_steps)
    ctx = Context(teacher=None, teacher_net=None, student=den, data=ds, num_classes=k, shape=tuple(ds.shape),
                  batch_size=cfg.train.batch_size, device=dev)
    world = dist.setup(cfg.train.parallel, dev)
    out.mkdir(parents=True, exist_ok=True)
    if world.main:
        save_json(to_dict(cfg), out / CONFIG_JSON)
    return Trainer(out, cfg.method, cfg.train, ctx, info, world=world).run(resume=resume)


# -- distillation ----------------------------------------------------------------------------------------------
def fit_surrogate(model: Model, steps: int, batch_size: int = 512, seed: int = 0, progress: bool = True) -> Denoiser:
    """An MLP regressed onto an analytic teacher's exact x0 (the network that initialises student and fake score,
    and whose features the discriminators use: an analytic teacher has no network of its own)."""
    gmm = model.denoiser.backbone
    sched = model.denoiser.schedule
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bb = _vector_backbone(gmm.dim, 0, {})
    den = Denoiser(bb, sched, "x0")
    opt = torch.optim.AdamW(bb.parameters(), lr=1e-3, weight_decay=0.0)
    rng = range(steps)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="fit MLP to the exact teacher", mininterval=1.0)
    for _ in rng:
        x0, _ = gmm.sample(batch_size, g)
        t = torch.rand(batch_size, generator=g, dtype=torch.float64)
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            target = model.denoiser(x_t, t)
        loss = torch.nn.functional.mse_loss(den(x_t, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return den.requires_grad_(False).eval()


def _teacher_net(teacher: Model, cfg: RunConfig, run_dir: Path, dev) -> Denoiser:
    if not teacher.analytic:
        return teacher.denoiser
    from ..models import MODEL_WEIGHTS, build_denoiser, load_weights, save_model

    folder = run_dir / "surrogate"
    if (folder / MODEL_WEIGHTS).is_file():
        info = read_info(folder)
        den = build_denoiser(info)
        den.backbone.load_state_dict(load_weights(folder / MODEL_WEIGHTS))
        return den.to(dev).requires_grad_(False).eval()
    den = fit_surrogate(teacher, cfg.surrogate_steps, seed=cfg.train.seed, progress=cfg.train.progress)
    save_model(folder, den, ModelInfo(kind="teacher", backbone=backbone_spec(den.backbone),
                                      schedule=den.schedule.to_dict(), prediction="x0", shape=teacher.info.shape))
    return den.to(dev)


def build_run(cfg: RunConfig, run_dir: Path) -> tuple[Context, ModelInfo]:
    """Load the teacher and data, make the student, collect or load pairs; validate before training."""
    from ..data import load_dataset

    from .loop import check_lr_scale

    method = get_method(cfg.method.name)
    check_lr_scale(cfg.method, cfg.train)  # before the slow set-up
    dev = device_of(cfg.train.device)
    if not cfg.teacher:
        raise ValueError("--teacher is required (a dmdx model folder or gmm:NAME)")
    from ..teachers.adapter import adapter_for

    adapter = adapter_for(cfg.teacher)  # teacher kinds behind the adapter interface (video pipelines)
    if adapter is not None:
        return adapter.build_run(cfg, Path(run_dir))
    from ..teachers import diffusers as dfs

    if dfs.is_pipeline_folder(cfg.teacher) or dfs.looks_like_hub_id(cfg.teacher):
        return build_pipeline_run(cfg, Path(run_dir))
    teacher = load_model(cfg.teacher, dev)
    tinfo = teacher.info
    method.check(cfg.method, tuple(tinfo.shape))
    data_name = cfg.data or tinfo.data
    ds = load_dataset(data_name, "train") if data_name else None
    if ds is not None and list(ds.shape) != list(tinfo.shape):
        raise ValueError(f"data {data_name!r} has samples of shape {list(ds.shape)} but the teacher expects "
                         f"{tinfo.shape}")
    times = [float(t) for t in cfg.student.times]
    if not times or any(not 0 < t <= 1 for t in times) or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"student.times must be decreasing values in (0, 1], got {times}")
    teacher_net = _teacher_net(teacher, cfg, run_dir, dev)
    torch.manual_seed(cfg.train.seed)
    student = frozen_copy(teacher_net, trainable=True).train()
    pairs = None
    if method.needs_pairs:
        pairs = _pairs(cfg, teacher, run_dir, dev)
        if list(pairs.x0.shape[1:]) != list(tinfo.shape):
            raise ValueError(f"pairs have shape {list(pairs.x0.shape[1:])}, the teacher {tinfo.shape}")
    pixel = None
    if ds is not None and ds.kind == "image" and method.uses_pixel_backbone:
        from ..eval import get_pixel_backbone

        pixel = get_pixel_backbone(data_name, progress=cfg.train.progress).to(dev)
    ctx = Context(teacher=teacher.denoiser, teacher_net=teacher_net, student=student, data=ds,
                  num_classes=tinfo.num_classes, shape=tuple(tinfo.shape), batch_size=cfg.train.batch_size,
                  device=dev, times=times, pairs=pairs, pixel_backbone=pixel, guidance=tinfo.guidance)
    info = ModelInfo(kind="student", backbone=backbone_spec(teacher_net.backbone),
                     schedule=teacher_net.schedule.to_dict(), prediction=teacher_net.prediction,
                     shape=list(tinfo.shape), num_classes=tinfo.num_classes, data=data_name, guidance=1.0,
                     steps=len(times), times=times, extra={"method": cfg.method.name, "teacher": cfg.teacher})
    return ctx, info


def distill(cfg: RunConfig, out: Path, resume: bool = False) -> Path:
    from .loop import Trainer, check_lr_scale

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_lr_scale(cfg.method, cfg.train)  # before a bad config is written (build_run checks it for other callers)
    world = dist.setup(cfg.train.parallel, device_of(cfg.train.device))
    if world.main:
        save_json(to_dict(cfg), out / CONFIG_JSON)
    with dist.rank_zero_first(world):  # rank 0 fills the caches (surrogate, pairs, prompts), the others read them
        ctx, info = build_run(cfg, out)
    return Trainer(out, cfg.method, cfg.train, ctx, info, world=world).run(resume=resume)


def _real_guidance(cfg: RunConfig, default: float) -> float:
    m = cfg.method
    sub = getattr(m, "adm", m)  # DMDX: the ADM stage's
    value = getattr(sub, "real_guidance", None)
    return default if value is None else value


def _pairs(cfg: RunConfig, teacher: Model, run_dir: Path, dev, cond_bank=None, meta_extra=None, batch_size=None,
           shard_size: int = 1000):
    """The run's teacher pairs: ``pairs.path``, or collected (resumably) into RUN/pairs at the run's guidance."""
    from ..pairs import check_pairs, collect_pairs, load_pairs

    pc = cfg.pairs
    guidance = pc.guidance if pc.guidance is not None else _real_guidance(cfg, teacher.info.guidance)
    if pc.path:
        folder = Path(pc.path)
    else:
        folder = collect_pairs(teacher, run_dir / "pairs", pc.resolved_n(cfg.train), pc.steps, pc.solver, guidance,
                               seed=cfg.train.seed, shard_size=shard_size, device=dev, progress=cfg.train.progress,
                               batch_size=pc.batch_size or batch_size, cond_bank=cond_bank, meta_extra=meta_extra)
    check_pairs(folder, guidance, teacher.info.shape)
    return load_pairs(folder, cond_bank)


# -- diffusers pipeline teachers -------------------------------------------------------------------------------
def _pipeline_data(cfg: RunConfig, path: Path, shape, run_dir: Path):
    """(latent Dataset, caption row per image or None, caption embeddings or None), cached in RUN/latents.safetensors.

    Images are resized to the training resolution and VAE-encoded once; a captioned folder (``name.png`` +
    ``name.txt``) also gets each unique caption encoded once, and every image the row of its caption (-1: none).
    """
    from safetensors.torch import load_file, save_file

    from ..data import Dataset
    from ..data.files import folder_captions, load_folder
    from ..teachers import diffusers as dfs

    vs = dfs.vae_scale_factor(path)
    px = (shape[1] * vs, shape[2] * vs)
    lat_file = run_dir / "latents.safetensors"
    if not lat_file.is_file():
        spec = cfg.data if "@" in cfg.data else f"{cfg.data}@{px[0]}x{px[1]}"
        _, images, _ = load_folder(spec)
        if tuple(images.shape[-2:]) != px or images.shape[1] != 3:
            raise ValueError(f"data {cfg.data!r} has images of shape {list(images.shape[1:])}; the teacher "
                             f"works at 3x{px[0]}x{px[1]} pixels (real.resolution)")
        tensors = {"x": dfs.encode_images(path, images)}
        captions = folder_captions(spec)
        unique = sorted({c for c in captions if c is not None})
        if unique:
            row = {c: i for i, c in enumerate(unique)}
            cap_bank, _ = dfs.encode_prompts(path, unique, shape)
            tensors["caption_rows"] = torch.tensor([row.get(c, -1) for c in captions])
            tensors.update({f"caption.{k}": v.contiguous() for k, v in cap_bank.items()})
        save_file(tensors, str(lat_file))
    lat = load_file(str(lat_file))
    ds = Dataset(name=str(cfg.data), kind="image", x=lat["x"])
    if tuple(ds.shape) != tuple(shape):
        raise ValueError(f"cached latents {lat_file} have shape {list(ds.shape)}, the teacher {list(shape)}")
    if "caption_rows" not in lat:
        return ds, None, None
    return ds, lat["caption_rows"], {k[8:]: v for k, v in lat.items() if k.startswith("caption.")}


def build_pipeline_run(cfg: RunConfig, run_dir: Path) -> tuple[Context, ModelInfo]:
    """Teacher, cached prompt embeddings, cached VAE latents, student (maybe LoRA), pairs; checked before training."""
    import copy

    from ..teachers import diffusers as dfs

    rc = cfg.real
    method = get_method(cfg.method.name)
    dev = device_of(cfg.train.device)
    path = dfs.check_folder(cfg.teacher).resolve()
    comp, family = dfs.denoiser_component(path)
    shape = dfs.latent_shape(path, rc.resolution)
    dfs.check_shape(path, shape)
    method.check(cfg.method, tuple(shape))
    if not rc.prompts:
        raise ValueError("a diffusers teacher needs --prompts FILE (one prompt a line)")
    run_dir.mkdir(parents=True, exist_ok=True)
    cond_file = run_dir / "prompts.safetensors"
    if not cond_file.is_file():
        bank, null = dfs.encode_prompts(path, dfs.read_prompts(rc.prompts), shape)
        dfs.save_cond(cond_file, bank, null)
    bank, _ = dfs.load_cond(cond_file)
    teacher = dfs.load_teacher(path, dev, rc.teacher_dtype, rc.resolution, str(cond_file.resolve()), rc.guidance,
                               rc.flux_guidance)
    tinfo = teacher.info
    if family == "flux" and teacher.denoiser.backbone.guidance_distilled and _real_guidance(cfg, 1.0) != 1.0:
        raise ValueError("this Flux teacher is guidance-distilled: it has no real classifier-free guidance; set "
                         "real_guidance to 1 and choose the guidance embedding with real.flux_guidance")
    ds, caption_rows, caption_bank = _pipeline_data(cfg, path, shape, run_dir) if cfg.data else (None, None, None)
    times = [float(t) for t in cfg.student.times]
    if not times or any(not 0 < t <= 1 for t in times) or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"student.times must be decreasing values in (0, 1], got {times}")
    sched = teacher.denoiser.schedule
    if family == "unet":  # integer timesteps, so that the exported scheduler reproduces the student exactly
        T = sched.num_train_timesteps - 1
        times = [max(1, round(t * T)) / T for t in times]
    teacher_net = teacher.denoiser
    student = dfs.trainable_student(teacher_net, rc, cfg.train.seed)
    pairs = None
    if method.needs_pairs:
        from ..pairs import prompts_fingerprint

        meta = {"teacher": str(path), "teacher_dtype": rc.teacher_dtype,
                "prompts": prompts_fingerprint(dfs.read_prompts(rc.prompts))}
        batch = cfg.pairs.batch_size or cfg.train.batch_size  # what fits for training fits for no-grad sampling
        pairs = _pairs(cfg, teacher, run_dir, dev, cond_bank=bank, meta_extra=meta, batch_size=batch,
                       shard_size=max(64, batch))
    pixel = None
    if method.uses_pixel_backbone and rc.vision_encoder:
        pixel = dfs.PixelBackbone(path, rc.vision_encoder).to(dev)
    ctx = Context(teacher=teacher_net, teacher_net=teacher_net, student=student, data=ds, num_classes=0,
                  shape=tuple(shape), batch_size=cfg.train.batch_size, device=dev, times=times, pairs=pairs,
                  pixel_backbone=pixel, guidance=tinfo.guidance, cond_bank=bank, caption_rows=caption_rows,
                  caption_bank=caption_bank)
    info = ModelInfo(kind="student", backbone={"name": tinfo.backbone["name"], "config": dict(student.backbone.config)},
                     schedule=sched.to_dict(), prediction=teacher_net.prediction, shape=list(shape), data=cfg.data,
                     guidance=1.0, steps=len(times), times=times,
                     extra={"method": cfg.method.name, "teacher": str(path), **tinfo.extra})
    return ctx, info
