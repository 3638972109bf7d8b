"""The model-folder teacher kind: dmdx model folders (``dmdx teacher train``), and every student distilled from a
built-in network (a model folder's or an exact mixture's).

A run distils into a copy of the teacher's network (an MLP for vectors, a UNet for images) on the teacher's
dataset or ``--data`` (``dmdx data list``): :func:`dmdx.train.setup.builtin_run`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...config import EvalRequest, SampleRequest
from ...evaluate import evaluate_request, sample_to_file
from ...models import MODEL_JSON, Model, device_of, load_folder
from ...train.setup import builtin_run


class ModelFolderKind:
    """dmdx model folders: the built-in teachers and every student distilled from them (or from a mixture)."""

    name = "builtin"

    def matches(self, spec: str) -> bool:
        return True  # asked last (the fallback): a missing folder gets read_info's error

    def owns(self, info) -> bool:
        return True

    def recipe_kind(self, spec: str) -> str | None:
        f = Path(spec).expanduser() / MODEL_JSON
        try:
            shape = json.loads(f.read_text()).get("shape", []) if f.is_file() else None
        except json.JSONDecodeError:
            return None
        if shape is None:
            return None
        return "vector" if len(shape) == 1 else "image"

    def load_teacher(self, spec: str, device="cpu") -> Model:
        return load_folder(spec, device)

    def build_run(self, cfg, run_dir: Path):
        """Teacher, dataset (the teacher's unless ``--data``), student, pairs and the pixel backbone; checked."""
        return builtin_run(cfg, run_dir, self.load_teacher(cfg.teacher, device_of(cfg.train.device)))

    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path:
        raise ValueError(f"{run} is not a student distilled from a diffusers pipeline; nothing to export (a dmdx "
                         "model folder is itself the student: dmdx sample / eval --model RUN)")

    def hint(self, run: Path) -> str:
        return f"dmdx eval --model {run}"

    def sample(self, req: SampleRequest) -> str:
        return sample_to_file(req, lambda: self.load_teacher(req.model, req.device))

    def evaluate(self, req: EvalRequest) -> list[dict]:
        return evaluate_request(req, lambda: self.load_teacher(req.model, req.device))
