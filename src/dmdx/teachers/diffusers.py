"""Teachers from local diffusers pipeline folders (SD1.5/SD2/SDXL UNets, SD3 and Flux transformers).

A pipeline folder (one with ``model_index.json``) is read, never stepped: its scheduler config gives the dmdx
schedule and prediction kind, its UNet / transformer becomes a backbone behind the dmdx contract
(``forward(x, time, cond)``, ``null_cond``, ``feature_layers``), its text encoders encode the prompts once and its
VAE encodes real images once.  dmdx works on *scaled* latents: ``z = (vae.encode(x).mean - shift) * scale``.

=====================  ==============================  ===========================  ==============================
family                 schedule                        backbone time input          conditioning ``cond``
=====================  ==============================  ===========================  ==============================
``sd`` (SD1.5/SD2)     VPDiscrete, epsilon or v        step index ``t * (T - 1)``   ``text`` [B, L, D]
``sdxl``               VPDiscrete, epsilon or v        step index                   ``text``, ``pooled``, ``time_ids``
``sd3``                FlowMatching(shift), flow       shifted sigma * 1000         ``text``, ``pooled``
``flux``               FlowMatching(exp(mu)), flow     shifted sigma (0..1)         ``text``, ``pooled`` (+ guidance
                                                                                    embedding, a fixed scale)
=====================  ==============================  ===========================  ==============================

The unconditional input is what each pipeline uses as its negative: the empty prompt (SD, SD3, Flux), zeros for
SDXL when ``force_zeros_for_empty_prompt``.  Flux-dev style teachers are guidance-distilled: their CFG scale is an
input embedding (``guidance``), so real classifier-free guidance on them (``real_guidance != 1``) is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..schedules import FlowMatching, Schedule, VPDiscrete

Tensor = torch.Tensor
Cond = dict[str, Tensor] | None

# model class in model_index.json -> family
FAMILIES = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- the folder ------------------------------------------------------------------------------------------------
def is_pipeline_folder(spec: str | Path) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "model_index.json").is_file()


def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` with no such local path: a hub id, which dmdx never downloads."""
    parts = str(spec).split("/")
    return len(parts) == 2 and all(parts) and not Path(spec).exists() and not str(spec).startswith((".", "~"))


def check_folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        hint = " (it looks like a Hugging Face hub id)" if looks_like_hub_id(str(path)) else ""
        raise FileNotFoundError(f"teacher {str(path)!r} not found{hint}: dmdx needs a local diffusers pipeline folder "
                                "(with model_index.json), e.g. from `huggingface-cli download ORG/NAME --local-dir "
                                "DIR`; nothing is downloaded at run time")
    if not is_pipeline_folder(path):
        raise ValueError(f"{path} has no model_index.json: not a diffusers pipeline folder")
    return path


def model_index(path: Path) -> dict:
    return json.loads((Path(path) / "model_index.json").read_text())


def denoiser_component(path: Path) -> tuple[str, str]:
    """(component name, family) of the pipeline's denoiser; unsupported classes are refused by name."""
    index = model_index(path)
    for comp in ("unet", "transformer"):
        entry = index.get(comp)
        if isinstance(entry, list) and entry[-1] is not None:
            cls = entry[-1]
            if cls not in FAMILIES:
                from .video import CLASSES as VIDEO_CLASSES  # video transformers: dmdx.teachers.video

                raise ValueError(f"{path}: unsupported {comp} class {cls!r}; supported: "
                                 f"{', '.join([*FAMILIES, *VIDEO_CLASSES])}")
            return comp, FAMILIES[cls]
    raise ValueError(f"{path}: model_index.json names no unet or transformer; supported classes: "
                     f"{', '.join(FAMILIES)}")


def pipeline_kind(path: Path) -> str:
    """The recipe kind of a pipeline folder: ``sd`` (SD1.5/SD2), ``sdxl``, ``sd3`` or ``flux``."""
    comp, family = denoiser_component(path)
    if family == "unet":
        return "sdxl" if _config(path, comp).get("addition_embed_type") == "text_time" else "sd"
    return family


def _config(path: Path, component: str) -> dict:
    f = Path(path) / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    if not f.is_file():
        raise ValueError(f"{path}: missing {f.relative_to(path)}")
    return json.loads(f.read_text())


def vae_scale_factor(path: Path) -> int:
    return 2 ** (len(_config(path, "vae").get("block_out_channels", [0] * 4)) - 1)


def flux_mu(seq_len: int, sched: dict) -> float:
    """Flux's resolution-dependent shift exponent (diffusers ``calculate_shift``): linear in the token count."""
    x1, x2 = sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096)
    y1, y2 = sched.get("base_shift", 0.5), sched.get("max_shift", 1.15)
    m = (y2 - y1) / (x2 - x1)
    return seq_len * m + (y1 - m * x1)


FLOW_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "invert_sigmas")


def vp_schedule(path: Path, sched: dict, defaults: dict, **extra) -> tuple[VPDiscrete, str]:
    """(VPDiscrete, prediction kind) from a DDPM-style scheduler config; ``defaults`` fill the keys it leaves out
    (each scheduler class has its own), ``extra`` are further VPDiscrete arguments."""
    sched = {**defaults, **{k: v for k, v in sched.items() if v is not None}}
    kind = sched["prediction_type"]
    pred = {"epsilon": "epsilon", "v_prediction": "v"}.get(kind)
    if pred is None:
        raise ValueError(f"{path}: unsupported prediction_type {kind!r}; supported: epsilon, v_prediction")
    bs = sched["beta_schedule"]
    if bs not in ("linear", "scaled_linear"):
        raise ValueError(f"{path}: unsupported beta_schedule {bs!r}; supported: linear, scaled_linear")
    return VPDiscrete(beta_start=sched["beta_start"], beta_end=sched["beta_end"], beta_schedule=bs,
                      num_train_timesteps=sched.get("num_train_timesteps", 1000), **extra), pred


def schedule_from_folder(path: Path, shape: tuple[int, int, int]) -> tuple[Schedule, str]:
    """(schedule, prediction kind) from the pipeline's scheduler config, for latents of ``shape``."""
    sched = _config(path, "scheduler")
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


# -- loading components ----------------------------------------------------------------------------------------
def load_component(path: Path, component: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    import diffusers

    cls_name = model_index(path)[component][-1]
    cls = getattr(diffusers, cls_name)
    return cls.from_pretrained(str(Path(path) / component), torch_dtype=dtype, local_files_only=True)


def load_pipeline(path: Path, skip: tuple[str, ...] = (), dtype: torch.dtype = torch.float32):
    """The pipeline with the named components left out (None)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True,
                                             **{c: None for c in skip})


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


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one prompt a line)")
    return prompts


def save_cond(path: Path, bank: dict[str, Tensor], null: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({**{f"bank.{k}": v.contiguous() for k, v in bank.items()},
               **{f"null.{k}": v.contiguous() for k, v in null.items()}}, str(path))


def load_cond(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    from safetensors.torch import load_file

    d = load_file(str(path))
    return ({k[5:]: v for k, v in d.items() if k.startswith("bank.")},
            {k[5:]: v for k, v in d.items() if k.startswith("null.")})


# -- LoRA ------------------------------------------------------------------------------------------------------
def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    """Inject a peft LoRA adapter and turn every other parameter into a buffer.

    Buffers keep the frozen base weights in ``state_dict`` (so checkpoints and EMA work unchanged) while
    ``parameters()`` yields only the LoRA weights: whatever ``requires_grad_`` the loop sets, the base never trains.
    """
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian"))
    for name, mod in model.named_modules():
        if "lora_" in name:
            continue
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            del mod._parameters[pname]
            mod.register_buffer(pname, p.detach(), persistent=True)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """diffusers-format LoRA weights of a model that went through :func:`add_lora`."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


# -- backbones -------------------------------------------------------------------------------------------------
class _Tap(nn.Identity):
    """A named point whose forward output is a feature map (FeatureTap hooks it)."""


class PipelineBackbone(nn.Module):
    """A pipeline's UNet / transformer behind the dmdx backbone contract.

    ``config`` rebuilds it: the pipeline folder, the dtype of the weights, the null conditioning file (else the
    empty prompt is encoded here), LoRA and gradient checkpointing.  Only the wrapped model's weights are state;
    the null conditioning is a non-persistent buffer.
    """

    family: ClassVar[str] = ""

    def __init__(self, path: str, dtype: str = "float32", cond_file: str | None = None, lora: dict | None = None,
                 grad_checkpointing: bool = False, shape: list[int] | None = None, guidance: float = 3.5):
        super().__init__()
        path = str(check_folder(path))
        self.component, family = denoiser_component(Path(path))
        if family != self.family:
            raise ValueError(f"{path} holds a {family} model, not {self.family}")
        self.config = dict(path=path, dtype=dtype, cond_file=cond_file, lora=lora,
                           grad_checkpointing=grad_checkpointing, shape=shape, guidance=guidance)
        self.model = load_component(Path(path), self.component, DTYPES[dtype])
        self.shape = tuple(shape) if shape else default_shape(Path(path))
        if cond_file and Path(cond_file).is_file():
            _, null = load_cond(Path(cond_file))
        else:
            _, null = encode_prompts(Path(path), [], self.shape)
        self._null_keys = list(null)
        for k, v in null.items():
            self.register_buffer(f"null_{k}", v, persistent=False)
        self.copy_options: dict = {}  # LoRA / checkpointing applied when a trainable copy is made (fake score)
        self._setup()
        if lora:
            add_lora(self.model, **lora)
        if grad_checkpointing:
            self.model.enable_gradient_checkpointing()

    def _run(self, grid: tuple[int, ...], **kwargs) -> Tensor:
        """The model's forward with tap hooks (``self._hook``) on the blocks ``self._tap_blocks`` of ``self._blocks()``,
        registered per call so that deep copies (student, fake score) stay apart."""
        blocks = self._blocks()
        handles = [blocks[i].register_forward_hook(self._hook(j, grid)) for j, i in enumerate(self._tap_blocks)]
        try:
            return self.model(**kwargs, return_dict=False)[0]
        finally:
            for hd in handles:
                hd.remove()

    def _setup(self) -> None:
        pass

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.config["dtype"]]

    def make_trainable(self, lora: dict | None = None, grad_checkpointing: bool | None = None) -> None:
        """Turn a (deep-copied) teacher backbone into a trainable float32 one, with LoRA if asked."""
        opts = {**self.copy_options}
        lora = lora if lora is not None else opts.get("lora")
        gc = grad_checkpointing if grad_checkpointing is not None else opts.get("grad_checkpointing", False)
        if self.config["dtype"] != "float32":
            full = load_component(Path(self.config["path"]), self.component, torch.float32)
            self.model.to(torch.float32).load_state_dict(full.state_dict())
            self.config["dtype"] = "float32"
        if lora and not self.config["lora"]:
            add_lora(self.model, **lora)
            self.config["lora"] = dict(lora)
        if gc:
            self.model.enable_gradient_checkpointing()
            self.config["grad_checkpointing"] = True
        self.copy_options = {}

    def _recast(self, dtypes: dict[int, torch.dtype]) -> dict[int, torch.dtype]:
        """Replace each parameter / buffer whose id is in ``dtypes`` by a copy in that dtype (a tied weight by one
        copy); returns the copies' ids with the dtypes they had before."""
        copies, before = {}, {}
        for mod in self.model.modules():
            for name, v in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                if id(v) not in dtypes:
                    continue
                if id(v) not in copies:
                    new = v.detach().to(dtypes[id(v)])
                    copies[id(v)] = nn.Parameter(new, v.requires_grad) if isinstance(v, nn.Parameter) else new
                    before[id(copies[id(v)])] = v.dtype
                setattr(mod, name, copies[id(v)])
        return before

    @contextlib.contextmanager
    def float32(self):
        """Inside the block the model computes in float32 whatever its weights' dtype (ADM's ODE steps and critic).

        Each lower-precision parameter and buffer is replaced by a float32 copy (exact: every bf16 / fp16 value is a
        float32 value) and put back in its own dtype on exit, so the block holds the memory of a float32 model.
        The copies are new tensors: a graph built inside keeps its own until its backward.
        """
        low = {id(v): torch.float32 for v in [*self.model.parameters(), *self.model.buffers()]
               if v.is_floating_point() and v.dtype != torch.float32}
        back = self._recast(low)
        dtype, self.config["dtype"] = self.config["dtype"], "float32"
        try:
            yield
        finally:
            self._recast(back)
            self.config["dtype"] = dtype

    def null_cond(self, cond: Cond) -> Cond:
        b = 1 if cond is None else next(iter(cond.values())).shape[0]
        out = dict(cond) if cond is not None else {}
        for k in self._null_keys:
            v = getattr(self, f"null_{k}")
            out[k] = v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v[:b]
        return out

    def _cond(self, cond: Cond, b: int, dev) -> dict[str, Tensor]:
        if cond is None:
            cond = self.null_cond(None)
        dt = self.dtype
        return {k: (v.expand(b, *v.shape[1:]) if v.shape[0] == 1 and b > 1 else v).to(dev, dt) for k, v in cond.items()}


def default_shape(path: Path) -> tuple[int, int, int]:
    """(C, H, W) latent shape at the model's native resolution."""
    comp, family = denoiser_component(path)
    cfg = _config(path, comp)
    vs = vae_scale_factor(path)
    if family == "unet":
        s = cfg["sample_size"]
        s = s if isinstance(s, int) else s[0]
        return (cfg["in_channels"], s, s)
    if family == "sd3":
        s = cfg["sample_size"]
        return (cfg["in_channels"], s, s)
    s = _config(path, "vae").get("sample_size", 1024)  # Flux has no native size of its own: the VAE's
    s = (s if isinstance(s, int) else s[0]) // vs
    return (cfg["in_channels"] // 4, s, s)


class UNetBackbone(PipelineBackbone):
    """``UNet2DConditionModel`` (SD1.5/SD2; SDXL adds ``text_embeds`` = pooled and ``time_ids``)."""

    family = "unet"

    def _setup(self):
        n = len(self.model.down_blocks)
        self.feature_layers = tuple(f"model.down_blocks.{i}" for i in range(n)) + ("model.mid_block",)

    def forward(self, x: Tensor, time: Tensor, cond: Cond = None) -> Tensor:
        b = x.shape[0]
        c = self._cond(cond, b, x.device)
        added = {"text_embeds": c["pooled"], "time_ids": c["time_ids"]} if "pooled" in c else None
        return self.model(x.to(self.dtype), time.to(x.device).float().expand(b), encoder_hidden_states=c["text"],
                          added_cond_kwargs=added, return_dict=False)[0]


class _TransformerBackbone(PipelineBackbone):
    """Shared by SD3 and Flux: the image-token stream of every ``feature_every``-th block, as a map [B, D, h, w]."""

    def _setup(self):
        blocks = list(self.model.transformer_blocks)
        idx = sorted({*range(0, len(blocks), max(1, len(blocks) // 4)), len(blocks) - 1})
        self.taps = nn.ModuleList(_Tap() for _ in idx)
        self._tap_blocks = idx
        self.feature_layers = tuple(f"taps.{j}" for j in range(len(idx)))

    def _blocks(self) -> nn.ModuleList:
        return self.model.transformer_blocks

    def _hook(self, j: int, grid: tuple[int, int]):
        def hook(_mod, _inp, out):
            h, w = grid
            outs = out if isinstance(out, tuple) else (out,)
            img = next(o for o in outs if o is not None and o.ndim == 3 and o.shape[1] == h * w)
            self.taps[j](img.transpose(1, 2).reshape(img.shape[0], img.shape[2], h, w))

        return hook


class SD3Backbone(_TransformerBackbone):
    """``SD3Transformer2DModel``: timestep = shifted sigma * 1000, joint text embeddings + pooled projections."""

    family = "sd3"

    def forward(self, x: Tensor, time: Tensor, cond: Cond = None) -> Tensor:
        b = x.shape[0]
        c = self._cond(cond, b, x.device)
        p = self.model.config.patch_size
        return self._run((x.shape[-2] // p, x.shape[-1] // p), hidden_states=x.to(self.dtype),
                         timestep=time.to(x.device).float().expand(b), encoder_hidden_states=c["text"],
                         pooled_projections=c["pooled"])


def pack(x: Tensor) -> Tensor:
    """Flux's 2x2 patch packing [B, C, H, W] -> [B, H/2 * W/2, 4C] (diffusers ``_pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


class FluxBackbone(_TransformerBackbone):
    """``FluxTransformer2DModel``: timestep = shifted sigma in [0, 1]; packed latents; a guidance-distilled model
    gets its guidance embedding fixed at ``guidance`` (its CFG is an input, not two passes)."""

    family = "flux"

    def forward(self, x: Tensor, time: Tensor, cond: Cond = None) -> Tensor:
        b, _, h, w = x.shape
        c = self._cond(cond, b, x.device)
        ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        img_ids = ids.reshape(-1, 3).to(self.dtype)
        txt_ids = torch.zeros(c["text"].shape[1], 3, device=x.device, dtype=self.dtype)
        g = None
        if self.model.config.guidance_embeds:
            g = torch.full((b,), float(self.config["guidance"]), device=x.device, dtype=torch.float32)
        out = self._run((h // 2, w // 2), hidden_states=pack(x.to(self.dtype)),
                        timestep=time.to(x.device).float().expand(b), guidance=g, pooled_projections=c["pooled"],
                        encoder_hidden_states=c["text"], txt_ids=txt_ids, img_ids=img_ids)
        return unpack(out, h, w)

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.model.config.guidance_embeds)


BACKBONES = {"sd_unet": UNetBackbone, "sd3_transformer": SD3Backbone, "flux_transformer": FluxBackbone}
FAMILY_BACKBONE = {"unet": "sd_unet", "sd3": "sd3_transformer", "flux": "flux_transformer"}
DEFAULT_GUIDANCE = {"unet": 7.5, "sd3": 7.0, "flux": 1.0}  # the real score's CFG (Flux: none, see module doc)


# -- the teacher -----------------------------------------------------------------------------------------------
def check_shape(path: Path, shape: tuple[int, int, int]) -> None:
    """Latent channels and resolution against the model and VAE, before any training."""
    comp, family = denoiser_component(path)
    cfg = _config(path, comp)
    vae_c = _config(path, "vae").get("latent_channels", 4)
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


def load_teacher(path: str | Path, device="cpu", dtype: str = "float32", resolution: int | None = None,
                 cond_file: str | None = None, guidance: float | None = None, flux_guidance: float = 3.5):
    """A :class:`dmdx.models.Model` for a pipeline folder: frozen backbone, schedule and prediction from it."""
    from ..denoiser import Denoiser
    from ..models import Model, ModelInfo

    path = check_folder(path)
    comp, family = denoiser_component(path)
    shape = latent_shape(path, resolution)
    check_shape(path, shape)
    sched, pred = schedule_from_folder(path, shape)
    name = FAMILY_BACKBONE[family]
    config = dict(path=str(path.resolve()), dtype=dtype, cond_file=cond_file, shape=list(shape),
                  guidance=flux_guidance)
    bb = BACKBONES[name](**config)
    den = Denoiser(bb, sched, pred).to(device).eval().requires_grad_(False)
    g = DEFAULT_GUIDANCE[family] if guidance is None else guidance
    info = ModelInfo(kind="teacher", backbone={"name": name, "config": config}, schedule=sched.to_dict(),
                     prediction=pred, shape=list(shape), guidance=g, solver="euler", steps=28,
                     extra={"family": family, "pipeline": str(path.resolve()), "component": comp})
    return Model(den, info)


# -- real data: VAE latents ------------------------------------------------------------------------------------
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


class PixelBackbone(nn.Module):
    """ADP's pixel discriminator backbone on latents: VAE decode, then a frozen ``transformers`` vision encoder
    (DINOv2 or any model with ``hidden_states``); features are the patch tokens of a few layers as maps."""

    def __init__(self, pipeline: Path, encoder: str | Path, size: int = 224, layers: int = 4):
        super().__init__()
        from transformers import AutoModel

        enc_path = Path(encoder).expanduser()
        if not enc_path.is_dir():
            raise FileNotFoundError(f"vision encoder {str(encoder)!r} not found: a local transformers folder "
                                    "(e.g. facebook/dinov2-small downloaded beforehand) is needed")
        self.decoder = VAEDecoder(pipeline)
        self.encoder = AutoModel.from_pretrained(str(enc_path), local_files_only=True).eval().requires_grad_(False)
        self.size = size
        self.layers = layers
        self.patch = getattr(self.encoder.config, "patch_size", 14)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def features(self, z: Tensor) -> list[Tensor]:
        x = self.decoder(z).clamp(-1, 1)
        x = torch.nn.functional.interpolate((x + 1) / 2, size=(self.size, self.size), mode="bilinear",
                                            align_corners=False)
        hs = self.encoder(pixel_values=(x - self.mean) / self.std, output_hidden_states=True).hidden_states
        g = self.size // self.patch
        pick = [hs[round(i * (len(hs) - 1) / self.layers)] for i in range(1, self.layers + 1)]
        return [h[:, -g * g:].transpose(1, 2).reshape(h.shape[0], h.shape[2], g, g) for h in pick]


def trainable_student(teacher_net, rc, seed: int):
    """The student: a float32 trainable copy of a pipeline teacher (LoRA and checkpointing from ``rc``, a
    ``RealModelConfig``); the teacher remembers the fake score's options for the copy a method makes of it."""
    import copy

    torch.manual_seed(seed)
    student = copy.deepcopy(teacher_net)
    student.backbone.make_trainable(lora=rc.student_lora.spec(), grad_checkpointing=rc.grad_checkpointing)
    student.requires_grad_(True).train()
    teacher_net.backbone.copy_options = {"lora": rc.fake_lora.spec(), "grad_checkpointing": rc.grad_checkpointing}
    return student
