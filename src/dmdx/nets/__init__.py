"""Backbones (denoiser networks) and discriminator heads: the built-in MLP and UNets, the diffusers image
pipelines' UNets / transformers (:mod:`.pipeline`) and video transformers (:mod:`.video`)."""

from __future__ import annotations

from torch import nn

from .heads import ConvHead, MultiHead, VectorHead, feature_shapes
from .mlp import MLPDenoiser
from .pipeline import BACKBONES as PIPELINE_BACKBONES
from .unet import DiffusersUNet2D, UNet
from .video import BACKBONES as VIDEO_BACKBONES

BACKBONES: dict[str, type[nn.Module]] = {"mlp": MLPDenoiser, "unet": UNet, "diffusers_unet2d": DiffusersUNet2D}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Construct the backbone registered as ``name`` from its constructor kwargs (its ``config``).

    Diffusers pipeline backbones (``sd_unet``, ``sd3_transformer``, ``flux_transformer``: :mod:`.pipeline`;
    ``cogvideox_transformer``, ``wan_transformer``: :mod:`.video`) are built from their pipeline folder."""
    if name in PIPELINE_BACKBONES:
        return PIPELINE_BACKBONES[name](**kwargs)
    if name in VIDEO_BACKBONES:
        return VIDEO_BACKBONES[name](**kwargs)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
    return BACKBONES[name](**kwargs)


def default_backbone(shape, num_classes: int = 0, arch: dict | None = None) -> nn.Module:
    """The built-in teachers' network for samples of ``shape``: an MLP for vectors, a UNet for images (``arch``
    overrides its constructor arguments)."""
    arch = arch or {}
    if len(shape) == 1:
        return build_backbone("mlp", **{"dim": shape[0], "hidden": 128, "depth": 3, "num_classes": num_classes,
                                        **arch})
    c, h, _ = shape
    return build_backbone("unet", **{"in_channels": c, "image_size": h, "base_channels": 32, "channel_mult": [1, 2],
                                     "num_res_blocks": 1, "num_classes": num_classes, **arch})


def backbone_spec(backbone: nn.Module) -> dict:
    """``{"name", "config"}`` of a registered backbone: what ``model.json`` records to rebuild it."""
    for name, cls in BACKBONES.items():
        if type(backbone) is cls:
            return {"name": name, "config": dict(backbone.config)}
    raise ValueError(f"backbone {type(backbone).__name__} is not in the registry; cannot save it")


__all__ = [
    "BACKBONES",
    "ConvHead",
    "DiffusersUNet2D",
    "MLPDenoiser",
    "MultiHead",
    "UNet",
    "VectorHead",
    "backbone_spec",
    "build_backbone",
    "default_backbone",
    "feature_shapes",
]
