"""Set-up steps that several teacher kinds share (:mod:`dmdx.teachers`): the student's times, the run's teacher
pairs, the student of a built-in network and of a pipeline, the student's ``model.json``.  Each kind's own
``build_run`` composes them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..data import load_dataset
from ..eval import get_pixel_backbone
from ..methods import get_method
from ..methods.base import Context, frozen_copy
from ..models import Model, ModelInfo, device_of
from ..nets import backbone_spec
from ..pairs import check_pairs, collect_pairs, load_pairs, pairs_meta, prompts_fingerprint
from ..pipelines.folder import read_prompts
from ..schedules import Schedule, VPDiscrete


def student_times(times, sched: Schedule) -> list[float]:
    """The student's conditioning times, checked; on discrete VP schedules rounded to integer steps (the backbone
    was trained on them, and the exported scheduler then reproduces the student exactly)."""
    times = [float(t) for t in times]
    if not times or any(not 0 < t <= 1 for t in times) or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"student.times must be decreasing values in (0, 1], got {times}")
    if isinstance(sched, VPDiscrete):
        T = sched.num_train_timesteps - 1
        times = [max(1, round(t * T)) / T for t in times]
    return times


def real_guidance(cfg, default: float) -> float:
    """The real score's CFG scale of a run: the method's ``real_guidance`` (DMDX: its ADM stage's), else ``default``."""
    m = cfg.method
    sub = getattr(m, "adm", m)
    value = getattr(sub, "real_guidance", None)
    return default if value is None else value


def run_pairs(cfg, teacher, run_dir: Path, dev, cond_bank=None, meta_extra=None, batch_size=None,
              shard_size: int = 1000):
    """The run's teacher pairs: ``pairs.path``, or collected (resumably) into RUN/pairs at the run's guidance;
    checked against the run's guidance and the teacher's shape."""
    pc = cfg.pairs
    guidance = pc.guidance if pc.guidance is not None else real_guidance(cfg, teacher.info.guidance)
    if pc.path:
        folder = Path(pc.path)
    else:
        folder = collect_pairs(teacher, Path(run_dir) / "pairs", pc.resolved_n(cfg.train), pc.steps, pc.solver,
                               guidance, seed=cfg.train.seed, shard_size=shard_size, device=dev,
                               progress=cfg.train.progress, batch_size=pc.batch_size or batch_size,
                               cond_bank=cond_bank, meta_extra=meta_extra)
    check_pairs(folder, guidance, teacher.info.shape)
    if pc.path and meta_extra:  # a pair's label is a row of *this* run's prompts: same prompts, same teacher
        meta = pairs_meta(folder)
        diff = [f"{k}={meta.get(k)!r} (this run: {v!r})" for k, v in meta_extra.items() if k in meta and meta[k] != v]
        if diff:
            raise ValueError(f"the teacher pairs in {folder} were collected with other prompts or another teacher: "
                             f"{', '.join(diff)}; collect them in this run (unset pairs.path)")
    pairs = load_pairs(folder, cond_bank)
    if list(pairs.x0.shape[1:]) != list(teacher.info.shape):
        raise ValueError(f"pairs in {folder} have shape {list(pairs.x0.shape[1:])}, the teacher {teacher.info.shape}")
    return pairs


def pipeline_pairs(cfg, teacher, bank: dict[str, torch.Tensor], run_dir: Path, dev):
    """Teacher pairs of a text-to-image or text-to-video pipeline: one random prompt row each, collected in shards of
    at least 64 and batches of ``pairs.batch_size`` (default ``train.batch_size``: what fits for training fits
    for no-grad sampling); ``pairs.json`` records the teacher, its dtype and the prompts."""
    meta = {"teacher": teacher.info.extra["pipeline"], "teacher_dtype": cfg.real.teacher_dtype,
            "prompts": prompts_fingerprint(read_prompts(cfg.real.prompts))}
    batch = cfg.pairs.batch_size or cfg.train.batch_size
    return run_pairs(cfg, teacher, run_dir, dev, cond_bank=bank, meta_extra=meta, batch_size=batch,
                     shard_size=max(64, batch))


def pipeline_student_info(cfg, teacher, student, times: list[float]):
    """The ``model.json`` of a pipeline student (image or video): the teacher's backbone with the student's config
    (LoRA, ...), its schedule and extra (pipeline folder, family), the student's times."""
    tinfo = teacher.info
    return ModelInfo(kind="student", backbone={"name": tinfo.backbone["name"],
                                               "config": student.backbone.saved_config()},
                     schedule=teacher.denoiser.schedule.to_dict(), prediction=teacher.denoiser.prediction,
                     shape=list(tinfo.shape), data=cfg.data, guidance=1.0, steps=len(times), times=times,
                     extra={"method": cfg.method.name, "teacher": tinfo.extra["pipeline"], **tinfo.extra})


def trainable_student(teacher_net, rc, seed: int):
    """The student: a trainable copy of a pipeline teacher (LoRA and checkpointing from ``rc``, a
    ``RealModelConfig``); the teacher remembers the fake score's options for the copy a method makes of it.

    A float32 copy, or with ``real.shared_base`` a LoRA on the teacher's own frozen tensors (so are then the fake
    score, when it is a LoRA too, and the loop's EMA of the student: the base is held once).
    """
    torch.manual_seed(seed)
    bb = teacher_net.backbone
    if rc.shared_base:
        if rc.student_lora.rank <= 0:
            raise ValueError("real.shared_base needs a LoRA student (real.student_lora.rank > 0): a fully fine-tuned "
                             "student owns its weights")
        bb.share_base()
    bb.copy_options = {"lora": rc.student_lora.spec(), "grad_checkpointing": rc.grad_checkpointing}
    student = copy.deepcopy(teacher_net)
    student.backbone.make_trainable()
    student.requires_grad_(True).train()
    bb.copy_options = {"lora": rc.fake_lora.spec(), "grad_checkpointing": rc.grad_checkpointing}
    return student


def builtin_run(cfg, run_dir: Path, teacher: Model, make_teacher_net=None):
    """``(Context, ModelInfo)`` of a run on a built-in network (a dmdx model folder, or an exact mixture's
    surrogate): dataset (the teacher's unless ``--data``), the student as a copy of the teacher's network, pairs
    and, for images, the pixel backbone; everything cheap is checked first.

    ``make_teacher_net()`` gives the network that student, fake score and discriminator features copy when it is
    not the teacher's own (an exact mixture has none: its kind fits a surrogate); it runs after the checks.
    """
    method = get_method(cfg.method.name)
    dev = device_of(cfg.train.device)
    tinfo = teacher.info
    method.check(cfg.method, tuple(tinfo.shape))
    data_name = cfg.data or tinfo.data
    ds = load_dataset(data_name, "train") if data_name else None
    if ds is not None and list(ds.shape) != list(tinfo.shape):
        raise ValueError(f"data {data_name!r} has samples of shape {list(ds.shape)} but the teacher expects "
                         f"{tinfo.shape}")
    times = student_times(cfg.student.times, teacher.denoiser.schedule)  # before a surrogate is fitted
    teacher_net = make_teacher_net() if make_teacher_net is not None else teacher.denoiser
    torch.manual_seed(cfg.train.seed)
    student = frozen_copy(teacher_net, trainable=True).train()
    pairs = run_pairs(cfg, teacher, Path(run_dir), dev) if method.pairs_needed(cfg.method) else None
    pixel = None
    if ds is not None and ds.kind == "image" and method.uses_pixel_backbone:
        pixel = get_pixel_backbone(data_name, progress=cfg.train.progress).to(dev)
    ctx = Context(teacher=teacher.denoiser, teacher_net=teacher_net, student=student, data=ds,
                  num_classes=tinfo.num_classes, shape=tuple(tinfo.shape), batch_size=cfg.train.batch_size,
                  device=dev, times=times, pairs=pairs, pixel_backbone=pixel, guidance=tinfo.guidance)
    info = ModelInfo(kind="student", backbone=backbone_spec(teacher_net.backbone),
                     schedule=teacher_net.schedule.to_dict(), prediction=teacher_net.prediction,
                     shape=list(tinfo.shape), num_classes=tinfo.num_classes, data=data_name, guidance=1.0,
                     steps=len(times), times=times, extra={"method": cfg.method.name, "teacher": cfg.teacher})
    return ctx, info
