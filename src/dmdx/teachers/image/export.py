"""``dmdx export`` of image-pipeline students (SD1.5/SD2/SDXL, SD3, Flux): a pipeline folder, diffusers-format LoRA
weights, or one kohya-style LoRA file (UNets), each with its model card; how a stock pipeline runs the student.

Scheduler choice (stock diffusers schedulers, so that ``DiffusionPipeline.from_pretrained(OUT)`` needs no dmdx):

- VP teachers (SD1.5/SD2/SDXL UNets): ``LCMScheduler`` (:func:`dmdx.export.lcm_scheduler`).  Its multistep rule
  *is* the student sampler: predict x0 at timestep t_k, re-noise it with fresh noise to t_{k+1}.  The call needs only
  ``num_inference_steps`` when the scheduler's own grid holds the student's timesteps; students off LCM's grid
  (dmdx rounds 0.5 * 999 to 500, LCM's grid has 499) pass ``timesteps=``.
- Flow teachers (SD3, Flux): ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``: x0 = x - sigma v, then
  x = (1 - sigma_next) x0 + sigma_next noise, the student sampler again.  SD3: a shift and ``shift_terminal`` solved
  so that ``set_timesteps(n)`` gives the student's sigmas (:func:`dmdx.export.flow_scheduler`; the recipe's 1, .75,
  .5, .25 at any teacher shift), else the teacher's shift and ``sigmas=``.  Flux: the pipeline passes
  ``sigmas = linspace(1, 1/n, n)`` itself, which the teacher's resolution-dependent shift turns into the student's
  sigmas when its times are those (1; 1, .5; 1, .75, .5, .25), else ``sigmas=``.

Classifier-free guidance: the exported SD/SDXL UNet carries an all-zero guidance-scale embedding input
(``time_cond_proj_dim``, as LCM checkpoints do), so the stock pipelines skip CFG whatever ``guidance_scale`` says and
the added embedding is exactly zero.  SD3 pipelines have no such switch in any config: call them with
``guidance_scale=1``; Flux: ``guidance_scale`` = the guidance embedding the student was trained with.  No config can
set the number of steps (``num_inference_steps`` defaults to 50 or 28 in ``__call__``), so the call always names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...export import (StudentCall, check_out, export_lora, flow_scheduler, lcm_scheduler, student_sigmas,
                       student_timesteps, write_pipeline)
from ...models import ModelInfo, load_folder, read_info
from ...nets.pipeline import merged_model
from ...pipelines.folder import check_folder
from ...pipelines.image import default_shape, flux_mu, vae_scale_factor

GUIDANCE_EMBED_DIM = 256  # time_cond_proj_dim of the exported UNets (LCM-Dreamshaper's)


def student_call(info: ModelInfo) -> StudentCall:
    """The scheduler and call arguments that run an image-pipeline student (module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # optional, heavy: imported on use

    fam = info.extra.get("family")
    pipe_dir = Path(info.extra["pipeline"])
    sched_cfg = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    times = info.times or [1.0]
    k = len(times)
    steps: dict = {"num_inference_steps": k}
    if fam == "unet":
        ts = student_timesteps(info)
        sched, exact = lcm_scheduler(sched_cfg, ts)
        if not exact:
            steps["timesteps"] = ts
        guidance = {"guidance_scale": 1.0}  # off by config in the pipeline export (without_cfg)
        native = tuple(info.shape) == default_shape(pipe_dir)  # the pipeline's default size: the UNet's
    elif fam == "flux":
        sched = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg, stochastic_sampling=True)
        mu = flux_mu((info.shape[1] // 2) * (info.shape[2] // 2), sched_cfg)
        pipeline_sigmas = np.linspace(1.0, 1 / k, k)  # what FluxPipeline passes when sigmas= is not given
        sched.set_timesteps(sigmas=pipeline_sigmas, mu=mu if sched.config.use_dynamic_shifting else None)
        exact = bool(np.allclose(sched.sigmas[:k].double().numpy(), student_sigmas(info), rtol=0, atol=1e-6))
        if not exact:
            steps["sigmas"] = [float(t) for t in times]  # unshifted: the scheduler applies the teacher's shift
        guidance = {"guidance_scale": float(info.backbone["config"].get("guidance", 3.5))}  # the embedding
        native = info.shape[1] == info.shape[2] == 128  # FluxPipeline's default: 128 latents a side
    else:  # sd3
        sched = flow_scheduler(student_sigmas(info), float(info.schedule.get("shift", 1.0)),
                               sched_cfg.get("num_train_timesteps", 1000))
        exact = sched is not None
        if not exact:
            sched = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg, stochastic_sampling=True)
            steps["sigmas"] = [float(t) for t in times]
        guidance = {"guidance_scale": 1.0}
        native = tuple(info.shape) == default_shape(pipe_dir)
    vs = vae_scale_factor(pipe_dir)
    size = {"height": info.shape[-2] * vs, "width": info.shape[-1] * vs}
    # the pipeline's defaults: no CFG in a UNet export, Flux's guidance 3.5, the native size
    default_guidance = fam == "unet" or (fam == "flux" and guidance["guidance_scale"] == 3.5)
    plain = {**steps, **({} if default_guidance else guidance), **({} if native else size)}
    return StudentCall(fam, sched, {**steps, **guidance, **size}, exact, plain, global_noise=fam != "unet" and k > 1)


def without_cfg(unet: torch.nn.Module, dim: int = GUIDANCE_EMBED_DIM) -> None:
    """Give a ``UNet2DConditionModel`` an all-zero guidance-scale embedding input (``time_cond_proj_dim``): the
    SD/SDXL pipelines then skip classifier-free guidance for any ``guidance_scale`` (as for LCM checkpoints), and
    ``time_embedding.cond_proj(w) = 0`` leaves every output as it was."""
    emb = unet.time_embedding
    if getattr(emb, "cond_proj", None) is None:
        emb.cond_proj = torch.nn.Linear(dim, emb.linear_1.in_features, bias=False)
        unet.register_to_config(time_cond_proj_dim=dim)
    with torch.no_grad():
        for p in emb.cond_proj.parameters():
            p.zero_()


def export_pipeline_student(run: Path, out: Path, fmt: str = "diffusers") -> Path:
    """An SD / SDXL / SD3 / Flux student as a pipeline folder (``diffusers``), LoRA weights (``lora``) or one
    kohya-style file (``comfyui``), each with its model card."""
    info = read_info(run)
    if info.kind != "student" or "pipeline" not in info.extra:
        raise ValueError(f"{run} is not a student distilled from a diffusers pipeline; nothing to export")
    check_out(out, fmt)
    pipe_dir = Path(info.extra["pipeline"])
    check_folder(pipe_dir)
    family = info.extra.get("family")
    if fmt == "comfyui" and family != "unet":
        raise ValueError(f"--format comfyui supports SD1.5/SD2/SDXL UNet students; {family} students: use "
                         "--format lora (diffusers 0.42 has no kohya converter for SD3 and needs the original BFL "
                         "layout for Flux, which dmdx does not write)")
    bb = load_folder(run).denoiser.backbone
    call = student_call(info)
    if fmt in ("lora", "comfyui"):
        return export_lora(run, out, fmt, info, bb, call)
    model = merged_model(bb)
    if call.family == "unet":
        without_cfg(model)
    return write_pipeline(info, pipe_dir, out, bb.component, model, call)
