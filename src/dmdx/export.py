"""``dmdx export``: a distilled diffusers-teacher student as a diffusers pipeline folder or as LoRA weights.

Scheduler choice (stock diffusers schedulers, so that ``DiffusionPipeline.from_pretrained(OUT)`` needs no dmdx):

- VP teachers (SD1.5/SD2/SDXL UNets): ``LCMScheduler``.  Its multistep rule *is* the student sampler: predict x0
  at timestep t_k, re-noise it with fresh noise to t_{k+1}.  ``timestep_scaling`` is set to 1e6 so that its
  consistency boundary scalings are c_skip ~ 1e-13, c_out ~ 1 (plain x0), and ``original_inference_steps`` to the
  student's step count, so that the default call with ``num_inference_steps = len(times)`` picks the student's
  times when they are evenly spaced (DMD2's 999/749/499/249); otherwise pass ``timesteps=`` (in dmdx_student.json).
- Flow teachers (SD3, Flux): ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``: x0 = x - sigma v,
  then x = (1 - sigma_next) x0 + sigma_next noise, the student sampler again; pass ``sigmas=`` (the unshifted
  student times, in dmdx_student.json; the scheduler applies the teacher's shift).

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

from .models import load_model, read_info
from .teachers import diffusers as dfs

FORMATS = ("diffusers", "lora")


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


def sampling_args(info) -> dict:
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


def export_run(run: str | Path, out: str | Path, fmt: Literal["diffusers", "lora"] = "diffusers") -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    run, out = Path(run), Path(out)
    from .teachers.adapter import adapter_for_run

    adapter = adapter_for_run(run)  # teacher kinds behind the adapter interface (video pipelines)
    if adapter is not None:
        return adapter.export(run, out, fmt)
    info = read_info(run)
    if info.kind != "student" or "pipeline" not in info.extra:
        raise ValueError(f"{run} is not a student distilled from a diffusers pipeline; nothing to export")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose another --out")
    pipe_dir = Path(info.extra["pipeline"])
    dfs.check_folder(pipe_dir)
    bb = load_model(run).denoiser.backbone
    comp = bb.component
    if fmt == "lora":
        if not bb.config.get("lora"):
            raise ValueError(f"{run}: the student was trained without LoRA (real.student_lora.rank = 0); use "
                             "--format diffusers")
        from diffusers import DiffusionPipeline

        index = dfs.model_index(pipe_dir)
        import diffusers

        cls = getattr(diffusers, index["_class_name"], DiffusionPipeline)
        out.mkdir(parents=True, exist_ok=True)
        cls.save_lora_weights(str(out), **{f"{comp}_lora_layers": dfs.lora_state_dict(bb.model)})
        (out / "dmdx_student.json").write_text(json.dumps(sampling_args(info), indent=2) + "\n")
        return out
    shutil.copytree(pipe_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(comp, "scheduler"))
    _merged_model(bb).save_pretrained(str(out / comp))
    sched_cfg = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    if info.extra.get("family") == "unet":
        sched = LCMScheduler.from_config(sched_cfg, timestep_scaling=1e6, original_inference_steps=len(info.times),
                                         clip_sample=False, thresholding=False)
    else:
        sched = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg, stochastic_sampling=True)
    sched.save_pretrained(str(out / "scheduler"))
    index = dfs.model_index(out)
    index["scheduler"] = ["diffusers", type(sched).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "dmdx_student.json").write_text(json.dumps(sampling_args(info), indent=2) + "\n")
    return out
