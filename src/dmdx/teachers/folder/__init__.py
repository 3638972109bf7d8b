"""The model-folder teacher kind: dmdx model folders and the students of built-in networks (:mod:`.kind`).
Registered as the fallback: it claims every ``--teacher`` value no other kind claims."""

from ...kinds import register
from .kind import ModelFolderKind

KIND = register(ModelFolderKind(), fallback=True)

__all__ = ["KIND", "ModelFolderKind"]
