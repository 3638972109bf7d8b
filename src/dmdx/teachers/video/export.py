"""Video students out of dmdx: a diffusers pipeline folder, LoRA weights, and mp4 / GIF samples.

The exported folder is the teacher's pipeline with the student's transformer (LoRA merged) and a stock scheduler
whose steps *are* the student sampler (predict x0 at t_k, re-noise it with fresh noise to t_{k+1}); a LoRA export
holds the LoRA file (peft keys + the adapter's LoraConfig, checked by loading it back, as for images:
:mod:`dmdx.export`) and that scheduler.  Both get a model card (README.md) and ``dmdx_student.json`` with the call.

- CogVideoX: ``LCMScheduler`` with the teacher's alpha_bar table (SNR shift, zero terminal SNR) as
  ``trained_betas``, ``timestep_scaling = 1e6`` (plain x0, as for the image UNets); ``timesteps=`` (the student's
  integer steps) in the call unless the scheduler's own grid gives them (:func:`dmdx.export.lcm_scheduler`).
- Wan: ``WanPipeline.__call__`` takes no timesteps or sigmas, only ``num_inference_steps``, so the scheduler must
  produce the student's sigmas by itself: ``FlowMatchEulerDiscreteScheduler`` with a ``shift`` solved for and
  ``shift_terminal`` = the last sigma (:func:`dmdx.export.flow_scheduler`) reproduces every student whose sigmas are
  the teacher's shift of times uniform from 1 (the recipe's 1, .75, .5, .25), or uniform themselves.  Other
  students get the teacher's shift and their sigmas in ``dmdx_student.json``; ``pipe.scheduler.set_timesteps`` must
  then be pointed at them (``exact: false``; the printed code does it).

Neither pipeline can switch classifier-free guidance off by config, and the step count and video size are
``__call__`` arguments: the call names ``guidance_scale=1``, ``num_inference_steps``, ``num_frames``, ``height``,
``width``.  Pass ``latents=`` for bit-level agreement with ``dmdx sample``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...data.video import write_preview, write_video
from ...export import (FORMATS, StudentCall, check_out, export_lora, flow_scheduler, lcm_scheduler, student_sigmas,
                       student_timesteps, write_pipeline)
from ...models import Model, load_folder, read_info
from ...nets.pipeline import merged_model
from ...pipelines.folder import read_prompts
from ...pipelines.video import FAMILIES, VideoVAE, check_video_folder, encode_prompts, encoder_placement, text_length
from ...sampling import sample_ode, student_sample
from ...schedules import make_schedule

Tensor = torch.Tensor


def _student(run: Path):
    info = read_info(run)
    if info.kind != "student" or info.extra.get("family") not in FAMILIES:
        raise ValueError(f"{run} is not a student distilled from a video pipeline; nothing to export")
    return load_folder(run), info


def student_call(info):
    """The scheduler and ``__call__`` arguments that run a video student (:class:`dmdx.export.StudentCall`)."""
    import diffusers  # optional, heavy: imported on use

    fam = info.extra.get("family")
    times = info.times or [1.0]
    v = info.extra.get("video", {})
    steps = {"num_inference_steps": len(times)}
    rest = {"guidance_scale": 1.0, "num_frames": v.get("frames"), "height": v.get("height"), "width": v.get("width"),
            "max_sequence_length": info.backbone["config"].get("max_sequence_length")}
    rest = {k: a for k, a in rest.items() if a is not None}
    if fam == "cogvideox":
        ab = make_schedule(info.schedule).alphas_cumprod()
        betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
        pred = {"v": "v_prediction", "epsilon": "epsilon"}[info.prediction]
        ts = student_timesteps(info)
        sched, exact = lcm_scheduler({"num_train_timesteps": len(ab), "trained_betas": betas.tolist(),
                                      "prediction_type": pred, "set_alpha_to_one": True}, ts)
        if not exact:
            steps["timesteps"] = ts
        args = {**steps, **rest}
        return StudentCall(fam, sched, args, exact, plain=args)
    args = {**steps, **rest}
    sched_cfg = json.loads((Path(info.extra["pipeline"]) / "scheduler" / "scheduler_config.json").read_text())
    N = int(sched_cfg.get("num_train_timesteps", 1000))
    shift = float(info.schedule.get("shift", 1.0))
    sched = flow_scheduler(student_sigmas(info), shift, N)
    if sched is not None:
        return StudentCall(fam, sched, args, True, plain=args, global_noise=len(times) > 1)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift, stochastic_sampling=True)
    # the scheduler shifts what set_timesteps(sigmas=...) gets: the unshifted student times
    return StudentCall(fam, sched, args, False, plain=args, set_timesteps_sigmas=[float(t) for t in times],
                       global_noise=len(times) > 1)


def export_video_run(run: str | Path, out: str | Path, fmt: str = "diffusers") -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "comfyui":
        raise ValueError("--format comfyui supports SD1.5/SD2/SDXL UNet students; CogVideoX / Wan students: use "
                         "--format lora or --format diffusers")
    run, out = Path(run), Path(out)
    m, info = _student(run)
    check_out(out, fmt)
    pipe_dir, _family = check_video_folder(info.extra["pipeline"])
    bb = m.denoiser.backbone
    call = student_call(info)
    if fmt == "lora":
        return export_lora(run, out, fmt, info, bb, call)
    return write_pipeline(info, pipe_dir, out, bb.component, merged_model(bb), call)


# -- samples ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_videos(m: Model, prompts_file: str | None, out: str | Path, n: int = 1, seed: int = 0,
                  steps: int | None = None, guidance: float | None = None, device="cpu", fps: int = 8) -> list[Path]:
    """One mp4 + GIF preview per prompt (``n`` per prompt) from a video student (its few-step sampler) or a video
    teacher (Euler ODE with CFG); returns the mp4 paths."""
    if not prompts_file:
        raise ValueError("video models need --prompts FILE (one prompt a line)")
    prompts = read_prompts(prompts_file)
    info, den = m.info, m.denoiser
    path = Path(info.extra["pipeline"])
    _, family = check_video_folder(path)
    length = info.backbone["config"].get("max_sequence_length") or text_length(path, family)
    bank, _ = encode_prompts(path, prompts, length, **encoder_placement())
    vae = VideoVAE(path).to(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    files = []
    g = info.guidance if guidance is None else guidance
    for i, _p in enumerate(prompts):
        for j in range(n):
            cond = {k: v[i:i + 1].to(device) for k, v in bank.items()}
            noise = torch.randn((1, *info.shape), generator=gen).to(device)
            if info.kind == "student":
                z = student_sample(den, den.schedule, noise, info.times or [1.0], cond, generator=gen)
            else:
                z = sample_ode(lambda x, t, c: den(x, t, c, guidance=g), den.schedule, noise, steps or info.steps,
                               cond, solver="euler")
            frames = vae.decode(z)[0].cpu()
            name = f"{i:04d}_{j}"
            files.append(write_video(out / f"{name}.mp4", frames, fps))
            write_preview(out / f"{name}.gif", frames, fps)
    (out / "prompts.txt").write_text("\n".join(f"{i:04d}\t{p}" for i, p in enumerate(prompts)) + "\n")
    return files
