"""Video teachers from local diffusers pipeline folders: CogVideoX (2b / 5b / 1.5) and Wan (2.1, 2.2 TI2V-5B).

One adapter (:class:`VideoAdapter`) holds everything a run needs from such a folder: loading the teacher,
encoding the prompts (conditioning), encoding real videos (data), exporting the student and writing samples.
Latents are the VAE's own layout ``[C, T, H, W]`` (T latent frames), *scaled* as each pipeline scales them.

==============  ===============================================  ===========================  ========================
family          schedule (from the scheduler config)             transformer time input       latents (scaled)
==============  ===============================================  ===========================  ========================
``cogvideox``   VPDiscrete, v-prediction, SNR shift              step index ``t * 999``       ``mean * scaling_factor``
                (``snr_shift_scale``), zero terminal SNR
``wan``         FlowMatching(``flow_shift`` / ``shift``), flow   shifted sigma * 1000         ``(mean - mu_c) / std_c``
==============  ===============================================  ===========================  ========================

CogVideoX's transformer takes ``[B, T, C, H, W]`` (frames before channels) and, for 5b / 1.5, 3-D rotary
embeddings that the pipeline computes from the latent grid (``_prepare_rotary_positional_embeddings``); both are
done here, so the backbone sees dmdx's ``[B, C, T, H, W]``.  Prompts: T5 (CogVideoX, ``max_text_seq_length``
tokens) and UMT5 (Wan, 512 tokens, zero-padded after the prompt as the pipeline does); the unconditional input is
the pipeline's default negative, the empty prompt.  Discriminator features are the video tokens of a few
transformer blocks as maps ``[B, D, T', h, w]`` (``T' = T / patch_t``), for 3-D conv heads.
"""

from __future__ import annotations

import functools
import json
import math
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..schedules import FlowMatching, Schedule
from .common import pipeline_pairs, pipeline_student_info, student_times
from .diffusers import (DTYPES, PipelineBackbone, _Tap, add_lora, check_folder, is_pipeline_folder, load_component,
                        load_cond, model_index, save_cond, trainable_student, vp_schedule)

Tensor = torch.Tensor
Cond = dict[str, Tensor] | None

CLASSES = {"CogVideoXTransformer3DModel": "cogvideox", "WanTransformer3DModel": "wan"}
FAMILIES = tuple(CLASSES.values())
# The pipelines' own __call__ defaults (WanPipeline: 480x832, 81 frames; CogVideoX: the transformer's sample size)
WAN_DEFAULT = {"frames": 81, "height": 480, "width": 832}
DEFAULT_GUIDANCE = {"cogvideox": 6.0, "wan": 5.0}  # CogVideoXPipeline / WanPipeline default guidance_scale


@dataclass
class VideoConfig:
    """Video teachers (``--teacher`` a CogVideoX / Wan pipeline folder); see docs/video.md."""

    frames: int | None = None  # pixel frames (4k + 1); default: the model's native count
    height: int | None = None  # pixels; default: the model's native size
    width: int | None = None
    max_sequence_length: int | None = None  # text tokens; default: CogVideoX's max_text_seq_length, Wan's 512


# -- the folder ------------------------------------------------------------------------------------------------
def _json(path: Path, component: str) -> dict:
    f = Path(path) / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    if not f.is_file():
        raise ValueError(f"{path}: missing {f.relative_to(path)}")
    return json.loads(f.read_text())


def video_family(path: str | Path) -> str | None:
    """``cogvideox`` / ``wan`` for a pipeline folder whose transformer is a video transformer, else None."""
    if not is_pipeline_folder(path):
        return None
    entry = model_index(Path(path)).get("transformer")
    if isinstance(entry, list) and entry[-1] in CLASSES:
        return CLASSES[entry[-1]]
    return None


def is_video_folder(spec) -> bool:
    return spec is not None and video_family(Path(str(spec)).expanduser()) is not None


def check_video_folder(path: str | Path) -> tuple[Path, str]:
    path = check_folder(path)
    family = video_family(path)
    if family is None:
        entry = model_index(path).get("transformer") or model_index(path).get("unet")
        cls = entry[-1] if isinstance(entry, list) else None
        raise ValueError(f"{path}: unsupported video transformer class {cls!r}; supported: {', '.join(CLASSES)}")
    index = model_index(path)
    if family == "wan" and isinstance(index.get("transformer_2"), list) and index["transformer_2"][-1]:
        raise ValueError(f"{path}: two-expert Wan 2.2 pipelines (transformer_2, boundary_ratio) are not supported; "
                         "supported: Wan 2.1 T2V and Wan 2.2 TI2V-5B (one transformer)")
    return path, family


@dataclass(frozen=True)
class Geometry:
    """Pixel and latent sizes of a video teacher run."""

    frames: int
    height: int
    width: int
    shape: tuple[int, int, int, int]  # latents [C, T, H, W]
    temporal: int  # VAE compression factors
    spatial: int


def vae_factors(path: Path, family: str) -> tuple[int, int]:
    """(temporal, spatial) compression of the pipeline's VAE."""
    vae = _json(path, "vae")
    if family == "cogvideox":
        return int(vae.get("temporal_compression_ratio", 4)), 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    down = vae.get("temperal_downsample", [False, True, True])
    return (int(vae.get("scale_factor_temporal") or 2 ** sum(bool(d) for d in down)),
            int(vae.get("scale_factor_spatial") or 2 ** len(down)))


def geometry(path: Path, frames: int | None = None, height: int | None = None, width: int | None = None
             ) -> Geometry:
    """Sizes at the model's native defaults or the given ones, checked against the VAE and the patching."""
    path, family = check_video_folder(path)
    tr, vae = _json(path, "transformer"), _json(path, "vae")
    temporal, spatial = vae_factors(path, family)
    if family == "cogvideox":
        p, p_t = tr.get("patch_size", 2), tr.get("patch_size_t")
        native = {"frames": tr.get("sample_frames", 49), "height": tr.get("sample_height", 60) * spatial,
                  "width": tr.get("sample_width", 90) * spatial}
        vae_c = vae.get("latent_channels", 16)
    else:
        pt = tr.get("patch_size", [1, 2, 2])
        p_t, p = (pt[0] if pt[0] > 1 else None), pt[1]
        native = dict(WAN_DEFAULT)
        vae_c = vae.get("z_dim", 16)
    c = tr["in_channels"]
    if c != vae_c:
        raise ValueError(f"{path}: the transformer takes {c} input channels but the VAE has {vae_c} latent channels "
                         "(an image-to-video model?); only text-to-video pipelines are supported")
    user_frames = frames is not None
    frames = frames or native["frames"]
    height, width = height or native["height"], width or native["width"]
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"frames={frames}: the VAE compresses time by {temporal}, so frames must be "
                         f"{temporal}k + 1 (e.g. {', '.join(str(temporal * k + 1) for k in (1, 2, 4, 12))})")
    t = (frames - 1) // temporal + 1
    if p_t and t % p_t:
        if user_frames:
            ok = [((k * p_t) - 1) * temporal + 1 for k in range(1, 4)]
            raise ValueError(f"frames={frames} gives {t} latent frames, not a multiple of the transformer's temporal "
                             f"patch {p_t}; allowed frame counts: {', '.join(map(str, ok))}, ...")
        t += p_t - t % p_t  # the native count padded as the pipeline pads it (CogVideoX 1.5: 81 -> 85 frames)
        frames = (t - 1) * temporal + 1
    mult = spatial * p
    for name, v in (("height", height), ("width", width)):
        if v < mult or v % mult:
            raise ValueError(f"{name}={v} is not a multiple of {mult} pixels (VAE factor {spatial} x patch {p}), "
                             f"which the {family} transformer needs")
    if family == "cogvideox" and tr.get("use_learned_positional_embeddings") and (
            height != native["height"] or width != native["width"]):
        raise ValueError(f"{path}: this CogVideoX transformer has learned positional embeddings; it only works at "
                         f"{native['height']}x{native['width']}")
    return Geometry(frames, height, width, (c, t, height // spatial, width // spatial), temporal, spatial)


def schedule_from_folder(path: Path) -> tuple[Schedule, str]:
    """(schedule, prediction kind) from the scheduler config."""
    path, family = check_video_folder(path)
    sched = _json(path, "scheduler")
    name = sched.get("_class_name")
    if family == "cogvideox":
        shift = sched.get("snr_shift_scale", 3.0 if name in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
                          else 1.0)
        return vp_schedule(path, sched, {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear",
                                         "beta_start": 0.00085, "beta_end": 0.012},
                           snr_shift_scale=float(shift),
                           rescale_betas_zero_snr=bool(sched.get("rescale_betas_zero_snr", False)))
    if sched.get("use_dynamic_shifting"):
        raise ValueError(f"{path}: dynamic (resolution-dependent) shifting is not supported for Wan teachers")
    if name == "FlowMatchEulerDiscreteScheduler":
        shift = sched.get("shift", 1.0)
    elif sched.get("use_flow_sigmas") or sched.get("prediction_type") == "flow_prediction":
        shift = sched.get("flow_shift", 1.0)  # UniPC / DPM-Solver with flow sigmas (the published Wan folders)
    else:
        raise ValueError(f"{path}: a Wan teacher needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler or "
                         f"UniPCMultistepScheduler with use_flow_sigmas), got {name!r}")
    return FlowMatching(shift=float(shift), time_input="t1000"), "flow"


def text_length(path: Path, family: str, vc: VideoConfig | None = None) -> int:
    if vc is not None and vc.max_sequence_length:
        return vc.max_sequence_length
    if family == "cogvideox":
        return int(_json(path, "transformer").get("max_text_seq_length", 226))
    return 512  # WanPipeline.__call__'s default


# -- prompts ---------------------------------------------------------------------------------------------------
def encoder_placement() -> dict:
    """Where the text encoder runs: the GPU in bf16 when there is one (T5-XXL is 19 GB in float32), else the CPU."""
    return {"dtype": "bfloat16", "device": "cuda"} if torch.cuda.is_available() else {}


@torch.no_grad()
def encode_prompts(path: Path, prompts: list[str], max_length: int, batch_size: int = 8, dtype: str = "float32",
                   device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(cond bank {"text": [N, L, D]}, null cond {"text": [1, L, D]}) with the pipeline's own ``encode_prompt``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), transformer=None, vae=None, torch_dtype=DTYPES[dtype],
                                             local_files_only=True)
    pipe.text_encoder.to(device)
    dev = torch.device(device)

    def enc(batch):
        pos, _ = pipe.encode_prompt(batch, do_classifier_free_guidance=False, max_sequence_length=max_length,
                                    device=dev)
        return pos.float().cpu()

    rows = [enc(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    null = {"text": enc([""])}
    del pipe
    return ({"text": torch.cat(rows).contiguous()} if rows else {}), null


# -- backbones -------------------------------------------------------------------------------------------------
class VideoBackbone(PipelineBackbone):
    """A video transformer behind the dmdx backbone contract, on latents [B, C, T, H, W]."""

    def __init__(self, path: str, dtype: str = "float32", cond_file: str | None = None, lora: dict | None = None,
                 grad_checkpointing: bool = False, shape: list[int] | None = None, max_sequence_length: int = 0):
        nn.Module.__init__(self)
        p, family = check_video_folder(path)
        if family != self.family:
            raise ValueError(f"{path} holds a {family} model, not {self.family}")
        path = str(p)
        self.component = "transformer"
        self.config = dict(path=path, dtype=dtype, cond_file=cond_file, lora=lora,
                           grad_checkpointing=grad_checkpointing, shape=shape,
                           max_sequence_length=max_sequence_length)
        self.model = load_component(p, "transformer", DTYPES[dtype])
        self.shape = tuple(shape) if shape else geometry(p).shape
        if cond_file and Path(cond_file).is_file():
            _, null = load_cond(Path(cond_file))
        else:
            _, null = encode_prompts(p, [], max_sequence_length or text_length(p, family))
        self._null_keys = list(null)
        for k, v in null.items():
            self.register_buffer(f"null_{k}", v, persistent=False)
        self.copy_options: dict = {}
        blocks = self._blocks()
        idx = sorted({*range(0, len(blocks), max(1, len(blocks) // 4)), len(blocks) - 1})
        self.taps = nn.ModuleList(_Tap() for _ in idx)
        self._tap_blocks = idx
        self.feature_layers = tuple(f"taps.{j}" for j in range(len(idx)))
        self._setup()
        if lora:
            add_lora(self.model, **lora)
        if grad_checkpointing:
            self.model.enable_gradient_checkpointing()

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
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
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
    """A module's parameters, or its buffers when it has none (frozen base weights under LoRA)."""
    params = list(nn.Module.parameters(self, recurse))
    return iter(params) if params else self.buffers(recurse)


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


# -- VAE -------------------------------------------------------------------------------------------------------
class VideoVAE(nn.Module):
    """The pipeline's VAE on dmdx's scaled latents: ``encode(videos [B, 3, F, H, W] in [-1, 1]) -> z``, ``decode``."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32):
        super().__init__()
        _, self.family = check_video_folder(path)
        self.vae = load_component(Path(path), "vae", dtype).eval().requires_grad_(False)
        cfg = self.vae.config
        if self.family == "wan":
            c = cfg.z_dim
            self.register_buffer("mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1))
            self.register_buffer("std", torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1))
        else:
            self.register_buffer("mean", torch.zeros(()))
            self.register_buffer("std", torch.tensor(1.0 / cfg.scaling_factor))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        mu = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()
        return (mu - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode((z * self.std + self.mean).to(self.vae.dtype), return_dict=False)[0].float()


@torch.no_grad()
def encode_videos(path: Path, videos: Tensor, batch_size: int = 1, device="cpu") -> Tensor:
    """Scaled latents [N, C, T, H, W] of videos [N, 3, F, H, W] in [-1, 1]."""
    vae = VideoVAE(path).to(device)
    out = [vae.encode(videos[i:i + batch_size].to(device)).cpu() for i in range(0, len(videos), batch_size)]
    return torch.cat(out).contiguous()


# -- the teacher -----------------------------------------------------------------------------------------------
def load_teacher(path: str | Path, device="cpu", dtype: str = "float32", vc: VideoConfig | None = None,
                 cond_file: str | None = None, guidance: float | None = None):
    """A :class:`dmdx.models.Model` for a video pipeline folder: frozen backbone, schedule and prediction."""
    from ..denoiser import Denoiser
    from ..models import Model, ModelInfo

    vc = vc or VideoConfig()
    path, family = check_video_folder(path)
    geo = geometry(path, vc.frames, vc.height, vc.width)
    sched, pred = schedule_from_folder(path)
    name = FAMILY_BACKBONE[family]
    config = dict(path=str(path.resolve()), dtype=dtype, cond_file=cond_file, shape=list(geo.shape),
                  max_sequence_length=text_length(path, family, vc))
    bb = BACKBONES[name](**config)
    den = Denoiser(bb, sched, pred).to(device).eval().requires_grad_(False)
    g = DEFAULT_GUIDANCE[family] if guidance is None else guidance
    info = ModelInfo(kind="teacher", backbone={"name": name, "config": config}, schedule=sched.to_dict(),
                     prediction=pred, shape=list(geo.shape), guidance=g, solver="euler", steps=50,
                     extra={"family": family, "pipeline": str(path.resolve()), "component": "transformer",
                            "video": {"frames": geo.frames, "height": geo.height, "width": geo.width}})
    return Model(den, info)


# -- the run's set-up: the video adapter -------------------------------------------------------------------------
@dataclass
class VideoData:
    """Real videos as scaled latents [N, C, T, H, W], with caption embeddings where a caption exists."""

    name: str
    x: Tensor
    cond: dict[str, Tensor] | None = None  # caption embeddings [N, L, D] (zeros where no caption)
    has_caption: Tensor | None = None  # bool [N]
    kind: str = "video"
    labels: None = None
    num_classes: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


@functools.lru_cache(maxsize=None)
def _video_context():
    from ..methods.base import Context  # here, not at the top: methods import nets, which import this module

    @dataclass
    class VideoContext(Context):
        """A Context whose real batches carry their own captions (random prompts of the run where none)."""

        grid_n: int = 2  # videos in the loop's sample strips

        def real_batch(self, n: int):
            ds = self.data
            if ds is None:
                raise ValueError("this method needs real videos (--data FOLDER)")
            idx = torch.randint(len(ds.x), (n,))
            cond = self._bank_rows(n)
            if ds.cond is not None:
                own = ds.has_caption[idx].to(self.device)
                for k, v in ds.cond.items():
                    cap = v[idx].to(self.device)
                    cond[k] = torch.where(own.view(-1, *[1] * (cap.ndim - 1)), cap, cond[k])
            return ds.x[idx].to(self.device), cond

    return VideoContext


class VideoAdapter:
    """The video teacher kind: CogVideoX / Wan pipeline folders (loading, prompts, videos, export, samples)."""

    name = "video"

    def matches(self, spec) -> bool:
        return is_video_folder(spec)

    def owns(self, info) -> bool:
        return "pipeline" in info.extra and info.extra.get("family") in FAMILY_BACKBONE

    def kind(self, spec) -> str:
        return video_family(Path(str(spec)).expanduser())

    def load_teacher(self, spec, device="cpu"):
        return load_teacher(spec, device)

    # -- conditioning ----------------------------------------------------------------------------------------
    def conditioning(self, path: Path, family: str, prompts_file: str, run_dir: Path, vc: VideoConfig) -> Path:
        """Encode the prompts once into RUN/prompts.safetensors (float32)."""
        from .diffusers import read_prompts

        cond_file = run_dir / "prompts.safetensors"
        if not cond_file.is_file():
            bank, null = encode_prompts(path, read_prompts(prompts_file), text_length(path, family, vc),
                                        **encoder_placement())
            save_cond(cond_file, bank, null)
        return cond_file

    # -- data ------------------------------------------------------------------------------------------------
    def data(self, spec: str, path: Path, family: str, geo: Geometry, run_dir: Path, vc: VideoConfig) -> VideoData:
        """Real videos (a folder of video files + optional NAME.txt captions), VAE-encoded once into
        RUN/latents.safetensors."""
        from safetensors.torch import load_file, save_file

        from ..data.video import load_video_folder

        lat_file = run_dir / "latents.safetensors"
        if not lat_file.is_file():
            folder = load_video_folder(spec, geo.frames, geo.height, geo.width)
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            state = {"x": encode_videos(path, folder.videos, device=dev)}
            caps = folder.captions
            if any(c is not None for c in caps):
                given = [c for c in caps if c is not None]
                bank, _ = encode_prompts(path, given, text_length(path, family, vc), **encoder_placement())
                text = torch.zeros(len(caps), *bank["text"].shape[1:])
                rows = [i for i, c in enumerate(caps) if c is not None]
                text[rows] = bank["text"]
                state.update({"cond.text": text, "has_caption": torch.tensor([c is not None for c in caps])})
            save_file(state, str(lat_file))
        d = load_file(str(lat_file))
        if tuple(d["x"].shape[1:]) != tuple(geo.shape):
            raise ValueError(f"cached latents {lat_file} have shape {list(d['x'].shape[1:])}, the teacher "
                             f"{list(geo.shape)}")
        cond = {"text": d["cond.text"]} if "cond.text" in d else None
        return VideoData(name=str(spec), x=d["x"], cond=cond, has_caption=d.get("has_caption"))

    # -- the run ---------------------------------------------------------------------------------------------
    def build_run(self, cfg, run_dir: Path):
        """Teacher, cached prompt embeddings, cached video latents, student (maybe LoRA), pairs; checked first."""
        from ..methods import get_method
        from ..models import device_of

        rc, vc = cfg.real, cfg.video
        method = get_method(cfg.method.name)
        dev = device_of(cfg.train.device)
        path, family = check_video_folder(cfg.teacher)
        path = path.resolve()
        geo = geometry(path, vc.frames, vc.height, vc.width)
        method.check(cfg.method, tuple(geo.shape))
        sched, _ = schedule_from_folder(path)
        times = student_times(cfg.student.times, sched)
        if getattr(cfg.method, "gan", False) and not cfg.data:  # DMD2's GAN term: before the slow set-up
            raise ValueError(f"method {cfg.method.name!r} has a GAN term on real videos: pass --data FOLDER (video "
                             "files, optional NAME.txt captions), or --set method.gan=false")
        if not rc.prompts:
            raise ValueError("a video teacher needs --prompts FILE (one prompt a line)")
        if rc.resolution:
            raise ValueError("real.resolution is for image pipelines; a video teacher's size is video.height, "
                             "video.width and video.frames")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cond_file = self.conditioning(path, family, rc.prompts, run_dir, vc)
        bank, _ = load_cond(cond_file)
        ds = self.data(cfg.data, path, family, geo, run_dir, vc) if cfg.data else None
        teacher = load_teacher(path, dev, rc.teacher_dtype, vc, str(cond_file.resolve()), rc.guidance)
        teacher_net = teacher.denoiser
        student = trainable_student(teacher_net, rc, cfg.train.seed)
        pairs = pipeline_pairs(cfg, teacher, bank, run_dir, dev) if method.pairs_needed(cfg.method) else None
        ctx = _video_context()(teacher=teacher_net, teacher_net=teacher_net, student=student, data=ds, num_classes=0,
                               shape=tuple(geo.shape), batch_size=cfg.train.batch_size, device=dev, times=times,
                               pairs=pairs, guidance=teacher.info.guidance, cond_bank=bank)
        return ctx, pipeline_student_info(cfg, teacher, student, times)

    # -- export and samples ----------------------------------------------------------------------------------
    def export(self, run: Path, out: Path, fmt: str = "diffusers") -> Path:
        from .video_export import export_video_run

        return export_video_run(run, out, fmt)

    def hint(self, run: Path) -> str:
        return f"dmdx sample --model {run} --prompts PROMPTS --out {run}/videos"

    def sample(self, req) -> str:
        from .video_export import sample_videos

        if req.solver:
            raise ValueError("--solver is for built-in teachers; video teachers sample with Euler steps")
        files = sample_videos(Path(req.model), req.prompts, Path(req.out), n=req.per_prompt, seed=req.seed,
                              steps=req.steps, guidance=req.guidance, device=req.device)
        return f"{len(files)} videos (mp4 + GIF preview) -> {req.out}"

    def evaluate(self, req) -> list[dict]:
        raise ValueError(f"{req.model}: dmdx eval has no metric for video models; write videos with "
                         "dmdx sample --model MODEL --prompts FILE --out DIR")
