"""One adapter per teacher kind, behind one small interface, so that a run's set-up reads as one path.

=========================  ===============================================  =====================================
adapter                    ``--teacher`` values it claims                   module
=========================  ===============================================  =====================================
``analytic``               ``gmm:NAME`` (exact Gaussian mixtures)           :mod:`dmdx.teachers.builtin`
``video``                  CogVideoX / Wan pipeline folders                 :mod:`dmdx.teachers.video`
``image``                  SD / SDXL / SD3 / Flux pipeline folders, hub     :mod:`dmdx.teachers.image`
                           ids (refused: nothing is downloaded)
``builtin``                dmdx model folders (``dmdx teacher train``);     :mod:`dmdx.teachers.builtin`
                           anything else (its error names what is missing)
=========================  ===============================================  =====================================

Every caller asks :func:`adapter_for` and calls one method; none has branches of its own:

- ``train.run.build_run`` -> ``build_run(cfg, run_dir) -> (Context, ModelInfo)``: conditioning, data encoding
  (cached), student and pairs, all validated before training;
- ``models.load_model`` -> ``load_teacher(spec, device) -> Model`` (a dmdx model folder, teacher or student, is
  read the same way for every kind);
- ``recipes.teacher_kind`` -> ``kind(spec)``: the recipe kind (``gmm``, ``image``, ``sdxl``, ``wan``, ...);
- ``export.export_run`` -> ``export(run, out, fmt)``; ``dmdx sample`` / ``dmdx eval`` -> ``sample(req)`` /
  ``evaluate(req)``.

A student's model folder belongs to the adapter of the teacher it was distilled from (:meth:`owns` reads its
``model.json``), so ``dmdx sample --model RUN`` writes images for an SDXL student and mp4 files for a Wan one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class SampleRequest:
    """What ``dmdx sample`` asks of an adapter (the CLI's options; each adapter refuses the ones it cannot use)."""

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


class TeacherAdapter(Protocol):
    name: str

    def matches(self, spec: str) -> bool:
        """Is ``spec`` (a ``--teacher`` value that is not a dmdx model folder) a teacher of this kind."""

    def owns(self, info) -> bool:
        """Is the dmdx model folder described by ``info`` (a :class:`dmdx.models.ModelInfo`) of this kind."""

    def kind(self, spec: str) -> str | None:
        """The recipe kind of teacher ``spec`` (``dmdx.recipes.RECIPES``), None when it cannot be told."""

    def load_teacher(self, spec: str, device="cpu"):
        """The frozen teacher ``spec`` behind the dmdx contract, as a :class:`dmdx.models.Model`."""

    def build_run(self, cfg, run_dir: Path):
        """``(Context, ModelInfo)`` of a distillation run of ``cfg`` (a :class:`dmdx.train.run.RunConfig`)."""

    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path:
        """Write the student of ``run`` in ``fmt`` to ``out``."""

    def sample(self, req: SampleRequest) -> str:
        """Write samples of ``req.model`` to ``req.out``; returns the line to print."""

    def evaluate(self, req: EvalRequest) -> list[dict]:
        """Metric rows of ``req.model``."""

    def hint(self, run: Path) -> str:
        """What to run next on a finished distillation run."""


def adapters() -> list[TeacherAdapter]:
    """Every adapter, in the order they are asked; the last (dmdx model folders) claims what no other does."""
    from .builtin import AnalyticAdapter, ModelFolderAdapter
    from .image import ImagePipelineAdapter
    from .video import VideoAdapter

    return [AnalyticAdapter(), VideoAdapter(), ImagePipelineAdapter(), ModelFolderAdapter()]


def folder_info(spec: str | Path):
    """The :class:`dmdx.models.ModelInfo` of a dmdx model or run folder, or None when ``spec`` is not one (or its
    ``model.json`` cannot be read: loading it then reports that, naming the file)."""
    from ..models import MODEL_JSON, read_info

    s = str(spec)
    if s.startswith("gmm:") or not (Path(s).expanduser() / MODEL_JSON).is_file():
        return None
    try:
        return read_info(Path(s).expanduser())
    except ValueError:
        return None


def adapter_for(spec: str | Path) -> TeacherAdapter:
    """The adapter of ``spec``: a ``--teacher`` value, or a dmdx model / run folder (its teacher's kind)."""
    if spec is None:
        raise ValueError("--teacher is required (a dmdx model folder, a diffusers pipeline folder or gmm:NAME)")
    info = folder_info(spec)
    s = str(spec)
    for a in adapters():
        if (a.owns(info) if info is not None else a.matches(s)):
            return a
    raise AssertionError("ModelFolderAdapter claims every spec")
