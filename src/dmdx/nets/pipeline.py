"""Image pipelines' networks behind the dmdx backbone contract: SD1.5/SD2/SDXL UNets, SD3 and Flux transformers
(``forward(x, time, cond)``, ``null_cond``, ``feature_layers`` for the discriminator heads), their LoRA adapters,
and a frozen vision encoder on decoded latents for ADP's pixel discriminator.

The folder is read by :mod:`dmdx.pipelines`; the frozen teacher, the student and the fake score are each one of
these backbones (the student and fake score trainable float32 copies, with a LoRA when asked).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..pipelines.folder import DTYPES, check_folder, load_cond, load_component
from ..pipelines.image import VAEDecoder, cond_shapes, default_shape, denoiser_component, encode_prompts

Tensor = torch.Tensor
Cond = dict[str, Tensor] | None


# -- LoRA ------------------------------------------------------------------------------------------------------
BASE_KEEP = ("state", "folder", "shared")


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], base: str = "state"
             ) -> list[tuple[nn.Module, str]]:
    """Inject a peft LoRA adapter and freeze everything else: ``parameters()`` then yields only the LoRA weights, so
    whatever ``requires_grad_`` the loop sets, the base never trains.  What becomes of the base weights:

    - ``state``: persistent buffers, in ``state_dict`` (checkpoints and EMA work unchanged, a model folder holds
      them);
    - ``folder``: non-persistent buffers, re-read from the pipeline folder when the model is rebuilt (a model
      folder holds only the LoRA); the model's own buffers (SD3's positional embedding) become non-persistent too,
      as a shared-base copy, which saved that folder, held them as the teacher's;
    - ``shared``: plain attributes, neither parameters nor buffers: tensors another network owns (the teacher of a
      run with ``real.shared_base``), which ``state_dict``, ``.to()``, EMA and checkpoints never touch.

    Returns the ``(module, name)`` slots of the base tensors.
    """
    from peft import LoraConfig  # optional, heavy: imported on use (the diffusers extra)

    if base not in BASE_KEEP:
        raise ValueError(f"unknown base {base!r}; allowed: {', '.join(BASE_KEEP)}")
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian"))
    slots = []
    for name, mod in model.named_modules():
        if "lora_" in name:
            continue
        for table in (mod._parameters, *((mod._buffers,) if base != "state" else ())):
            for pname, p in list(table.items()):
                if p is None:
                    continue
                del table[pname]
                if base == "shared":
                    mod.__dict__[pname] = p  # the owner's tensor itself, out of parameters() and buffers()
                else:
                    mod.register_buffer(pname, p.detach(), persistent=base == "state")
                slots.append((mod, pname))
    for mod in model.modules():  # the LoRA weights train in float32, whatever the base's dtype
        for pname, p in mod._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                mod._parameters[pname] = nn.Parameter(p.detach().float(), p.requires_grad)
    return slots


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA weights of a model that went through :func:`add_lora`, in peft's key format
    (``<module>.lora_A.weight`` / ``.lora_B.weight``), float32, the format diffusers' ``load_lora_weights`` reads
    unconverted.

    Not ``diffusers.utils.convert_state_dict_to_diffusers``: it renames only the attention projections (``to_q``,
    ``to_out.0``, ...) to the old ``.lora.down`` names and leaves conv, feed-forward, projection and time-embedding
    keys in peft's format; the loader picks one format from the first key, and the modules of the other format were
    injected without their weights.
    """
    from peft.utils import get_peft_model_state_dict  # optional: imported on use

    return {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def lora_config(model: nn.Module) -> dict:
    """The adapter's peft ``LoraConfig`` (rank, alpha, target modules) as diffusers' ``*_lora_adapter_metadata``,
    stored in the LoRA file so that ``load_lora_weights`` rebuilds the same adapter; without it the loader knows no
    alpha and scales every module by 1 instead of alpha / rank.  Only the keys diffusers itself infers for a
    ``LoraConfig`` (``get_peft_kwargs``), so that other peft versions read it too."""
    cfg = model.peft_config["default"]
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
            "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
            "use_dora": bool(cfg.use_dora), "lora_bias": bool(getattr(cfg, "lora_bias", False))}


def merged_model(backbone) -> nn.Module:
    """The student's diffusers model as a plain (LoRA merged) model, float32."""
    model = backbone.model
    fresh = load_component(Path(backbone.config["path"]), backbone.component, torch.float32)
    if not backbone.config.get("lora"):
        fresh.load_state_dict(model.state_dict())
        return fresh
    from peft.tuners.tuners_utils import BaseTunerLayer  # optional: imported on use

    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
    # the base weights with the LoRA merged in: buffers, persistent or not (a shared-base student's model folder
    # holds only its LoRA; its base is read from the pipeline folder)
    want = set(fresh.state_dict())
    named = {**dict(model.named_buffers()), **model.state_dict()}
    state = {k.replace(".base_layer.", "."): v for k, v in named.items() if "lora_" not in k}
    fresh.load_state_dict({k: v for k, v in state.items() if k in want})
    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.unmerge()
    return fresh


# -- backbones -------------------------------------------------------------------------------------------------
class _Tap(nn.Identity):
    """A named point whose forward output is a feature map (FeatureTap hooks it)."""


class SharedBase:
    """The frozen base network a teacher shares with its LoRA copies (``real.shared_base``): the student, the fake
    score and the EMA are LoRA adapters on the teacher's own weight tensors (held once), the teacher is the base
    with no adapter.  Each network keeps its own modules (hooks, feature taps, gradient checkpointing and FSDP units
    stay per network); only the frozen tensors are common, so nothing is switched between calls."""

    def __init__(self):
        self.members: weakref.WeakSet = weakref.WeakSet()


def _slot(mod: nn.Module, name: str) -> Tensor:
    return mod.__dict__[name] if name in mod.__dict__ else getattr(mod, name)


def _set_slot(mod: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` where ``mod.name`` lives: its parameters, its buffers, or a plain attribute (a shared base)."""
    if name in mod._parameters:
        mod._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        mod.__dict__[name] = value


class _Float32Compute:
    """How a ``float32`` block runs lower-precision networks in float32 without a float32 copy of the network.

    The tensors of the repeated blocks (every ``nn.ModuleList`` directly under the model, and ``mid_block``: nearly
    all the weights) are swapped for float32 copies by a forward pre-hook of the module that owns them and put back
    by its forward hook; the few outside them (embeddings, first and last layers, which a parent may read the dtype
    of before calling them) are swapped for the whole block.  A copy an operation saves for its backward is packed
    as the base tensor it came from and cast again when the backward unpacks it (``save``), so a graph built inside
    the block holds no float32 weights either.  Gradient checkpointing's recomputation in the backward enters
    ``hooks(save=False)`` (its own saved-tensor hooks are in force there).
    """

    def __init__(self, members: list):
        self.layers: dict[nn.Module, list[str]] = {}
        self.whole: list[tuple[nn.Module, str]] = []
        for bb in members:
            inner = set()
            for name, child in bb.model.named_children():
                if isinstance(child, nn.ModuleList) or name == "mid_block":
                    inner.update(id(m) for m in child.modules())
            for mod, name in bb.base_slots():
                v = _slot(mod, name)
                if v.is_floating_point() and v.dtype != torch.float32:
                    if id(mod) in inner:
                        self.layers.setdefault(mod, []).append(name)
                    else:
                        self.whole.append((mod, name))
        self.live: dict[int, Tensor] = {}  # a float32 copy's storage -> the tensor it copies

    def _up(self, v: Tensor) -> Tensor:
        c = torch.empty_like(v, dtype=torch.float32).copy_(v.detach())
        self.live[c.untyped_storage()._cdata] = v
        return c

    def _swap(self, slots: list[tuple[nn.Module, str]]) -> list[tuple[nn.Module, str, Tensor]]:
        before = [(mod, name, _slot(mod, name)) for mod, name in slots]
        ups: dict[int, Tensor] = {}  # a tensor several members share gets one copy
        for mod, name, v in before:
            if id(v) not in ups:
                ups[id(v)] = self._up(v)
            _set_slot(mod, name, ups[id(v)])
        return before

    def _restore(self, before: list[tuple[nn.Module, str, Tensor]]) -> None:
        for mod, name, v in before:
            self.live.pop(_slot(mod, name).untyped_storage()._cdata, None)
            _set_slot(mod, name, v)

    def _pack(self, t: Tensor):
        """A saved tensor as it is, detached (autograd gives it back its ``grad_fn`` when it unpacks it), or a
        float32 copy as its base tensor.  Not ``t`` itself: where ``t`` is an output of the operation that saves it,
        ``t``'s ``grad_fn`` would hold ``t`` through the saved tensor, a reference cycle through C++ that Python's
        garbage collector cannot see; a graph that no backward frees (a discarded pass, the part of a pass after a
        feature) would never be freed, with every tensor it reaches."""
        v = self.live.get(t.untyped_storage()._cdata) if t.dtype == torch.float32 else None
        return t.detach() if v is None else (_Recast, v, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def _unpack(packed):
        if type(packed) is tuple and packed[0] is _Recast:
            _, v, size, stride, offset = packed
            return torch.empty_like(v, dtype=torch.float32).copy_(v).as_strided(size, stride, offset)
        return packed

    @contextlib.contextmanager
    def hooks(self, save: bool, within: nn.Module | None = None):
        """The block's float32 computation; ``within``: only that module's layers (a checkpointed unit's
        recomputation, which needs none of the tensors outside the repeated blocks)."""
        swapped: dict[nn.Module, list] = {}

        def pre(mod, _args):
            if mod not in swapped:  # a module re-entered (a loop inside it) keeps its first copies
                swapped[mod] = self._swap([(mod, name) for name in self.layers[mod]])

        def post(mod, _args, _out):
            self._restore(swapped.pop(mod, []))

        layers = self.layers if within is None else [m for m in within.modules() if m in self.layers]
        whole = self._swap(self.whole) if within is None else []
        handles = [h for mod in layers
                   for h in (mod.register_forward_pre_hook(pre), mod.register_forward_hook(post, always_call=True))]
        try:
            with (torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack) if save
                  else contextlib.nullcontext()):
                yield
        finally:
            for h in handles:
                h.remove()
            for before in swapped.values():
                self._restore(before)
            self._restore(whole)


class _Recast:
    """Marks a saved float32 copy packed as its base tensor (``_Float32Compute._pack``)."""


def cast_module(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer of ``model`` in ``dtype``, replaced in the modules' dictionaries (not
    through ``Module.to``, which fake tensors refuse; a tied weight stays tied)."""
    new: dict[int, Tensor] = {}
    for mod in model.modules():
        for name, v in [*mod._parameters.items(), *mod._buffers.items()]:
            if v is None or not v.is_floating_point() or v.dtype == dtype:
                continue
            if id(v) not in new:
                t = v.detach().to(dtype)
                new[id(v)] = nn.Parameter(t, v.requires_grad) if isinstance(v, nn.Parameter) else t
            _set_slot(mod, name, new[id(v)])


class PipelineBackbone(nn.Module):
    """A pipeline's UNet / transformer behind the dmdx backbone contract.

    ``config`` rebuilds it: the pipeline folder, the dtype of the weights, the null conditioning file (else the
    empty prompt is encoded here), LoRA (``frozen_base``: a LoRA whose base is re-read from the pipeline folder and
    is not state) and gradient checkpointing.  Only the wrapped model's weights are state; the null conditioning is
    a non-persistent buffer.  ``weights=False`` (not config) builds the network from the folder's configs alone,
    uninitialised, with zero null conditioning of the configs' shapes: ``dmdx plan`` does so under a
    ``FakeTensorMode``.
    """

    family: ClassVar[str] = ""

    def __init__(self, path: str, dtype: str = "float32", cond_file: str | None = None, lora: dict | None = None,
                 grad_checkpointing: bool = False, shape: list[int] | None = None, guidance: float = 3.5,
                 frozen_base: bool = False, weights: bool = True):
        super().__init__()
        path = str(check_folder(path, weights))
        self.component, family = denoiser_component(Path(path))
        if family != self.family:
            raise ValueError(f"{path} holds a {family} model, not {self.family}")
        self.config = dict(path=path, dtype=dtype, cond_file=cond_file, lora=lora,
                           grad_checkpointing=grad_checkpointing, shape=shape, guidance=guidance)
        if frozen_base:
            self.config["frozen_base"] = True
        self.weights = weights
        self.model = load_component(Path(path), self.component, DTYPES[dtype], weights=weights)
        self.shape = tuple(shape) if shape else default_shape(Path(path))
        self._set_null(cond_file, lambda: encode_prompts(Path(path), [], self.shape)[1],
                       lambda: cond_shapes(Path(path)))
        self._setup()
        self._finish(lora, grad_checkpointing)

    def _set_null(self, cond_file, encode, shapes) -> None:
        """The null conditioning: from the run's prompts file, encoded here, or zeros of the configs' shapes."""
        if not self.weights:
            null = {k: torch.zeros(1, *shape) for k, shape in shapes().items()}
        elif cond_file and Path(cond_file).is_file():
            _, null = load_cond(Path(cond_file))
        else:
            null = encode()
        self._null_keys = list(null)
        for k, v in null.items():
            self.register_buffer(f"null_{k}", v, persistent=False)

    def _finish(self, lora: dict | None, grad_checkpointing: bool) -> None:
        self.copy_options: dict = {}  # LoRA / checkpointing / sharing applied when a trainable copy is made
        self.shared_base: SharedBase | None = None
        self._base_slots: list[tuple[nn.Module, str]] = []  # a LoRA copy's slots of the shared base tensors
        self._float32_compute: _Float32Compute | None = None  # inside ``float32``: how the block computes
        if lora:
            add_lora(self.model, **lora, base="folder" if self.config.get("frozen_base") else "state")
        if grad_checkpointing:
            self.model.enable_gradient_checkpointing(self._checkpoint)

    def _checkpoint(self, module: nn.Module, *args):
        """diffusers' gradient checkpointing (non-reentrant), whose recomputation in the backward sees the base tensors
        the forward saw: a ``float32`` block (ADM's steps on a shared base) may have ended before the backward."""
        compute = self._float32_compute

        def contexts():
            return contextlib.nullcontext(), (compute.hooks(save=False, within=module) if compute
                                              else contextlib.nullcontext())

        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

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

    # -- trainable copies, maybe on a shared base --------------------------------------------------------------
    def share_base(self) -> None:
        """Make this (frozen teacher) backbone the base of its LoRA copies: a deep copy made while
        ``copy_options`` names a LoRA holds the teacher's weight tensors instead of copies (``SharedBase``)."""
        if self.shared_base is None:
            self.shared_base = SharedBase()
            self.shared_base.members.add(self)

    def _shares_on_copy(self) -> bool:
        return self.shared_base is not None and bool(self.config["lora"] or self.copy_options.get("lora"))

    def __deepcopy__(self, memo):
        shared = self.shared_base
        if self._shares_on_copy():
            for mod, name in self.base_slots():
                t = _slot(mod, name)
                memo.setdefault(id(t), t)
            memo[id(shared)] = shared
        elif shared is not None:
            memo[id(shared)] = None  # a full copy (no LoRA) owns its weights
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        if new.shared_base is not None:
            new.shared_base.members.add(new)
        return new

    def base_slots(self) -> list[tuple[nn.Module, str]]:
        """``(module, name)`` of every frozen base tensor: a shared-base LoRA copy's plain attributes, else every
        parameter and buffer of the model."""
        if self._base_slots:
            return self._base_slots
        return [(mod, name) for mod in self.model.modules()
                for name, v in [*mod._parameters.items(), *mod._buffers.items()] if v is not None]

    def saved_config(self) -> dict:
        """``config`` as ``model.json`` holds it: a LoRA copy on a shared base is rebuilt from the pipeline folder
        (a float32 base, not state) and its LoRA weights."""
        if not self._base_slots:
            return dict(self.config)
        return {**self.config, "dtype": "float32", "frozen_base": True}

    def make_trainable(self, lora: dict | None = None, grad_checkpointing: bool | None = None) -> None:
        """Turn a (deep-copied) teacher backbone into a trainable one, with LoRA if asked: float32 weights, or, on a
        shared base, a float32 LoRA on the teacher's own (frozen) tensors."""
        opts = {**self.copy_options}
        lora = lora if lora is not None else opts.get("lora")
        gc = grad_checkpointing if grad_checkpointing is not None else opts.get("grad_checkpointing", False)
        if self.shared_base is not None:
            assert lora and not self.config["lora"], "only a LoRA copy shares its base"
            self._base_slots = add_lora(self.model, **lora, base="shared")
            self.config["lora"] = dict(lora)
        else:
            if self.config["dtype"] != "float32":
                if self.weights:  # the float32 weights from the folder, exact (not the teacher's rounded ones)
                    full = load_component(Path(self.config["path"]), self.component, torch.float32)
                    self.model.load_state_dict(full.state_dict(), assign=True)
                    del full
                else:
                    cast_module(self.model, torch.float32)
                self.config["dtype"] = "float32"
            if lora and not self.config["lora"]:
                add_lora(self.model, **lora)
                self.config["lora"] = dict(lora)
        if gc:
            self.model.enable_gradient_checkpointing(self._checkpoint)
            self.config["grad_checkpointing"] = True
        self.copy_options = {}

    @contextlib.contextmanager
    def float32(self):
        """Inside the block the model computes in float32 whatever its weights' dtype (ADM's ODE steps and critic).

        A float32 copy of a lower-precision tensor (exact: every bf16 / fp16 value is a float32 value) exists only
        while the module that owns it runs (``_Float32Compute``): the block holds the memory of one layer in float32,
        not of a float32 model, and a graph built inside saves its layers' copies as the base tensors they came from.
        On a shared base every network of the group computes in float32 inside the block.
        """
        members = list(self.shared_base.members) if self.shared_base is not None else [self]
        compute = _Float32Compute(members)
        dtypes = [(bb, bb.config["dtype"]) for bb in members]
        for bb in members:
            bb.config["dtype"] = "float32"
            bb._float32_compute = compute  # gradient checkpointing recomputes in float32 too (``_checkpoint``)
        try:
            with compute.hooks(save=True):
                yield
        finally:
            for bb, dtype in dtypes:
                bb.config["dtype"] = dtype
                bb._float32_compute = None

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


class PixelBackbone(nn.Module):
    """ADP's pixel discriminator backbone on latents: VAE decode, then a frozen ``transformers`` vision encoder
    (DINOv2 or any model with ``hidden_states``); features are the patch tokens of a few layers as maps."""

    def __init__(self, pipeline: Path, encoder: str | Path, size: int = 224, layers: int = 4):
        super().__init__()
        from transformers import AutoModel  # optional, heavy: imported on use

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
