"""Video students out of dmdx: a diffusers pipeline folder, LoRA weights, and mp4 / GIF samples.

The exported folder is the teacher's pipeline with the student's transformer (LoRA merged) and a stock scheduler
whose steps *are* the student sampler (predict x0 at t_k, re-noise it with fresh noise to t_{k+1}):

- CogVideoX: ``LCMScheduler`` with the teacher's alpha_bar table (SNR shift, zero terminal SNR) as
  ``trained_betas``, ``timestep_scaling = 1e6`` (plain x0, as for the image UNets); call with ``timesteps=`` (the
  student's integer steps, in ``dmdx_student.json``).
- Wan: ``WanPipeline.__call__`` takes no timesteps or sigmas, only ``num_inference_steps``, so the scheduler must
  produce the student's sigmas by itself: ``FlowMatchEulerDiscreteScheduler`` with a ``shift`` solved for and
  ``shift_terminal`` = the last sigma (:func:`wan_scheduler`) reproduces every student whose sigmas are the
  teacher's shift of times uniform from 1 (the recipe's 1, .75, .5, .25), or uniform themselves.  Other students
  get the teacher's shift and their sigmas in ``dmdx_student.json``; ``pipe.scheduler.set_timesteps`` must then be
  pointed at them (``exact: false`` in that file; see docs/video.md).

Call without CFG (``guidance_scale=1``); pass ``latents=`` for bit-level agreement with ``dmdx sample``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from . import video as vid

Tensor = torch.Tensor


def _student(run: Path):
    from ..models import load_model, read_info

    info = read_info(run)
    if info.kind != "student" or info.extra.get("family") not in vid.FAMILIES:
        raise ValueError(f"{run} is not a student distilled from a video pipeline; nothing to export")
    return load_model(run), info


def wan_sigmas(info) -> list[float]:
    from ..schedules import make_schedule

    sched = make_schedule(info.schedule)
    return [float(sched.sigma(torch.tensor(t, dtype=torch.float64))) for t in info.times or [1.0]]


def _flow_shift(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def wan_scheduler(info, num_train_timesteps: int = 1000):
    """A ``FlowMatchEulerDiscreteScheduler`` whose plain ``set_timesteps(n)`` gives the student's n sigmas, or None.

    That scheduler's sigmas are ``u_k = linspace(1, f_r(1/N), n)`` shifted, ``f_r(u) = r u / (1 + (r - 1) u)``, then
    stretched to end at ``shift_terminal``: ``1 - c (1 - f_r(u_k))``.  A student whose sigmas are ``f_q`` of times
    uniform from 1 (``t_k = 1 - k d``: the recipe's 1, .75, .5, .25 at the teacher's shift q, or any uniform
    sigmas: q = 1) lies on that family: matching ``1 - f_q(t_k)`` term by term gives ``c = (r - 1) / (q - 1)`` and
    ``A r^2 + (A (N - 1) - B) r + B = 0`` with ``A = d (q - 1) (n - 1)``, ``B = q (N - 1)``.  The solution is
    checked against the scheduler's own ``set_timesteps`` (to 1e-6)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sig = wan_sigmas(info)
    n, N = len(sig), num_train_timesteps
    if n == 1:
        cands = [FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=1.0, stochastic_sampling=True)]
    else:
        cands = []
        for q in dict.fromkeys([1.0, float(info.schedule.get("shift", 1.0))]):
            u = [x / (q - (q - 1) * x) for x in sig]  # f_q^-1: the times the sigmas are shifted from
            d = (1 - u[-1]) / (n - 1)
            if abs(u[0] - 1) > 1e-9 or any(abs(u[k] - (1 - k * d)) > 1e-9 for k in range(n)):
                continue
            A, B = d * (q - 1) * (n - 1), q * (N - 1)
            b = A * (N - 1) - B
            r = 2 * B / (-b + math.sqrt(b * b - 4 * A * B))  # the smaller root (1 when q = 1)
            cands.append(FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=r, shift_terminal=sig[-1],
                                                         stochastic_sampling=True))
    for sched in cands:
        sched.set_timesteps(n)
        if np.allclose(sched.sigmas[:n].double().numpy(), sig, rtol=0, atol=1e-6):
            return sched
    return None


def sampling_args(info) -> dict:
    """What to pass to the exported pipeline's ``__call__`` to run the student's steps at its times."""
    fam = info.extra.get("family")
    times = info.times or [1.0]
    v = info.extra.get("video", {})
    args = {"num_inference_steps": len(times), "guidance_scale": 1.0, "num_frames": v.get("frames"),
            "height": v.get("height"), "width": v.get("width"),
            "max_sequence_length": info.backbone["config"].get("max_sequence_length")}
    if fam == "cogvideox":
        T = info.schedule.get("num_train_timesteps", 1000) - 1
        args["timesteps"] = [int(round(t * T)) for t in times]
    return args


def export_video_run(run: str | Path, out: str | Path, fmt: str = "diffusers") -> Path:
    from ..export import FORMATS, _merged_model
    from .diffusers import lora_state_dict, model_index

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    run, out = Path(run), Path(out)
    m, info = _student(run)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose another --out")
    pipe_dir, family = vid.check_video_folder(info.extra["pipeline"])
    bb = m.denoiser.backbone
    meta = {"call": sampling_args(info), "times": info.times}
    import diffusers

    if fmt == "lora":
        if not bb.config.get("lora"):
            raise ValueError(f"{run}: the student was trained without LoRA (real.student_lora.rank = 0); use "
                             "--format diffusers")
        cls = getattr(diffusers, model_index(pipe_dir)["_class_name"])
        out.mkdir(parents=True, exist_ok=True)
        cls.save_lora_weights(str(out), transformer_lora_layers=lora_state_dict(bb.model))
        (out / "dmdx_student.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out
    shutil.copytree(pipe_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer", "scheduler"))
    _merged_model(bb).save_pretrained(str(out / "transformer"))
    sched_cfg = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    if family == "cogvideox":
        ab = m.denoiser.schedule.alphas_cumprod()
        betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
        pred = {"v": "v_prediction", "epsilon": "epsilon"}[m.denoiser.prediction]
        sched = diffusers.LCMScheduler(num_train_timesteps=len(ab), trained_betas=betas.tolist(),
                                       prediction_type=pred, timestep_scaling=1e6, clip_sample=False,
                                       thresholding=False, set_alpha_to_one=True,
                                       original_inference_steps=len(info.times or [1.0]))
    else:
        sched = wan_scheduler(info, sched_cfg.get("num_train_timesteps", 1000))
        exact = sched is not None
        if not exact:
            sched = diffusers.FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=sched_cfg.get("num_train_timesteps", 1000), shift=m.denoiser.schedule.shift,
                stochastic_sampling=True)
        # the scheduler shifts what set_timesteps(sigmas=...) gets: the unshifted student times
        meta.update({"exact": exact, "set_timesteps_sigmas": [float(t) for t in (info.times or [1.0])]})
    sched.save_pretrained(str(out / "scheduler"))
    index = model_index(out)
    index["scheduler"] = ["diffusers", type(sched).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "dmdx_student.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# -- samples ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_videos(model: str | Path, prompts_file: str | None, out: str | Path, n: int = 1, seed: int = 0,
                  steps: int | None = None, guidance: float | None = None, device="cpu", fps: int = 8) -> list[Path]:
    """One mp4 + GIF preview per prompt (``n`` per prompt) from a video student (its few-step sampler) or a video
    teacher folder (Euler ODE with CFG); returns the mp4 paths."""
    from ..data.video import write_preview, write_video
    from ..models import load_model
    from ..sampling import sample_ode, student_sample
    from .diffusers import read_prompts

    if not prompts_file:
        raise ValueError("video models need --prompts FILE (one prompt a line)")
    prompts = read_prompts(prompts_file)
    m = load_model(model, device)
    info, den = m.info, m.denoiser
    path = Path(info.extra["pipeline"])
    _, family = vid.check_video_folder(path)
    length = info.backbone["config"].get("max_sequence_length") or vid.text_length(path, family)
    bank, _ = vid.encode_prompts(path, prompts, length, **vid.encoder_placement())
    vae = vid.VideoVAE(path).to(device)
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
