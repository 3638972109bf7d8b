"""Run configs, and a run from its config to its model folder through the shared loop.

``distill(cfg, out, setup)`` backs ``dmdx distill`` (``setup`` is the teacher kind's set-up:
:func:`dmdx.teachers.distill` passes it); ``train_teacher(cfg, out)`` backs ``dmdx teacher train`` (the same loop
running the ``dsm`` method on a fresh network).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from ..config import StudentConfig, TrainConfig, VideoConfig, from_dict, save_json, to_dict
from ..data import load_dataset
from ..denoiser import Denoiser
from ..methods import get_method
from ..methods.base import Context
from ..methods.dsm import DSMConfig
from ..models import ModelInfo, device_of
from ..nets import backbone_spec, default_backbone
from ..schedules import make_schedule
from . import dist
from .loop import Trainer, check_lr_scale

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
    # one frozen base for teacher, student, fake score and EMA: the LoRA copies hold the teacher's own weight tensors
    # (in real.teacher_dtype) instead of float32 copies (docs/real-models.md, "Will it fit?"); needs a LoRA student
    shared_base: bool = False
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


# -- teachers --------------------------------------------------------------------------------------------------
def train_teacher(cfg: TeacherConfig, out: Path, resume: bool = False) -> Path:
    out = Path(out)
    ds = load_dataset(cfg.data, "train")
    dev = device_of(cfg.train.device)
    cond = cfg.conditional if cfg.conditional is not None else (ds.kind == "image" and ds.num_classes > 0)
    if cond and ds.num_classes <= 0:
        raise ValueError(f"dataset {cfg.data!r} has no labels; it cannot train a class-conditional teacher")
    k = ds.num_classes if cond else 0
    torch.manual_seed(cfg.train.seed)
    bb = default_backbone(ds.shape, k, cfg.arch)
    den = Denoiser(bb, make_schedule(cfg.schedule), cfg.prediction).to(dev)
    if cfg.method is None:
        cfg.method = DSMConfig()
    info = ModelInfo(kind="teacher", backbone=backbone_spec(bb), schedule=den.schedule.to_dict(),
                     prediction=cfg.prediction, shape=list(ds.shape), num_classes=k, data=cfg.data,
                     guidance=cfg.guidance if k else 1.0, solver=cfg.solver, steps=cfg.sample_steps)
    ctx = Context(teacher=None, teacher_net=None, student=den, data=ds, num_classes=k, shape=tuple(ds.shape),
                  batch_size=cfg.train.batch_size, device=dev)
    world = dist.setup(cfg.train.parallel, dev, cfg.train.dist_timeout)
    out.mkdir(parents=True, exist_ok=True)
    if world.main:
        save_json(to_dict(cfg), out / CONFIG_JSON)
    return Trainer(out, cfg.method, cfg.train, ctx, info, world=world).run(resume=resume)


# -- distillation ----------------------------------------------------------------------------------------------
def check_run_config(cfg: RunConfig) -> None:
    """What can be checked of a distillation config before any set-up (the teacher kind checks the rest)."""
    check_lr_scale(cfg.method, cfg.train)
    if not cfg.teacher:
        raise ValueError("--teacher is required (a dmdx model folder, a diffusers pipeline folder or gmm:NAME)")


def distill(cfg: RunConfig, out: Path, setup: Callable[[RunConfig, Path], tuple[Context, ModelInfo]],
            resume: bool = False) -> Path:
    """Write the config, set the run up with ``setup(cfg, out)`` (the teacher kind's ``build_run``:
    :func:`dmdx.teachers.build_run`), then train it with the shared loop."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_run_config(cfg)  # before a bad config is written
    world = dist.setup(cfg.train.parallel, device_of(cfg.train.device), cfg.train.dist_timeout)
    if world.main:
        save_json(to_dict(cfg), out / CONFIG_JSON)
    with dist.rank_zero_first(world):  # rank 0 fills the caches (surrogate, pairs, prompts), the others read them
        ctx, info = setup(cfg, out)
    return Trainer(out, cfg.method, cfg.train, ctx, info, world=world).run(resume=resume)
