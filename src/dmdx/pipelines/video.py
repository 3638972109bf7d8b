"""Video pipeline folders: CogVideoX (2b / 5b / 1.5) and Wan (2.1, 2.2 TI2V-5B) text-to-video pipelines.

Family, latent geometry, schedule and prediction kind from the scheduler config, prompt encoding with the pipeline's
own ``encode_prompt``, and the VAE.  Latents are the VAE's own layout ``[C, T, H, W]`` (T latent frames), *scaled*
as each pipeline scales them.

==============  ===============================================  ===========================  ========================
family          schedule (from the scheduler config)             transformer time input       latents (scaled)
==============  ===============================================  ===========================  ========================
``cogvideox``   VPDiscrete, v-prediction, SNR shift              step index ``t * 999``       ``mean * scaling_factor``
                (``snr_shift_scale``), zero terminal SNR
``wan``         FlowMatching(``flow_shift`` / ``shift``), flow   shifted sigma * 1000         ``(mean - mu_c) / std_c``
==============  ===============================================  ===========================  ========================

Prompts: T5 (CogVideoX, ``max_text_seq_length`` tokens) and UMT5 (Wan, 512 tokens, zero-padded after the prompt as
the pipeline does); the unconditional input is the pipeline's default negative, the empty prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import VideoConfig
from ..schedules import FlowMatching, Schedule
from .folder import (DTYPES, check_folder, component_config, is_pipeline_folder, load_component, load_pipeline,
                     model_index, vp_schedule)

Tensor = torch.Tensor

CLASSES = {"CogVideoXTransformer3DModel": "cogvideox", "WanTransformer3DModel": "wan"}


FAMILIES = tuple(CLASSES.values())


# The pipelines' own __call__ defaults (WanPipeline: 480x832, 81 frames; CogVideoX: the transformer's sample size)
WAN_DEFAULT = {"frames": 81, "height": 480, "width": 832}


DEFAULT_GUIDANCE = {"cogvideox": 6.0, "wan": 5.0}  # CogVideoXPipeline / WanPipeline default guidance_scale


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
    vae = component_config(path, "vae")
    if family == "cogvideox":
        return int(vae.get("temporal_compression_ratio", 4)), 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    down = vae.get("temperal_downsample", [False, True, True])
    return (int(vae.get("scale_factor_temporal") or 2 ** sum(bool(d) for d in down)),
            int(vae.get("scale_factor_spatial") or 2 ** len(down)))


def geometry(path: Path, frames: int | None = None, height: int | None = None, width: int | None = None
             ) -> Geometry:
    """Sizes at the model's native defaults or the given ones, checked against the VAE and the patching."""
    path, family = check_video_folder(path)
    tr, vae = component_config(path, "transformer"), component_config(path, "vae")
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
    sched = component_config(path, "scheduler")
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
        return int(component_config(path, "transformer").get("max_text_seq_length", 226))
    return 512  # WanPipeline.__call__'s default


def cond_shapes(path: Path, family: str, vc: VideoConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of the text embeddings ``encode_prompts`` gives, from the configs alone (``dmdx plan``)."""
    tr = component_config(path, "transformer")
    width = tr["text_embed_dim"] if family == "cogvideox" else tr["text_dim"]
    return {"text": (text_length(path, family, vc), width)}


def encoder_placement() -> dict:
    """Where the text encoder runs: the GPU in bf16 when there is one (T5-XXL is 19 GB in float32), else the CPU."""
    return {"dtype": "bfloat16", "device": "cuda"} if torch.cuda.is_available() else {}


@torch.no_grad()
def encode_prompts(path: Path, prompts: list[str], max_length: int, batch_size: int = 8, dtype: str = "float32",
                   device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(cond bank {"text": [N, L, D]}, null cond {"text": [1, L, D]}) with the pipeline's own ``encode_prompt``."""
    pipe = load_pipeline(path, skip=("transformer", "vae"), dtype=DTYPES[dtype])
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
