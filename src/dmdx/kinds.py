"""Teacher kinds: the interface each vertical slice implements, and the one registry the top asks.

A *teacher kind* is everything dmdx does with one kind of teacher: loading it, setting up a run from it, sampling
and evaluating its models, exporting its students.  Each kind is a package under :mod:`dmdx.teachers` that
registers itself here when imported; :mod:`dmdx.teachers` imports them all and is what the command line and the
demo ask.  The core (maths, nets, model folders, methods, the loop) never asks a kind anything: the top passes what
a kind builds (a :class:`dmdx.methods.Context`, a :class:`dmdx.models.Model`) down.

=========================  ===============================================  =====================================
kind                       ``--teacher`` values it claims                   package
=========================  ===============================================  =====================================
``analytic``               ``gmm:NAME`` (exact Gaussian mixtures)           :mod:`dmdx.teachers.analytic`
``video``                  CogVideoX / Wan pipeline folders                 :mod:`dmdx.teachers.video`
``image``                  SD / SDXL / SD3 / Flux pipeline folders, hub     :mod:`dmdx.teachers.image`
                           ids (refused: nothing is downloaded)
``builtin``                dmdx model folders (``dmdx teacher train``);     :mod:`dmdx.teachers.folder`
                           anything else (its error names what is missing)
=========================  ===============================================  =====================================

A student's model folder belongs to the kind of the teacher it was distilled from (:meth:`TeacherKind.owns` reads
its ``model.json``), so ``dmdx sample --model RUN`` writes images for an SDXL student and mp4 files for a Wan one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .config import EvalRequest, SampleRequest
from .models import MODEL_JSON, Model, ModelInfo, read_info

class TeacherKind(Protocol):
    name: str

    def matches(self, spec: str) -> bool:
        """Is ``spec`` (a ``--teacher`` value that is not a dmdx model folder) a teacher of this kind."""

    def owns(self, info: ModelInfo) -> bool:
        """Is the dmdx model folder described by ``info`` of this kind."""

    def recipe_kind(self, spec: str) -> str | None:
        """The recipe kind of teacher ``spec`` (``dmdx.recipes.RECIPES``), None when it cannot be told."""

    def load_teacher(self, spec: str, device="cpu") -> Model:
        """The frozen teacher ``spec`` behind the dmdx contract."""

    def build_run(self, cfg, run_dir: Path):
        """``(Context, ModelInfo)`` of a distillation run of ``cfg`` (a :class:`dmdx.train.run.RunConfig`)."""

    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path:
        """Write the student of ``run`` in ``fmt`` (one of :data:`dmdx.export.FORMATS`) to ``out``."""

    def sample(self, req: SampleRequest) -> str:
        """Write samples of ``req.model`` to ``req.out``; returns the line to print."""

    def evaluate(self, req: EvalRequest) -> list[dict]:
        """Metric rows of ``req.model``."""

    def hint(self, run: Path) -> str:
        """What to run next on a finished distillation run."""


_KINDS: list[TeacherKind] = []
_FALLBACK: list[TeacherKind] = []


def register(kind: TeacherKind, fallback: bool = False) -> TeacherKind:
    """Add a teacher kind; kinds are asked in the order they registered, the ``fallback`` one (dmdx model folders,
    which claims every spec so that a missing folder gets its error) last."""
    if any(k.name == kind.name for k in [*_KINDS, *_FALLBACK]):
        raise ValueError(f"teacher kind {kind.name!r} is registered twice")
    (_FALLBACK if fallback else _KINDS).append(kind)
    return kind


def registered() -> list[TeacherKind]:
    """Every registered kind, in the order they are asked."""
    return [*_KINDS, *_FALLBACK]


def folder_info(spec: str | Path) -> ModelInfo | None:
    """The :class:`dmdx.models.ModelInfo` of a dmdx model or run folder, or None when ``spec`` is not one (or its
    ``model.json`` cannot be read: loading it then reports that, naming the file)."""
    s = str(spec)
    if s.startswith("gmm:") or not (Path(s).expanduser() / MODEL_JSON).is_file():
        return None
    try:
        return read_info(Path(s).expanduser())
    except ValueError:
        return None


def kind_owning(info: ModelInfo) -> TeacherKind:
    """The kind that owns the dmdx model folder described by ``info`` (the kind of the teacher it came from)."""
    kinds = registered()
    if not kinds:
        raise RuntimeError("no teacher kind is registered: import dmdx.teachers first")
    return next(k for k in kinds if k.owns(info))


def kind_for(spec: str | Path) -> TeacherKind:
    """The kind of ``spec``: a ``--teacher`` value, or a dmdx model / run folder (its teacher's kind)."""
    if spec is None:
        raise ValueError("--teacher is required (a dmdx model folder, a diffusers pipeline folder or gmm:NAME)")
    info = folder_info(spec)
    if info is not None:
        return kind_owning(info)
    kinds = registered()
    if not kinds:
        raise RuntimeError("no teacher kind is registered: import dmdx.teachers first")
    return next(k for k in kinds if k.matches(str(spec)))
