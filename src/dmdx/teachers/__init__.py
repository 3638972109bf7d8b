"""The teacher kinds, one vertical slice each, and what the top (the command line, the demo, user code) asks of them.

==============  =============================================================================================
package         owns
==============  =============================================================================================
``analytic``    ``gmm:NAME``: exact Gaussian mixtures (their surrogate network, their runs)
``video``       CogVideoX / Wan pipeline folders and their students (set-up, export, mp4 samples)
``image``       SD / SDXL / SD3 / Flux pipeline folders and their students (set-up, export, prompted eval)
``folder``      dmdx model folders (built-in teachers) and the students of built-in networks
==============  =============================================================================================

Importing this package imports every kind, in the order they are asked (:mod:`dmdx.kinds`: the folder kind is
the fallback).  A kind imports the core (:mod:`dmdx.pipelines`, :mod:`dmdx.nets`, :mod:`dmdx.models`,
:mod:`dmdx.methods`, :mod:`dmdx.train`, ...) and never another kind; the core never imports a kind.
"""

from __future__ import annotations

from pathlib import Path

from .. import recipes
from ..export import FORMATS, StudentCall
from ..export import usage as export_usage
from ..kinds import folder_info, kind_for, kind_owning, registered
from ..models import Model, ModelInfo, load_folder, read_info
from ..train import run as train_run
from . import analytic, video, image, folder  # noqa: F401, I001 - each registers its kind, in this order


def load_model(spec: str | Path, device="cpu") -> Model:
    """Any teacher or student: a dmdx model or run folder, a diffusers pipeline folder, or ``gmm:NAME``."""
    if folder_info(spec) is not None:
        return load_folder(spec, device)
    return kind_for(spec).load_teacher(str(spec), device)


def teacher_kind(spec: str | Path | None) -> str | None:
    """The recipe kind of a ``--teacher`` value (``dmdx.recipes.RECIPES``), or None when it cannot be told (a
    missing folder: the set-up reports it)."""
    return None if spec is None else kind_for(spec).recipe_kind(str(spec))


def apply_recipe(cfg, user_keys: set[str] = frozenset()) -> list:
    """:func:`dmdx.recipes.apply_recipe` for ``cfg``'s teacher kind."""
    return recipes.apply_recipe(cfg, teacher_kind(cfg.teacher), user_keys)


def build_run(cfg, run_dir: Path):
    """``(Context, ModelInfo)`` of a distillation run: the kind of ``cfg.teacher`` loads the teacher and data, makes
    the student and collects or loads pairs, validating before anything slow."""
    train_run.check_run_config(cfg)
    return kind_for(cfg.teacher).build_run(cfg, Path(run_dir))


def distill(cfg, out: Path, resume: bool = False) -> Path:
    """``dmdx distill``: set up with :func:`build_run`, then the shared loop (:func:`dmdx.train.run.distill`)."""
    return train_run.distill(cfg, out, build_run, resume=resume)


def export_run(run: str | Path, out: str | Path, fmt: str = "diffusers") -> Path:
    """``dmdx export``: the student of ``run`` in ``fmt``, written by the kind of the teacher it was distilled from."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    read_info(Path(run))  # a clear error for a folder that is not a dmdx run
    return kind_for(run).export(Path(run), Path(out), fmt)


def student_call(info: ModelInfo) -> StudentCall:
    """How a stock diffusers pipeline runs an exported pipeline student (its scheduler and call arguments)."""
    kind = kind_owning(info)
    if not hasattr(kind, "student_call"):
        raise ValueError("not a student distilled from a diffusers pipeline: it has no diffusers export")
    return kind.student_call(info)


def sampling_args(info: ModelInfo) -> dict:
    """What to pass to an exported pipeline's ``__call__`` to run the student's steps at its times."""
    return student_call(info).args


def usage(info: ModelInfo, fmt: str, out: str | Path, prompt: str = "a photo of a cat") -> str:
    """The Python lines that load an export and sample the student (what ``dmdx export`` prints)."""
    return export_usage(info, fmt, out, student_call(info), prompt)


__all__ = ["apply_recipe", "build_run", "distill", "export_run", "kind_for", "load_model", "registered",
           "sampling_args", "student_call", "teacher_kind", "usage"]
