"""Video pipelines' transformers behind the dmdx backbone contract: CogVideoX and Wan, on latents [B, C, T, H, W].

CogVideoX's transformer takes ``[B, T, C, H, W]`` (frames before channels) and, for 5b / 1.5, 3-D rotary
embeddings that the pipeline computes from the latent grid (``_prepare_rotary_positional_embeddings``); both are
done here, so the backbone sees dmdx's ``[B, C, T, H, W]``.  Discriminator features are the video tokens of a few
transformer blocks as maps ``[B, D, T', h, w]`` (``T' = T / patch_t``), for 3-D conv heads.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import torch
from torch import nn

from ..pipelines.folder import DTYPES, load_component, model_index
from ..pipelines.video import check_video_folder, cond_shapes, encode_prompts, geometry, text_length
from .pipeline import PipelineBackbone, _Tap

Tensor = torch.Tensor
Cond = dict[str, Tensor] | None

class VideoBackbone(PipelineBackbone):
    """A video transformer behind the dmdx backbone contract, on latents [B, C, T, H, W]."""

    def __init__(self, path: str, dtype: str = "float32", cond_file: str | None = None, lora: dict | None = None,
                 grad_checkpointing: bool = False, shape: list[int] | None = None, max_sequence_length: int = 0,
                 frozen_base: bool = False, weights: bool = True):
        nn.Module.__init__(self)
        p, family = check_video_folder(path)
        if family != self.family:
            raise ValueError(f"{path} holds a {family} model, not {self.family}")
        path = str(p)
        self.component = "transformer"
        self.config = dict(path=path, dtype=dtype, cond_file=cond_file, lora=lora,
                           grad_checkpointing=grad_checkpointing, shape=shape,
                           max_sequence_length=max_sequence_length)
        if frozen_base:
            self.config["frozen_base"] = True
        self.weights = weights
        self.model = load_component(p, "transformer", DTYPES[dtype], weights=weights)
        self.shape = tuple(shape) if shape else geometry(p).shape
        length = max_sequence_length or text_length(p, family)
        self._set_null(cond_file, lambda: encode_prompts(p, [], length)[1],
                       lambda: {k: (length, *v[1:]) for k, v in cond_shapes(p, family).items()})
        blocks = self._blocks()
        idx = sorted({*range(0, len(blocks), max(1, len(blocks) // 4)), len(blocks) - 1})
        self.taps = nn.ModuleList(_Tap() for _ in idx)
        self._tap_blocks = idx
        self.feature_layers = tuple(f"taps.{j}" for j in range(len(idx)))
        self._setup()
        self._finish(lora, grad_checkpointing)

    def _blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def _grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def _hook(self, j: int, grid: tuple[int, int, int]):
        def hook(_mod, _inp, out):
            t, h, w = grid
            tok = out[0] if isinstance(out, tuple) else out  # the video token stream [B, T'h'w', D]
            # float32 maps whatever the teacher's dtype: the heads on them are float32
            self.taps[j](tok.float().transpose(1, 2).reshape(tok.shape[0], tok.shape[2], t, h, w))

        return hook


class CogVideoXBackbone(VideoBackbone):
    """``CogVideoXTransformer3DModel``: timestep = step index, T5 text, frames-first input, rotary embeddings."""

    family = "cogvideox"

    def _setup(self):
        self._rope: dict = {}

    def _blocks(self):
        return self.model.transformer_blocks

    def _grid(self, t, h, w):
        cfg = self.model.config
        p, p_t = cfg.patch_size, cfg.patch_size_t or 1
        return t // p_t, h // p, w // p

    def rotary(self, t: int, h: int, w: int, device) -> tuple[Tensor, Tensor] | None:
        """The 3-D rotary embedding the pipeline builds for latents of T x H x W (None without rotary)."""
        cfg = self.model.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        key = (t, h, w, str(device))
        if key not in self._rope:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed  # optional, heavy: imported on use
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            p, p_t = cfg.patch_size, cfg.patch_size_t
            gh, gw = h // p, w // p
            bh, bw = cfg.sample_height // p, cfg.sample_width // p
            if p_t is None:  # CogVideoX 1.0
                rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim,
                                               crops_coords=get_resize_crop_region_for_grid((gh, gw), bw, bh),
                                               grid_size=(gh, gw), temporal_size=t, device=device)
            else:  # CogVideoX 1.5
                rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None,
                                               grid_size=(gh, gw), temporal_size=(t + p_t - 1) // p_t,
                                               grid_type="slice", max_size=(bh, bw), device=device)
            self._rope[key] = rope
        return self._rope[key]

    def forward(self, x: Tensor, time: Tensor, cond: Cond = None) -> Tensor:
        b, _, t, h, w = x.shape
        c = self._cond(cond, b, x.device)
        out = self._run(self._grid(t, h, w), hidden_states=x.to(self.dtype).permute(0, 2, 1, 3, 4),
                        encoder_hidden_states=c["text"], timestep=time.to(x.device).float().expand(b),
                        image_rotary_emb=self.rotary(t, h, w, x.device))
        return out.permute(0, 2, 1, 3, 4)


def _parameters_or_buffers(self: nn.Module, recurse: bool = True):
    """A module's parameters, else its buffers (frozen base weights under LoRA), else its frozen tensors held as
    plain attributes (a LoRA copy on a shared base, ``nets.pipeline.add_lora(base="shared")``)."""
    params = list(nn.Module.parameters(self, recurse))
    if params:
        return iter(params)
    buffers = list(self.buffers(recurse))
    if buffers:
        return iter(buffers)
    mods = self.modules() if recurse else [self]
    return iter([v for m in mods for v in m.__dict__.values() if isinstance(v, Tensor)])


class WanBackbone(VideoBackbone):
    """``WanTransformer3DModel``: timestep = shifted sigma * 1000 (per token for Wan 2.2 TI2V), UMT5 text."""

    family = "wan"

    def _setup(self):
        self._expand = bool(model_index(Path(self.config["path"])).get("expand_timesteps", False))
        # diffusers' Wan condition embedder reads its time embedder's dtype from that module's first parameter;
        # with a LoRA student (add_lora turns every non-LoRA weight into a buffer) it has none left
        te = self.model.condition_embedder.time_embedder
        te.parameters = types.MethodType(_parameters_or_buffers, te)  # bound: a deepcopy rebinds it to the copy

    def _blocks(self):
        return self.model.blocks

    def _grid(self, t, h, w):
        pt, ph, pw = self.model.config.patch_size
        return t // pt, h // ph, w // pw

    def forward(self, x: Tensor, time: Tensor, cond: Cond = None) -> Tensor:
        b, _, t, h, w = x.shape
        c = self._cond(cond, b, x.device)
        grid = self._grid(t, h, w)
        ts = time.to(x.device).float().expand(b)
        if self._expand:  # WanPipeline with expand_timesteps: one timestep per token
            ts = ts[:, None].expand(b, math.prod(grid))
        return self._run(grid, hidden_states=x.to(self.dtype), timestep=ts, encoder_hidden_states=c["text"])


BACKBONES = {"cogvideox_transformer": CogVideoXBackbone, "wan_transformer": WanBackbone}


FAMILY_BACKBONE = {"cogvideox": "cogvideox_transformer", "wan": "wan_transformer"}
