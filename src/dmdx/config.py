"""Typed configs: nested dataclasses, JSON round trip, and ``--set a.b=value`` overrides checked against types."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch


@dataclass
class TrainConfig:
    """What the training loop owns.  ``steps`` counts loop iterations; a phase with ``every=k`` runs on every k-th.
    ``batch_size`` is the global batch of one optimiser update: ``batch_size / (world size x grad_accum)`` samples
    per rank and micro-step."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    # per-network learning-rate multipliers by network name (student, fake_score, gan_head, disc_heads,
    # latent_heads, pixel_heads), e.g. --set 'train.lr_scale={"disc_heads": 10}'
    lr_scale: dict = field(default_factory=dict)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup: int = 0
    grad_clip: float = 10.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)) over the student's n-th update of a stage
    bf16: bool = False
    # torch.distributed (docs/scaling.md): none | ddp | fsdp | auto (ddp under torchrun with WORLD_SIZE > 1)
    parallel: Literal["none", "ddp", "fsdp", "auto"] = "auto"
    cpu_offload: bool = False  # FSDP2: keep sharded parameters, gradients and optimiser states in CPU memory
    # seconds a collective waits for a rank before every rank stops (exit status 4, naming the rank and step); it
    # also bounds the other ranks' wait while rank 0 collects teacher pairs or encodes prompts at set-up
    dist_timeout: int = 3600
    # signals that make every rank finish its step, write a checkpoint there and exit with status 75 (docs/scaling.md,
    # "On a cluster"); [] leaves the signals' default actions
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 2
    sample_every: int = 500
    snapshot_every: int = 0  # >0: also save the EMA student as a model folder snapshots/step_XXXXXXX (for curves)
    # training-health signals (dmdx.train.health; docs/methods.md, "Training health"), computed off the training RNG
    health_n: int = 64  # student samples for diversity and fake-score lag at each log step (at most 2 batches); 0: off
    health_every: int = 500  # steps between small-sample quality figures (mixture coverage, FD); 0: off
    health_quality_n: int = 500  # samples per quality figure
    health_alarm: float = 0.3  # collapse alarm below this fraction of the teacher's diversity
    progress: bool = True


@dataclass
class StudentConfig:
    """The student's conditioning times, noisiest first (DMD2 4-step SDXL: 999/749/499/249 of 1000)."""

    times: list[float] = field(default_factory=lambda: [1.0])


# ------------------------------------------------------------------------------------------------------------
@dataclass
class VideoConfig:
    """Video teachers (``--teacher`` a CogVideoX / Wan pipeline folder); see docs/video.md."""

    frames: int | None = None  # pixel frames (4k + 1); default: the model's native count
    height: int | None = None  # pixels; default: the model's native size
    width: int | None = None
    max_sequence_length: int | None = None  # text tokens; default: CogVideoX's max_text_seq_length, Wan's 512


@dataclass
class SampleRequest:
    """What ``dmdx sample`` asks of a teacher kind (the CLI's options; each kind refuses the ones it cannot use)."""

    model: str
    out: Path | None = None  # sample: the PNG / NPZ file (built-in models) or the folder (pipelines)
    n: int = 64
    steps: int | None = None
    seed: int = 0
    guidance: float | None = None
    solver: str | None = None
    device: torch.device | str = "cpu"
    prompts: str | None = None  # pipeline models: one prompt a line
    per_prompt: int = 1
    batch_size: int = 4


@dataclass
class EvalRequest(SampleRequest):
    """What ``dmdx eval`` asks: the sampling options plus the metrics' local files."""

    n: int = 2000
    per_prompt: int = 2
    clip: str | None = None
    pickscore: str | None = None
    ref: str | None = None
    inception: str | None = None
    lpips: str | None = None
    kid_subset_size: int = 1000
    teacher_steps: int | None = None
    hpsv2: str | None = None
    imagereward: str | None = None


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _parse(value: Any, tp, where: str):
    """Coerce ``value`` (a JSON value or a CLI string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(value, a, where)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError(f"{where}: cannot parse {value!r} as {tp}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not allowed; allowed: {', '.join(map(str, args))}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            s = value.strip()
            try:
                value = json.loads(s if s.startswith("[") else f"[{s}]")
            except json.JSONDecodeError:
                raise ValueError(f"{where}: cannot parse {value!r} as a list (use e.g. 1,0.75 or [1, 0.75])") from None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_parse(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [_parse(v, inner, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a dict, type-checking every field and rejecting unknown keys."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}; allowed: {names}")
    kwargs = {k: _parse(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def set_path(cfg, path: str, value: str):
    """Apply one ``a.b.c=value`` override in place, parsing ``value`` with the field's annotated type."""
    parts = path.split(".")
    obj = cfg
    for i, name in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ValueError(f"--set {path}: {'.'.join(parts[:i])} is not a config section")
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            sect = ".".join(parts[:i]) or "top level"
            raise ValueError(f"--set {path}: unknown key {name!r} in {sect}; allowed: {', '.join(names)}")
        if i == len(parts) - 1:
            tp = _hints(type(obj))[name]
            if isinstance(value, str) and _is_dataclass_type(tp):
                value = json.loads(value)
            setattr(obj, name, _parse(value, tp, path))
        else:
            obj = getattr(obj, name)
    return cfg


def apply_overrides(cfg, overrides: list[str]):
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_path(cfg, key.strip(), value.strip())
    return cfg


def save_json(obj, path: Path):
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj if isinstance(obj, dict) else to_dict(obj), indent=2) + "\n")
    tmp.replace(path)
