"""Backbones (denoiser networks) and discriminator heads."""

from __future__ import annotations

from torch import nn

from .heads import ConvHead, MultiHead, VectorHead, feature_shapes
from ..teachers.diffusers import BACKBONES as PIPELINE_BACKBONES
from ..teachers.video import BACKBONES as VIDEO_BACKBONES
from .mlp import MLPDenoiser
from .unet import DiffusersUNet2D, UNet

BACKBONES: dict[str, type[nn.Module]] = {"mlp": MLPDenoiser, "unet": UNet, "diffusers_unet2d": DiffusersUNet2D}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Construct the backbone registered as ``name`` from its constructor kwargs (its ``config``).

    Diffusers pipeline backbones (``sd_unet``, ``sd3_transformer``, ``flux_transformer``) live in
    :mod:`dmdx.teachers.diffusers` and are built from their pipeline folder."""
    if name in PIPELINE_BACKBONES:
        return PIPELINE_BACKBONES[name](**kwargs)
    if name in VIDEO_BACKBONES:  # CogVideoX / Wan transformers (dmdx.teachers.video)
        return VIDEO_BACKBONES[name](**kwargs)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
    return BACKBONES[name](**kwargs)


__all__ = [
    "BACKBONES",
    "ConvHead",
    "DiffusersUNet2D",
    "MLPDenoiser",
    "MultiHead",
    "UNet",
    "VectorHead",
    "build_backbone",
    "feature_shapes",
]
