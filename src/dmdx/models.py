"""Model folders: the on-disk format of every dmdx teacher and student (``model.json`` + ``model.safetensors``),
reading and writing them, and drawing samples from a loaded model.

A folder is written by ``dmdx teacher train`` or ``dmdx distill``; ``model.json`` names the backbone (a registered
:mod:`dmdx.nets` name and its constructor arguments), the schedule, the prediction kind and how to sample.  Loading a
``--teacher`` / ``--model`` of any kind (``gmm:NAME``, a diffusers pipeline folder) is the teacher kinds' work:
:func:`dmdx.teachers.load_model`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .denoiser import Denoiser
from .nets import build_backbone
from .sampling import nfe as solver_nfe
from .sampling import sample_ode, student_sample, time_grid
from .schedules import make_schedule

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"


@dataclass
class ModelInfo:
    """What ``model.json`` holds: how to rebuild the network and how to sample from it."""

    kind: str  # "teacher" or "student"
    backbone: dict  # {"name": registry name, "config": constructor kwargs}
    schedule: dict
    prediction: str
    shape: list[int]
    num_classes: int = 0
    data: str | None = None
    guidance: float = 1.0  # default CFG scale when sampling (students: 1, CFG is distilled in)
    solver: str = "heun"
    steps: int = 50
    times: list[float] | None = None  # student conditioning times
    extra: dict = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0


@dataclass
class Model:
    denoiser: Denoiser
    info: ModelInfo
    analytic: bool = False


def device_of(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_model(folder: Path, denoiser: Denoiser, info: ModelInfo, state: dict | None = None) -> None:
    """Write ``model.safetensors`` (atomically) and ``model.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = denoiser.backbone.state_dict() if state is None else state
    tmp = folder / (MODEL_WEIGHTS + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    tmp.replace(folder / MODEL_WEIGHTS)
    tmpj = folder / (MODEL_JSON + ".tmp")
    tmpj.write_text(json.dumps(asdict(info), indent=2) + "\n")
    tmpj.replace(folder / MODEL_JSON)


def read_info(folder: Path) -> ModelInfo:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model folder not found: {folder}")
    path = folder / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a dmdx model folder (no {MODEL_JSON}); expected a folder written by "
                                "'dmdx teacher train' or 'dmdx distill', or gmm:NAME")
    try:
        return ModelInfo(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path} is corrupt or from an incompatible dmdx version: {e}") from None


def build_denoiser(info: ModelInfo) -> Denoiser:
    backbone = build_backbone(info.backbone["name"], **info.backbone.get("config", {}))
    return Denoiser(backbone, make_schedule(info.schedule), info.prediction)


def load_weights(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: corrupt or not a safetensors file ({e})") from None


def load_folder(spec: str | Path, device: str | torch.device = "cpu") -> Model:
    """A teacher or student from a dmdx model folder (``model.json`` + ``model.safetensors``), of any kind."""
    info = read_info(Path(spec))
    den = build_denoiser(info)
    state = load_weights(Path(spec) / MODEL_WEIGHTS)
    try:
        den.backbone.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights in {spec} do not match the network described in its {MODEL_JSON}: {e}") from None
    den.to(device).eval().requires_grad_(False)
    return Model(den, info)


def default_steps(info: ModelInfo) -> int:
    return len(info.times) if info.kind == "student" and info.times else info.steps


@dataclass
class Samples:
    x: torch.Tensor
    labels: torch.Tensor | None
    nfe: int
    seconds_per_sample: float


@torch.no_grad()
def generate(model: Model, n: int, steps: int | None = None, seed: int = 0, guidance: float | None = None,
             labels: torch.Tensor | None = None, solver: str | None = None, batch_size: int = 500,
             device: str | torch.device = "cpu") -> Samples:
    """Draw ``n`` samples: the ODE sampler for teachers, the few-step sampler for students.

    Labels (class-conditional models) cycle 0..C-1 unless given.  Seconds per sample is wall-clock time of the
    network passes divided by n.
    """
    info = model.info
    steps = steps or default_steps(info)
    guidance = info.guidance if guidance is None else guidance
    solver = solver or info.solver
    gen = torch.Generator().manual_seed(seed)
    if info.conditional and labels is None:
        labels = torch.arange(n) % info.num_classes
    den = model.denoiser
    outs = []
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        noise = torch.randn([m, *info.shape], generator=gen).to(device)
        cond = None if labels is None else {"labels": labels[i:i + m].to(device)}

        def fn(x, t, c, _g=guidance):
            return den(x, t, c, guidance=_g)

        if info.kind == "student":
            times = info.times if (info.times and steps == len(info.times)) else time_grid(steps)[:-1]
            outs.append(student_sample(fn, den.schedule, noise, times, cond, generator=gen).cpu())
        else:
            outs.append(sample_ode(fn, den.schedule, noise, steps, cond, solver=solver).cpu())
    secs = (time.perf_counter() - start) / max(n, 1)
    count = steps if info.kind == "student" else solver_nfe(solver, steps)
    if labels is not None and guidance != 1.0:
        count *= 2  # classifier-free guidance runs the conditional and the unconditional pass
    return Samples(torch.cat(outs), labels, count, secs)
