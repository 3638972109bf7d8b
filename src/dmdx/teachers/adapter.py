"""One adapter per teacher kind, behind one small interface, so that a run's set-up reads as one path.

An adapter knows one kind of ``--teacher`` (today: video pipelines, :class:`dmdx.teachers.video.VideoAdapter`):

- ``matches(spec)``: is ``spec`` a teacher of this kind;  ``kind(spec)``: its recipe kind (``cogvideox``, ...);
- ``load_teacher(spec, device) -> Model``: the frozen teacher behind the dmdx contract;
- ``build_run(cfg, run_dir) -> (Context, ModelInfo)``: conditioning (prompt encoding, cached), data encoding
  (cached), student and pairs, all validated before training;
- ``export(run, out, fmt) -> Path`` and ``sample(model_dir, prompts_file, out, ...) -> list[Path]``.

``train.run.build_run``, ``models.load_model``, ``recipes.teacher_kind``, ``export.export_run`` and
``dmdx sample`` ask :func:`adapter_for` first and fall back to their own branches (analytic, built-in, image
pipelines) when no adapter claims the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TeacherAdapter(Protocol):
    name: str

    def matches(self, spec) -> bool: ...

    def kind(self, spec) -> str: ...

    def load_teacher(self, spec, device="cpu"): ...

    def build_run(self, cfg, run_dir: Path): ...

    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path: ...

    def sample(self, model_dir: Path, prompts_file: str, out: Path, **kw) -> list[Path]: ...


def adapters() -> dict[str, TeacherAdapter]:
    from .video import VideoAdapter

    return {"video": VideoAdapter()}


def adapter_for(spec) -> TeacherAdapter | None:
    """The adapter that claims teacher ``spec`` (a path or name), or None."""
    if spec is None:
        return None
    for a in adapters().values():
        if a.matches(spec):
            return a
    return None


def adapter_for_run(run: str | Path) -> TeacherAdapter | None:
    """The adapter of a student's run / model folder (by the pipeline its ``model.json`` names), or None."""
    import json

    f = Path(run) / "model.json"
    if not f.is_file():
        return None
    try:
        extra = json.loads(f.read_text()).get("extra", {})
    except json.JSONDecodeError:
        return None
    return adapter_for(extra.get("pipeline"))
