"""The image-pipeline teacher kind (SD1.5 / SD2 / SDXL / SD3 / Flux folders): loading (:mod:`.kind`), the run's
set-up, sampling and evaluation (:mod:`.evaluate`), export (:mod:`.export`), tiny test pipelines (:mod:`.tiny`)."""

from ...kinds import register
from .kind import ImagePipelineKind, load_model, load_teacher

KIND = register(ImagePipelineKind())

__all__ = ["KIND", "ImagePipelineKind", "load_model", "load_teacher"]
