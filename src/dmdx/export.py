"""What every diffusers export of a student shares (image kinds: :mod:`dmdx.teachers.image.export`; video kinds:
:mod:`dmdx.teachers.video.export`): the stock schedulers whose step is the student's sampler, the call that runs it
(:class:`StudentCall`), the lines a user runs (:func:`usage`), the model card, LoRA files checked by loading them
back, kohya-style files, and the pipeline folder.

The student sampler as a stock scheduler: each step predicts x0 and re-noises it with fresh noise to the next time.
VP teachers: ``LCMScheduler`` with ``timestep_scaling`` 1e6, so that its consistency boundary scalings are
c_skip ~ 1e-13, c_out ~ 1 (plain x0), and ``original_inference_steps`` the smallest value for which the scheduler's
own ``set_timesteps(len(times))`` gives the student's timesteps (:func:`lcm_scheduler`).  Flow teachers:
``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``, with a shift and ``shift_terminal`` solved so that its
own ``set_timesteps(n)`` gives the student's sigmas where possible (:func:`flow_scheduler`).

A LoRA export ships that scheduler too (``scheduler_config.json`` in the LoRA folder): the base pipeline's own
scheduler either refuses the student's timesteps or samples it with a deterministic ODE step it was not trained for.
The LoRA file holds peft-format keys and the adapter's ``LoraConfig`` as diffusers' adapter metadata, so
``load_lora_weights`` rebuilds the student's rank, alpha and targets; every LoRA file is read back through
diffusers' own loader at export time and refused if a module is missing or scaled differently.

The start noise: diffusers draws unit noise, dmdx starts VP students from ``sigma(1) * noise`` (0.998 noise for SD
schedules); pass ``latents=`` for bit-level agreement.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .models import ModelInfo
from .nets.pipeline import lora_config, lora_state_dict
from .pipelines.folder import model_index
from .schedules import make_schedule

FORMATS = ("diffusers", "lora", "comfyui")
STUDENT_JSON = "dmdx_student.json"
CARD = "README.md"


@dataclass
class StudentCall:
    """How a stock pipeline runs the student: its scheduler, and ``pipe(prompt, **args)``."""

    family: str  # unet, sd3, flux, cogvideox, wan
    scheduler: Any  # a diffusers scheduler whose step is the student's sampler
    args: dict  # __call__ arguments that reproduce the student
    exact: bool  # num_inference_steps alone (no timesteps= / sigmas=) gives the student's steps
    plain: dict = field(default_factory=dict)  # the fewest of ``args`` that give the student on the pipeline export
    set_timesteps_sigmas: list[float] | None = None  # Wan students off the scheduler's grid (see teachers.video.export)
    global_noise: bool = False  # the pipeline re-noises from the global RNG (SD3, Flux, Wan: multi-step students)

    @property
    def video(self) -> bool:
        return self.family in ("cogvideox", "wan")

    def shortest(self, fmt: str) -> dict:
        """The fewest call arguments that give the student: the pipeline export carries more in its config than
        the base pipeline with a LoRA (a UNet export has CFG switched off)."""
        if fmt != "diffusers" and self.family == "unet":
            return {**self.plain, "guidance_scale": 1.0}
        return dict(self.plain)

    def meta(self, info: ModelInfo) -> dict:
        """``dmdx_student.json``."""
        out = {"call": self.args, "times": info.times or [1.0], "exact": self.exact}
        if self.set_timesteps_sigmas is not None:
            out["set_timesteps_sigmas"] = self.set_timesteps_sigmas
        return out


# -- the student's sampler as a stock scheduler ----------------------------------------------------------------
def lcm_scheduler(config: dict, timesteps: list[int]):
    """(``LCMScheduler`` with plain-x0 boundary scalings, exact): ``original_inference_steps`` is the smallest o for
    which the scheduler's own ``set_timesteps(len(timesteps))`` returns ``timesteps``; k = len(timesteps) if none.

    LCM's grid: ``(1..o) * (T // o) - 1`` reversed, then the entries at ``floor(linspace(0, o, k))``."""
    from diffusers import LCMScheduler  # optional, heavy: imported on use

    n_train, k = int(config.get("num_train_timesteps", 1000)), len(timesteps)

    def grid(o: int) -> list[int]:
        origin = (np.arange(1, o + 1) * (n_train // o) - 1)[::-1]
        return origin[np.floor(np.linspace(0, o, k, endpoint=False)).astype(np.int64)].tolist()

    o = next((o for o in range(k, n_train + 1) if grid(o) == list(timesteps)), k)
    keys = inspect.signature(LCMScheduler.__init__).parameters  # the teacher's PNDM / DDIM keys LCM does not take
    sched = LCMScheduler.from_config({key: v for key, v in config.items() if key in keys}, timestep_scaling=1e6,
                                     original_inference_steps=o, clip_sample=False, thresholding=False)
    sched.set_timesteps(k)  # checked with the scheduler's own code
    return sched, sched.timesteps.tolist() == list(timesteps)


def flow_scheduler(sigmas: list[float], teacher_shift: float, num_train_timesteps: int = 1000):
    """A ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` whose plain ``set_timesteps(n)`` gives the
    student's n ``sigmas``, or None.

    That scheduler's sigmas are ``u_k = linspace(1, f_r(1/N), n)`` shifted, ``f_r(u) = r u / (1 + (r - 1) u)``, then
    stretched to end at ``shift_terminal``: ``1 - c (1 - f_r(u_k))``.  A student whose sigmas are ``f_q`` of times
    uniform from 1 (``t_k = 1 - k d``: the recipe's 1, .75, .5, .25 at the teacher's shift q, or any uniform
    sigmas: q = 1) lies on that family: matching ``1 - f_q(t_k)`` term by term gives ``c = (r - 1) / (q - 1)`` and
    ``A r^2 + (A (N - 1) - B) r + B = 0`` with ``A = d (q - 1) (n - 1)``, ``B = q (N - 1)``.  The solution is
    checked against the scheduler's own ``set_timesteps`` (to 1e-6)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # optional, heavy: imported on use

    n, N = len(sigmas), num_train_timesteps
    if n == 1:
        cands = [FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=1.0, stochastic_sampling=True)]
    else:
        cands = []
        for q in dict.fromkeys([1.0, float(teacher_shift)]):
            u = [x / (q - (q - 1) * x) for x in sigmas]  # f_q^-1: the times the sigmas are shifted from
            d = (1 - u[-1]) / (n - 1)
            if abs(u[0] - 1) > 1e-9 or any(abs(u[k] - (1 - k * d)) > 1e-9 for k in range(n)):
                continue
            A, B = d * (q - 1) * (n - 1), q * (N - 1)
            b = A * (N - 1) - B
            r = 2 * B / (-b + math.sqrt(b * b - 4 * A * B))  # the smaller root (1 when q = 1)
            cands.append(FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=r, shift_terminal=sigmas[-1],
                                                         stochastic_sampling=True))
    for sched in cands:
        sched.set_timesteps(n)
        if np.allclose(sched.sigmas[:n].double().numpy(), sigmas, rtol=0, atol=1e-6):
            return sched
    return None


def student_sigmas(info: ModelInfo) -> list[float]:
    """The student's sigmas (flow schedules): its times through the teacher's shift."""
    sched = make_schedule(info.schedule)
    return [float(sched.sigma(torch.tensor(t, dtype=torch.float64))) for t in info.times or [1.0]]


def student_timesteps(info: ModelInfo) -> list[int]:
    """The student's integer timesteps (VP schedules: times are snapped to ``t * (T - 1)`` at build time)."""
    T = info.schedule.get("num_train_timesteps", 1000) - 1
    return [int(round(t * T)) for t in info.times or [1.0]]


# -- what a user runs ------------------------------------------------------------------------------------------
def usage(info: ModelInfo, fmt: str, out: str | Path, call: StudentCall, prompt: str = "a photo of a cat") -> str:
    """Python lines that load an export and sample the student with its own sampler (what ``dmdx export`` prints,
    the model card holds and docs show; tests run them as written)."""
    out = str(out)
    sched = type(call.scheduler).__name__
    lines = ["import torch", "from diffusers import DiffusionPipeline" + ("" if fmt == "diffusers" else f", {sched}")]
    if fmt == "diffusers":
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({out!r})")
    else:
        folder = str(Path(out).with_suffix("")) if fmt == "comfyui" else out
        lines += [f"pipe = DiffusionPipeline.from_pretrained({info.extra['pipeline']!r})",
                  f"pipe.load_lora_weights({out!r})",
                  f"pipe.scheduler = {sched}.from_pretrained({folder!r})"]
    if call.set_timesteps_sigmas is not None:  # WanPipeline passes only num_inference_steps to set_timesteps
        lines += [f"sigmas = {call.set_timesteps_sigmas!r}",
                  "set_timesteps = pipe.scheduler.set_timesteps",
                  "pipe.scheduler.set_timesteps = lambda n=None, device=None, **kw: set_timesteps(sigmas=sigmas, "
                  "device=device)"]
    lines.append(f"args = {call.args!r}")
    if call.global_noise:
        lines.append("torch.manual_seed(0)  # this pipeline's scheduler re-noises from the global RNG")
    what = "video = pipe({!r}, generator=torch.Generator().manual_seed(0), **args).frames[0]" if call.video else \
        "image = pipe({!r}, generator=torch.Generator().manual_seed(0), **args).images[0]"
    lines.append(what.format(prompt))
    return "\n".join(lines)


def call_notes(call: StudentCall, fmt: str) -> list[str]:
    """What the call needs and why (model card)."""
    k = call.args["num_inference_steps"]
    steps = ("- `num_inference_steps` must be given: its default is an argument of `__call__` that no config can "
             "change" + (f", and this scheduler refuses more steps than the student's {k}." if call.family in
                          ("unet", "cogvideox") else "."))
    if not call.exact and "timesteps" in call.args:
        steps += (f" `num_inference_steps={k}` alone would run the scheduler's own grid "
                  f"{call.scheduler.timesteps.tolist()}, not the student's `timesteps` (LCM warns that those are "
                  "off its grid: they are the student's).")
    if not call.exact and "sigmas" in call.args:
        steps += " The student's times are not the scheduler's own grid: pass `sigmas=` (unshifted times)."
    cfg = {"unet": "- Classifier-free guidance is off in this folder's UNet config (an all-zero guidance "
                   "embedding, `time_cond_proj_dim`, as LCM checkpoints carry): `guidance_scale` and "
                   "`negative_prompt` change nothing." if fmt == "diffusers" else
                   "- `guidance_scale=1` is needed: the base UNet turns classifier-free guidance on for any scale "
                   "above 1 (default 7.5).",
           "flux": f"- `guidance_scale` is the guidance embedding the student was trained with "
                   f"({call.args['guidance_scale']}); Flux has no real classifier-free guidance to turn off.",
           "sd3": "- `guidance_scale=1` is needed: the SD3 pipeline turns classifier-free guidance on for any scale "
                  "above 1 (default 7) and no config switches it off."}.get(
        call.family, "- `guidance_scale=1` is needed: the pipeline turns classifier-free guidance on for any scale "
                     "above 1 and no config switches it off. `num_frames`, `height` and `width` are the student's "
                     "size; the pipeline's defaults are the model's own.")
    out = [cfg, steps]
    if call.set_timesteps_sigmas is not None:
        out.append("- This scheduler's own `set_timesteps(n)` does not give the student's times, and the pipeline "
                   "passes it nothing else: the code points it at them.")
    return out


def comfyui_notes(info: ModelInfo, call: StudentCall) -> str:
    return (f"ComfyUI: LoraLoader on the base checkpoint, KSampler sampler 'lcm', steps "
            f"{call.args['num_inference_steps']}, cfg 1.0 (the student's timesteps {student_timesteps(info)}; not "
            "verified in ComfyUI itself)")


def model_card(info: ModelInfo, fmt: str, out: Path, call: StudentCall) -> str:
    """README.md of an export: what it is and the exact call."""
    fam = info.extra.get("family")
    times = info.times or [1.0]
    lora = info.backbone["config"].get("lora")
    kind = {"diffusers": "a diffusers pipeline folder (the teacher's pipeline with the student's weights, LoRA "
                         "merged, and a scheduler that runs the student's sampler)",
            "lora": "LoRA weights for the teacher's pipeline, with the student's scheduler",
            "comfyui": f"the student's scheduler and call for the kohya-style LoRA file `{Path(out).name}`"}[fmt]
    tags = ["dmdx", "distillation", "text-to-video" if call.video else "text-to-image"]
    if fmt != "diffusers":
        tags.append("lora")
    lines = ["---", "library_name: diffusers", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {info.extra.get('method', 'dmdx')} student, {len(times)} step{'s' if len(times) > 1 else ''}", "",
             f"Distilled with dmdx ({info.extra.get('method', '?')}) from the diffusers "
             f"pipeline `{info.extra['pipeline']}` ({fam}). This is {kind}.", "",
             f"- student times (t in [0, 1], noisiest first): {[round(t, 4) for t in times]}",
             f"- sampler: {type(call.scheduler).__name__}; each step predicts x0 and re-noises it with fresh noise "
             "to the next time"]
    if lora:
        lines.append(f"- LoRA: rank {lora['rank']}, alpha {lora['alpha']}, targets {', '.join(lora['targets'])}")
    lines += ["", "## Use", "", "```python", usage(info, fmt, out, call), "```", "",
              "`args` is also in `dmdx_student.json` (`call`). The shortest call that is the student"
              + (" (with the scheduler pointed at its times as above)" if call.set_timesteps_sigmas else "") + ": "
              f"`pipe(prompt{''.join(f', {k}={v!r}' for k, v in call.shortest(fmt).items())})`.",
              "", *call_notes(call, fmt)]
    if fmt != "diffusers":
        lines += ["", "Swap the scheduler in as above: the base pipeline's own scheduler either refuses the student's "
                  "timesteps or integrates an ODE the student was not trained for."]
    if fmt == "comfyui":
        lines += ["", comfyui_notes(info, call) + "."]
    lines += ["", "Bit-level agreement with `dmdx sample`: pass `latents=` (dmdx starts from sigma(1) times unit "
              "noise, diffusers from unit noise" + ("" if not call.global_noise else
                                                   "; this pipeline re-noises from the global RNG") + ")."]
    return "\n".join(lines) + "\n"


def write_card_and_call(info: ModelInfo, fmt: str, out: Path, folder: Path, call: StudentCall,
                        scheduler: bool = True) -> None:
    """The side files of an export in ``folder``: model card, ``dmdx_student.json`` and (LoRA exports) the
    student's scheduler."""
    folder.mkdir(parents=True, exist_ok=True)
    if scheduler:
        call.scheduler.save_pretrained(str(folder))  # scheduler_config.json
    (folder / STUDENT_JSON).write_text(json.dumps(call.meta(info), indent=2) + "\n")
    (folder / CARD).write_text(model_card(info, fmt, out, call))


# -- LoRA files ------------------------------------------------------------------------------------------------
def save_lora(pipe_dir: Path, comp: str, model: torch.nn.Module, out: Path) -> Path:
    """diffusers-format LoRA weights of ``model`` (peft keys + its LoraConfig as adapter metadata) in ``out``."""
    import diffusers  # optional, heavy: imported on use

    cls = getattr(diffusers, model_index(pipe_dir)["_class_name"])
    out.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(str(out), **{f"{comp}_lora_layers": lora_state_dict(model),
                                       f"{comp}_lora_adapter_metadata": lora_config(model)})
    return out


def _lora_layers(model: torch.nn.Module) -> dict[str, tuple[float, tuple, tuple]]:
    """{module: (scale, lora_A shape, lora_B shape)} of a model's single LoRA adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # optional, heavy: imported on use

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer) and mod.lora_A:
            (a_name, a), = mod.lora_A.items()
            out[name] = (float(mod.scaling[a_name]), tuple(a.weight.shape), tuple(mod.lora_B[a_name].weight.shape))
    return out


def check_lora_file(pipe_dir: Path, comp: str, lora: str | Path, student: torch.nn.Module) -> None:
    """Load ``lora`` the way a user does (the pipeline class's ``load_lora_weights``) onto a weightless (meta
    device) copy of the base model and compare every LoRA module, its scale (alpha / rank) and shapes with the
    student's; a ``ValueError`` names what differs."""
    import diffusers  # optional, heavy: imported on use

    index = model_index(pipe_dir)
    mcls, pcls = getattr(diffusers, index[comp][-1]), getattr(diffusers, index["_class_name"])
    with torch.device("meta"):
        base = mcls.from_config(mcls.load_config(str(Path(pipe_dir) / comp)))
    params = inspect.signature(pcls.__init__).parameters
    kw = {n: None for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty}
    if "requires_safety_checker" in params:
        kw["requires_safety_checker"] = False
    kw[comp] = base
    logged: list[str] = []  # diffusers' warnings while loading, kept from the console (a text encoder with no
    handler = logging.Handler(logging.WARNING)  # LoRA keys is expected here) and searched for unloaded keys
    handler.emit = lambda rec: logged.append(rec.getMessage())
    dlog = logging.getLogger("diffusers")
    handlers, dlog.handlers = dlog.handlers, [handler]
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            pcls(**kw).load_lora_weights(str(lora), low_cpu_mem_usage=True)
    finally:
        dlog.handlers = handlers
    want, got = _lora_layers(student), _lora_layers(base)
    problems = [f"not loaded: {', '.join(sorted(set(want) - set(got)))}" if set(want) - set(got) else "",
                f"not in the student: {', '.join(sorted(set(got) - set(want)))}" if set(got) - set(want) else ""]
    diff = [f"{n} (scale {got[n][0]:g} instead of {want[n][0]:g}, shapes {got[n][1:]} instead of {want[n][1:]})"
            for n in sorted(set(want) & set(got)) if got[n] != want[n]]
    if diff:
        problems.append("loaded differently: " + "; ".join(diff))
    keys = [m for m in logged + [str(w.message) for w in warned]
            if "lora" in m.lower() and any(s in m for s in ("unexpected keys", "missing keys", "additional target"))]
    problems += keys
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"diffusers {diffusers.__version__} does not load this LoRA as the student: "
                         + " | ".join(problems))


# -- kohya / ComfyUI -------------------------------------------------------------------------------------------
def _kohya_back(key: str) -> str:
    """The module that diffusers' converted kohya key names (it still writes the old attention-processor names
    ``attn1.processor.to_q_lora`` / ``to_out_lora``, which its loader renames once more)."""
    key = key.removesuffix(".lora.down.weight").removesuffix("_lora.down.weight").replace(".processor.", ".")
    return key + ".0" if key.endswith(".to_out") else key


def kohya_state_dict(lora: dict[str, torch.Tensor], alpha: float, prefix: str = "lora_unet_"
                     ) -> dict[str, torch.Tensor]:
    """peft-format LoRA weights (``<module>.lora_A.weight`` / ``.lora_B.weight``, as
    :func:`dmdx.nets.pipeline.lora_state_dict` gives them) -> kohya keys (``lora_unet_<module with _>``
    ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).

    Every name is checked against diffusers' own kohya -> diffusers key converter, so what is written loads back
    onto the same modules (``pipe.load_lora_weights(FILE)``); a module name that would not round-trip is refused.
    """
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key  # optional: on use

    other = [k for k in lora if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if other:
        raise ValueError(f"LoRA tensors with no kohya equivalent: {', '.join(other[:5])}")
    out: dict[str, torch.Tensor] = {}
    for key, w in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        name = prefix + module.replace(".", "_")
        if _kohya_back(_convert_unet_lora_key(name + ".lora_down.weight")) != module:
            raise ValueError(f"LoRA module {module!r} has no kohya name that diffusers maps back to it; "
                             "train with other real.student_lora.targets or use --format lora")
        out[name + ".lora_down.weight"] = w.detach().float().contiguous()
        out[name + ".lora_up.weight"] = lora[module + ".lora_B.weight"].detach().float().contiguous()
        out[name + ".alpha"] = torch.tensor(float(alpha))
    if not out:
        raise ValueError("no LoRA weights to export")
    return out


# -- the command -----------------------------------------------------------------------------------------------


def check_out(out: Path, fmt: str) -> None:
    if fmt == "comfyui":
        if out.suffix != ".safetensors":
            raise ValueError(f"--format comfyui writes one .safetensors file; got --out {out}")
        if out.exists() or out.with_suffix("").exists():
            raise ValueError(f"{out} (or the folder {out.with_suffix('')}) exists; choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose another --out")


def remove_export(out: Path, fmt: str) -> None:
    """Undo a refused export (its paths did not exist or were empty before: :func:`check_out`)."""
    for p in (out, out.with_suffix("")) if fmt == "comfyui" else (out,):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def export_lora(run: Path, out: Path, fmt: str, info: ModelInfo, bb, call: StudentCall) -> Path:
    """``--format lora`` (image and video students) or ``comfyui`` (UNets), checked by loading it back."""
    lora = bb.config.get("lora")
    if not lora:
        raise ValueError(f"{run}: the student was trained without LoRA (real.student_lora.rank = 0); use "
                         "--format diffusers")
    pipe_dir, comp = Path(info.extra["pipeline"]), bb.component
    try:
        if fmt == "lora":
            save_lora(pipe_dir, comp, bb.model, out)
            check_lora_file(pipe_dir, comp, out, bb.model)
            write_card_and_call(info, fmt, out, out, call)
            return out
        state = kohya_state_dict(lora_state_dict(bb.model), lora["alpha"])
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora["rank"]),
                "ss_network_alpha": str(lora["alpha"]), "dmdx_student": json.dumps(call.args)}
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out), metadata=meta)
        check_lora_file(pipe_dir, comp, out, bb.model)
        write_card_and_call(info, fmt, out, out.with_suffix(""), call)  # the scheduler for diffusers users
        return out
    except Exception:
        remove_export(out, fmt)
        raise


def write_pipeline(info: ModelInfo, pipe_dir: Path, out: Path, comp: str, model: torch.nn.Module,
                   call: StudentCall) -> Path:
    """``--format diffusers`` (image and video students): the teacher's folder with the student's ``comp`` and
    scheduler, its model card and ``dmdx_student.json``."""
    shutil.copytree(pipe_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(comp, "scheduler", CARD))
    model.save_pretrained(str(out / comp))
    call.scheduler.save_pretrained(str(out / "scheduler"))
    index = model_index(out)
    index["scheduler"] = ["diffusers", type(call.scheduler).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_card_and_call(info, "diffusers", out, out, call, scheduler=False)
    return out


