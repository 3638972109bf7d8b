"""``dmdx export``: a distilled diffusers-teacher student as a diffusers pipeline folder, diffusers-format LoRA
weights, or one kohya-style LoRA file (ComfyUI and most UIs).

Scheduler choice (stock diffusers schedulers, so that ``DiffusionPipeline.from_pretrained(OUT)`` needs no dmdx):

- VP teachers (SD1.5/SD2/SDXL UNets): ``LCMScheduler``.  Its multistep rule *is* the student sampler: predict x0
  at timestep t_k, re-noise it with fresh noise to t_{k+1}.  ``timestep_scaling`` is set to 1e6 so that its
  consistency boundary scalings are c_skip ~ 1e-13, c_out ~ 1 (plain x0), and ``original_inference_steps`` to the
  student's step count, so that the default call with ``num_inference_steps = len(times)`` picks the student's
  times when they are evenly spaced (DMD2's 999/749/499/249); otherwise pass ``timesteps=`` (in dmdx_student.json).
- Flow teachers (SD3, Flux): ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``: x0 = x - sigma v,
  then x = (1 - sigma_next) x0 + sigma_next noise, the student sampler again; pass ``sigmas=`` (the unshifted
  student times, in dmdx_student.json; the scheduler applies the teacher's shift).

A LoRA export ships that scheduler too (``scheduler_config.json`` in the LoRA folder): the base pipeline's own
scheduler (PNDM for SD1.5, Euler for SDXL/SD3/Flux) either refuses ``timesteps=`` or samples the student with a
deterministic ODE step it was not trained for.  :func:`usage` writes the lines that load and call each export.

Call the pipeline without CFG: ``guidance_scale=1.0`` (SD/SDXL/SD3); Flux: ``guidance_scale`` = the guidance
embedding the student was trained with.  The start noise: diffusers draws unit noise, dmdx starts VP students
from ``sigma(1) * noise`` (0.998 noise for SD schedules); pass ``latents=`` for bit-level agreement.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch

from .models import ModelInfo, load_model, read_info
from .teachers import diffusers as dfs

FORMATS = ("diffusers", "lora", "comfyui")
STUDENT_JSON = "dmdx_student.json"


def _merged_model(backbone) -> torch.nn.Module:
    """The student's diffusers model as a plain (LoRA merged) model, float32."""
    model = backbone.model
    fresh = dfs.load_component(Path(backbone.config["path"]), backbone.component, torch.float32)
    if not backbone.config.get("lora"):
        fresh.load_state_dict(model.state_dict())
        return fresh
    from peft.tuners.tuners_utils import BaseTunerLayer

    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict(state)
    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.unmerge()
    return fresh


def sampling_args(info: ModelInfo) -> dict:
    """What to pass to the exported pipeline's ``__call__`` to run the student's steps at its times."""
    fam = info.extra.get("family")
    from .teachers.video import FAMILIES as VIDEO_FAMILIES

    if fam in VIDEO_FAMILIES:  # CogVideoX / Wan students: dmdx.teachers.video_export
        from .teachers.video_export import sampling_args as video_sampling_args

        return video_sampling_args(info)
    times = info.times or [1.0]
    if fam == "unet":
        T = info.schedule.get("num_train_timesteps", 1000) - 1
        return {"num_inference_steps": len(times), "timesteps": [int(round(t * T)) for t in times],
                "guidance_scale": 1.0}
    g = info.backbone["config"].get("guidance", 3.5) if fam == "flux" else 1.0
    return {"num_inference_steps": len(times), "sigmas": [float(t) for t in times], "guidance_scale": g}


def student_scheduler(info: ModelInfo, pipe_dir: Path):
    """The stock diffusers scheduler whose step is the student's sampler (module docstring), from the teacher's
    scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    sched_cfg = json.loads((Path(pipe_dir) / "scheduler" / "scheduler_config.json").read_text())
    if info.extra.get("family") == "unet":
        return LCMScheduler.from_config(sched_cfg, timestep_scaling=1e6, original_inference_steps=len(info.times),
                                        clip_sample=False, thresholding=False)
    return FlowMatchEulerDiscreteScheduler.from_config(sched_cfg, stochastic_sampling=True)


def usage(info: ModelInfo, fmt: str, out: str | Path, prompt: str = "a photo of a cat") -> str:
    """Python lines that load an export and sample the student with its own sampler (what ``dmdx export`` prints
    and docs/real-models.md shows; tests run them as written)."""
    out = str(out)
    sched = "LCMScheduler" if info.extra.get("family") == "unet" else "FlowMatchEulerDiscreteScheduler"
    call = f'image = pipe({prompt!r}, generator=torch.Generator().manual_seed(0), **args).images[0]'
    if fmt == "diffusers":
        return "\n".join([
            "import json, torch",
            "from diffusers import DiffusionPipeline",
            f"pipe = DiffusionPipeline.from_pretrained({out!r})",
            f"args = json.load(open({str(Path(out) / STUDENT_JSON)!r}))",
            call])
    folder = out if fmt == "lora" else str(Path(out).with_suffix(""))
    base = info.extra["pipeline"]
    return "\n".join([
        "import json, torch",
        f"from diffusers import DiffusionPipeline, {sched}",
        f"pipe = DiffusionPipeline.from_pretrained({base!r})",
        f"pipe.load_lora_weights({out!r})",
        f"pipe.scheduler = {sched}.from_pretrained({folder!r})",
        f"args = json.load(open({str(Path(folder) / STUDENT_JSON)!r}))",
        call])


def _write_side_files(info: ModelInfo, pipe_dir: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    student_scheduler(info, pipe_dir).save_pretrained(str(folder))  # scheduler_config.json
    (folder / STUDENT_JSON).write_text(json.dumps(sampling_args(info), indent=2) + "\n")


# -- kohya / ComfyUI -------------------------------------------------------------------------------------------
def _kohya_back(key: str) -> str:
    """The module that diffusers' converted kohya key names (it still writes the old attention-processor names
    ``attn1.processor.to_q_lora`` / ``to_out_lora``, which its loader renames once more)."""
    key = key.removesuffix(".lora.down.weight").removesuffix("_lora.down.weight").replace(".processor.", ".")
    return key + ".0" if key.endswith(".to_out") else key


def kohya_state_dict(diffusers_lora: dict[str, torch.Tensor], alpha: float, prefix: str = "lora_unet_"
                     ) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA weights (``<module>.lora.down.weight`` / ``.lora.up.weight``, as
    :func:`dmdx.teachers.diffusers.lora_state_dict` gives them) -> kohya keys (``lora_unet_<module with _>``
    ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).

    Every name is checked against diffusers' own kohya -> diffusers key converter, so what is written loads back
    onto the same modules (``pipe.load_lora_weights(FILE)``); a module name that would not round-trip is refused.
    """
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key

    out: dict[str, torch.Tensor] = {}
    for key, w in diffusers_lora.items():
        if not key.endswith(".lora.down.weight"):
            continue
        module = key.removesuffix(".lora.down.weight")
        name = prefix + module.replace(".", "_")
        if _kohya_back(_convert_unet_lora_key(name + ".lora_down.weight")) != module:
            raise ValueError(f"LoRA module {module!r} has no kohya name that diffusers maps back to it; "
                             "train with other real.student_lora.targets or use --format lora")
        out[name + ".lora_down.weight"] = w.detach().float().contiguous()
        out[name + ".lora_up.weight"] = diffusers_lora[module + ".lora.up.weight"].detach().float().contiguous()
        out[name + ".alpha"] = torch.tensor(float(alpha))
    if not out:
        raise ValueError("no LoRA weights to export")
    return out


def export_run(run: str | Path, out: str | Path, fmt: Literal["diffusers", "lora", "comfyui"] = "diffusers") -> Path:
    """``dmdx export``: the student of ``run`` in ``fmt``, written by the adapter of the teacher it was distilled
    from (image pipelines: :func:`export_pipeline_student`; video pipelines: ``teachers.video_export``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    from .teachers.adapter import adapter_for

    read_info(Path(run))  # a clear error for a folder that is not a dmdx run
    return adapter_for(run).export(Path(run), Path(out), fmt)


def export_pipeline_student(run: Path, out: Path, fmt: str = "diffusers") -> Path:
    """An SD / SDXL / SD3 / Flux student as a pipeline folder (``diffusers``), LoRA weights (``lora``) or one
    kohya-style file (``comfyui``)."""
    info = read_info(run)
    if info.kind != "student" or "pipeline" not in info.extra:
        raise ValueError(f"{run} is not a student distilled from a diffusers pipeline; nothing to export")
    if fmt == "comfyui":
        if out.suffix != ".safetensors":
            raise ValueError(f"--format comfyui writes one .safetensors file; got --out {out}")
        if out.exists() or out.with_suffix("").exists():
            raise ValueError(f"{out} (or the folder {out.with_suffix('')}) exists; choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose another --out")
    pipe_dir = Path(info.extra["pipeline"])
    dfs.check_folder(pipe_dir)
    if fmt == "comfyui" and info.extra.get("family") != "unet":
        raise ValueError(f"--format comfyui supports SD1.5/SD2/SDXL UNet students; {info.extra.get('family')} "
                         "students: use --format lora (diffusers 0.42 has no kohya converter for SD3 and needs the "
                         "original BFL layout for Flux, which dmdx does not write)")
    bb = load_model(run).denoiser.backbone
    comp = bb.component
    if fmt in ("lora", "comfyui"):
        lora = bb.config.get("lora")
        if not lora:
            raise ValueError(f"{run}: the student was trained without LoRA (real.student_lora.rank = 0); use "
                             "--format diffusers")
        import diffusers

        index = dfs.model_index(pipe_dir)
        cls = getattr(diffusers, index["_class_name"], diffusers.DiffusionPipeline)
        if fmt == "lora":
            out.mkdir(parents=True, exist_ok=True)
            cls.save_lora_weights(str(out), **{f"{comp}_lora_layers": dfs.lora_state_dict(bb.model)})
            _write_side_files(info, pipe_dir, out)
            return out
        from safetensors.torch import save_file

        state = kohya_state_dict(dfs.lora_state_dict(bb.model), lora["alpha"])
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora["rank"]),
                "ss_network_alpha": str(lora["alpha"]), "dmdx_student": json.dumps(sampling_args(info))}
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out), metadata=meta)
        _write_side_files(info, pipe_dir, out.with_suffix(""))  # the scheduler for diffusers users
        return out
    shutil.copytree(pipe_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(comp, "scheduler"))
    _merged_model(bb).save_pretrained(str(out / comp))
    sched = student_scheduler(info, pipe_dir)
    sched.save_pretrained(str(out / "scheduler"))
    index = dfs.model_index(out)
    index["scheduler"] = ["diffusers", type(sched).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / STUDENT_JSON).write_text(json.dumps(sampling_args(info), indent=2) + "\n")
    return out
