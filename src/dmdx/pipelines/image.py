"""Image pipeline folders (SD1.5/SD2/SDXL UNets, SD3 and Flux transformers): family, latent geometry, schedule and
prediction kind from the scheduler config, prompt encoding with the pipeline's own ``encode_prompt``, and its VAE.

=====================  ==============================  ===========================  ==============================
family                 schedule                        backbone time input          conditioning ``cond``
=====================  ==============================  ===========================  ==============================
``sd`` (SD1.5/SD2)     VPDiscrete, epsilon or v        step index ``t * (T - 1)``   ``text`` [B, L, D]
``sdxl``               VPDiscrete, epsilon or v        step index                   ``text``, ``pooled``, ``time_ids``
``sd3``                FlowMatching(shift), flow       shifted sigma * 1000         ``text``, ``pooled``
``flux``               FlowMatching(exp(mu)), flow     shifted sigma (0..1)         ``text``, ``pooled`` (+ guidance
                                                                                    embedding, a fixed scale)
=====================  ==============================  ===========================  ==============================

dmdx works on *scaled* latents: ``z = (vae.encode(x).mean - shift) * scale``.  The unconditional input is what each
pipeline uses as its negative: the empty prompt (SD, SD3, Flux), zeros for SDXL when
``force_zeros_for_empty_prompt``.  Flux-dev style teachers are guidance-distilled: their CFG scale is an input
embedding (``guidance``), so real classifier-free guidance on them (``real_guidance != 1``) is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..schedules import FlowMatching, Schedule
from .folder import component_config, load_component, load_pipeline, model_index, vp_schedule
from .video import CLASSES as VIDEO_CLASSES

Tensor = torch.Tensor

# model class in model_index.json -> family
# model class in model_index.json -> family
FAMILIES = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
DEFAULT_GUIDANCE = {"unet": 7.5, "sd3": 7.0, "flux": 1.0}  # the real score's CFG (Flux: none, see module doc)


def denoiser_component(path: Path) -> tuple[str, str]:
    """(component name, family) of the pipeline's denoiser; unsupported classes are refused by name."""
    index = model_index(path)
    for comp in ("unet", "transformer"):
        entry = index.get(comp)
        if isinstance(entry, list) and entry[-1] is not None:
            cls = entry[-1]
            if cls not in FAMILIES:
                raise ValueError(f"{path}: unsupported {comp} class {cls!r}; supported: "
                                 f"{', '.join([*FAMILIES, *VIDEO_CLASSES])}")
            return comp, FAMILIES[cls]
    raise ValueError(f"{path}: model_index.json names no unet or transformer; supported classes: "
                     f"{', '.join(FAMILIES)}")


def pipeline_kind(path: Path) -> str:
    """The recipe kind of a pipeline folder: ``sd`` (SD1.5/SD2), ``sdxl``, ``sd3`` or ``flux``."""
    comp, family = denoiser_component(path)
    if family == "unet":
        return "sdxl" if component_config(path, comp).get("addition_embed_type") == "text_time" else "sd"
    return family


def vae_scale_factor(path: Path) -> int:
    return 2 ** (len(component_config(path, "vae").get("block_out_channels", [0] * 4)) - 1)


def flux_mu(seq_len: int, sched: dict) -> float:
    """Flux's resolution-dependent shift exponent (diffusers ``calculate_shift``): linear in the token count."""
    x1, x2 = sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096)
    y1, y2 = sched.get("base_shift", 0.5), sched.get("max_shift", 1.15)
    m = (y2 - y1) / (x2 - x1)
    return seq_len * m + (y1 - m * x1)


FLOW_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "invert_sigmas")


def schedule_from_folder(path: Path, shape: tuple[int, int, int]) -> tuple[Schedule, str]:
    """(schedule, prediction kind) from the pipeline's scheduler config, for latents of ``shape``."""
    sched = component_config(path, "scheduler")
    _, family = denoiser_component(path)
    if family == "unet":
        if sched.get("rescale_betas_zero_snr"):
            raise ValueError(f"{path}: rescale_betas_zero_snr schedules are not supported (alpha(1) = 0)")
        if sched.get("trained_betas") is not None:
            raise ValueError(f"{path}: scheduler_config.json sets trained_betas (an explicit beta table), which dmdx "
                             "does not read; supported: beta_schedule linear or scaled_linear with beta_start/beta_end")
        return vp_schedule(path, sched, {"prediction_type": "epsilon", "beta_schedule": "linear",
                                         "beta_start": 0.0001, "beta_end": 0.02})
    if sched.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{path}: a {family} teacher needs FlowMatchEulerDiscreteScheduler, got "
                         f"{sched.get('_class_name')!r}")
    # keys that change the sigmas away from the shifted line dmdx implements (FlowMatching): refused, not ignored
    unsupported = {k: sched[k] for k in FLOW_UNSUPPORTED if sched.get(k)}
    if unsupported:
        raise ValueError(f"{path}: scheduler_config.json sets {unsupported}; dmdx supports only the shifted flow "
                         "schedule (shift, or use_dynamic_shifting with time_shift_type exponential or linear), "
                         f"not {', '.join(FLOW_UNSUPPORTED)}")
    shift_type = sched.get("time_shift_type", "exponential")
    if shift_type not in ("exponential", "linear"):
        raise ValueError(f"{path}: unsupported time_shift_type {shift_type!r}; supported: exponential, linear")
    if sched.get("use_dynamic_shifting"):
        c, h, w = shape
        mu = flux_mu((h // 2) * (w // 2), sched)
        # diffusers' time_shift: exponential e^mu / (e^mu + 1/t - 1), linear mu / (mu + 1/t - 1): a shift of e^mu or mu
        shift = math.exp(mu) if shift_type == "exponential" else mu
    else:
        shift = float(sched.get("shift", 1.0))
    return FlowMatching(shift=shift, time_input="t1000" if family == "sd3" else "t"), "flow"


@torch.no_grad()
def encode_prompts(path: Path, prompts: list[str], shape: tuple[int, int, int], batch_size: int = 16
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(cond bank [N, ...], null cond [1, ...]) encoded with the pipeline's own ``encode_prompt``, float32 on CPU."""
    comp, family = denoiser_component(path)
    pipe = load_pipeline(path, skip=(comp, "vae"))
    rows: list[dict[str, Tensor]] = []
    for i in range(0, len(prompts), batch_size):
        rows.append(_encode(pipe, family, prompts[i:i + batch_size], shape, path))
    null = _encode(pipe, family, [""], shape, path, negative=True)
    bank = {k: torch.cat([r[k] for r in rows]).float().cpu() for k in rows[0]} if rows else {}
    del pipe
    return bank, {k: v.float().cpu() for k, v in null.items()}


def _encode(pipe, family: str, prompts: list[str], shape, path: Path, negative: bool = False) -> dict[str, Tensor]:
    dev = torch.device("cpu")
    if family == "unet" and hasattr(pipe, "text_encoder_2"):  # SDXL
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=dev, do_classifier_free_guidance=negative)
        text, pooled = (neg, neg_pooled) if negative else (pos, pooled)
        _, h, w = shape
        px = (h * vae_scale_factor(path), w * vae_scale_factor(path))
        ids = torch.tensor([[*px, 0, 0, *px]], dtype=torch.float32).expand(text.shape[0], 6)
        return {"text": text, "pooled": pooled, "time_ids": ids}
    if family == "unet":
        pos, neg = pipe.encode_prompt(prompts, dev, 1, negative, negative_prompt=None)
        return {"text": neg if negative else pos}
    if family == "sd3":
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=dev,
                                                          do_classifier_free_guidance=negative)
        return {"text": neg, "pooled": neg_pooled} if negative else {"text": pos, "pooled": pooled}
    text, pooled, _ = pipe.encode_prompt(prompts, None, device=dev)  # flux: the empty prompt is its negative
    return {"text": text, "pooled": pooled}


def _tokenizer_length(path: Path, name: str = "tokenizer") -> int:
    f = path / name / "tokenizer_config.json"
    length = json.loads(f.read_text()).get("model_max_length", 77) if f.is_file() else 77
    return min(int(length), 77)  # CLIP's positions; a config without a length says 1e30


def cond_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the conditioning ``encode_prompts`` gives, read from the configs alone (``dmdx plan``
    plans a folder without its text encoders' weights): the tokenizers' lengths and the denoiser's input widths."""
    comp, family = denoiser_component(path)
    cfg = component_config(path, comp)
    if family == "unet":
        out = {"text": (_tokenizer_length(path), cfg["cross_attention_dim"])}
        if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 size / crop values
            n = 6
            out.update(pooled=(cfg["projection_class_embeddings_input_dim"] - n * cfg["addition_time_embed_dim"],),
                       time_ids=(n,))
        return out
    if family == "sd3":  # the CLIP tokens + the T5 prompt (StableDiffusion3Pipeline's max_sequence_length 256)
        return {"text": (_tokenizer_length(path) + 256, cfg["joint_attention_dim"]),
                "pooled": (cfg["pooled_projection_dim"],)}
    return {"text": (512, cfg["joint_attention_dim"]), "pooled": (cfg["pooled_projection_dim"],)}  # FluxPipeline


def default_shape(path: Path) -> tuple[int, int, int]:
    """(C, H, W) latent shape at the model's native resolution."""
    comp, family = denoiser_component(path)
    cfg = component_config(path, comp)
    vs = vae_scale_factor(path)
    if family == "unet":
        s = cfg["sample_size"]
        s = s if isinstance(s, int) else s[0]
        return (cfg["in_channels"], s, s)
    if family == "sd3":
        s = cfg["sample_size"]
        return (cfg["in_channels"], s, s)
    s = component_config(path, "vae").get("sample_size", 1024)  # Flux has no native size of its own: the VAE's
    s = (s if isinstance(s, int) else s[0]) // vs
    return (cfg["in_channels"] // 4, s, s)


def check_shape(path: Path, shape: tuple[int, int, int]) -> None:
    """Latent channels and resolution against the model and VAE, before any training."""
    comp, family = denoiser_component(path)
    cfg = component_config(path, comp)
    vae_c = component_config(path, "vae").get("latent_channels", 4)
    model_c = cfg["in_channels"] // 4 if family == "flux" else cfg["in_channels"]
    if vae_c != model_c:
        raise ValueError(f"{path}: the VAE has {vae_c} latent channels but the {comp} expects {model_c}")
    c, h, w = shape
    if c != model_c:
        raise ValueError(f"latent shape {list(shape)} has {c} channels; the {comp} expects {model_c}")
    mult = {"unet": 2 ** (len(cfg.get("block_out_channels", [0])) - 1), "sd3": cfg.get("patch_size", 1),
            "flux": 2}[family]
    if h % mult or w % mult:
        vs = vae_scale_factor(path)
        raise ValueError(f"resolution {h * vs}x{w * vs} (latents {h}x{w}) is not a multiple of {mult * vs} pixels, "
                         f"which the {comp} needs")


def latent_shape(path: Path, resolution: int | None) -> tuple[int, int, int]:
    c, h, w = default_shape(path)
    if resolution:
        vs = vae_scale_factor(path)
        if resolution % vs:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {vs}")
        h = w = resolution // vs
    return (c, h, w)


@torch.no_grad()
def encode_images(path: Path, images: Tensor, batch_size: int = 8) -> Tensor:
    """Scaled VAE latents (the pipeline's mean latent, shift and scale) of images in [-1, 1]."""
    vae = load_component(path, "vae").eval()
    shift = vae.config.get("shift_factor", None) or 0.0
    scale = vae.config.scaling_factor
    out = [(vae.encode(images[i:i + batch_size]).latent_dist.mean - shift) * scale
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).float().contiguous()


class VAEDecoder(nn.Module):
    """Scaled latents -> images in [-1, 1] with the pipeline's VAE (frozen)."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vae = load_component(path, "vae", dtype).eval().requires_grad_(False)
        self.shift = self.vae.config.get("shift_factor", None) or 0.0
        self.scale = self.vae.config.scaling_factor

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode((z / self.scale + self.shift).to(self.vae.dtype), return_dict=False)[0].float()
