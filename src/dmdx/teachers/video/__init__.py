"""The video teacher kind (CogVideoX / Wan folders): loading and the run's set-up (:mod:`.kind`), export and samples
(:mod:`.export`), tiny test pipelines (:mod:`.tiny`)."""

from ...kinds import register
from .kind import VideoContext, VideoData, VideoKind, load_model, load_teacher

KIND = register(VideoKind())

__all__ = ["KIND", "VideoContext", "VideoData", "VideoKind", "load_model", "load_teacher"]
