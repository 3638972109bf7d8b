"""Tiny runs for tests: the exact ring8 teacher, a small MLP surrogate, few steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dmdx.config import TrainConfig
from dmdx.train.loop import Trainer
from dmdx.teachers import build_run
from dmdx.train.run import RunConfig, default_run_config


def tiny_config(method: str, teacher: str = "gmm:ring8", steps: int = 4, **train) -> RunConfig:
    cfg = default_run_config(method)
    cfg.teacher = teacher
    cfg.surrogate_steps = 20
    cfg.pairs.n = 64
    cfg.pairs.steps = 4
    opts = dict(steps=steps, batch_size=16, lr=1e-3, log_every=1, ckpt_every=1000, sample_every=0, progress=False)
    cfg.train = TrainConfig(**{**opts, **train})
    if hasattr(cfg.method, "critic_every"):
        cfg.method.critic_every = 2
    return cfg


def make_trainer(cfg: RunConfig, run_dir: Path) -> Trainer:
    ctx, info = build_run(cfg, Path(run_dir))
    return Trainer(Path(run_dir), cfg.method, cfg.train, ctx, info)


def state_of(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- tiny pipeline students (tests/test_export.py, tests/test_pipeline_eval.py) ---------------------------------
def pndm_pipeline(folder: Path) -> Path:
    """A tiny SD pipeline with SD1.5's own scheduler (PNDM), which has no ``timesteps=`` argument."""
    from diffusers import PNDMScheduler

    from dmdx.teachers.image.tiny import make_tiny_pipeline

    make_tiny_pipeline("sd", folder)
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    PNDMScheduler.from_config(cfg, skip_prk_steps=True, steps_offset=1).save_pretrained(str(folder / "scheduler"))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def lora_student(pipe: Path, root: Path, times=(1.0, 0.5), rank: int = 64) -> Path:
    """A one-step DMD2 LoRA student of ``pipe`` with the recipe's LoRA (alpha 8, the reference's target list: convs,
    attention, feed-forward, projections, time embedding; rank 64 as in the reference), its LoRA weights then
    randomised (:func:`randomise_lora`)."""
    from dmdx.teachers import apply_recipe

    (root / "prompts.txt").write_text("a red cat\na blue dog\n")
    cfg = tiny_config("dmd2", teacher=str(pipe), steps=1, batch_size=2)
    cfg.real.prompts = str(root / "prompts.txt")
    cfg.real.teacher_dtype = "float32"
    cfg.real.student_lora.rank = rank
    cfg.real.fake_lora.rank = 4
    cfg.method.gan = False
    cfg.student.times = list(times)
    apply_recipe(cfg, {"train", "method", "student", "real.student_lora.rank", "real.fake_lora.rank"})
    assert cfg.real.student_lora.alpha == 8.0 and len(cfg.real.student_lora.targets) > 4  # the recipe's LoRA
    return randomise_lora(make_trainer(cfg, root / "run").run())


def randomise_lora(run: Path, scale: float = 0.3) -> Path:
    """Set every LoRA matrix of a run's student, lora_A and lora_B, to ``scale`` * N(0, 1).

    A trained LoRA starts from lora_B = 0 and a test's few steps barely move it, so a LoRA that is dropped, loaded
    onto the wrong modules or scaled by alpha / rank wrongly would still give nearly the student's images; with both
    factors random each module's delta, (alpha / rank) lora_B lora_A, is as large as its base weights, and any of those
    faults moves the output far beyond the tests' tolerances."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if "lora_A" in k or "lora_B" in k:
            state[k] = scale * torch.randn(v.shape, generator=g)
    save_file(state, str(run / "model.safetensors"))
    return run


def with_times(run: Path, times: list[float], out: Path) -> Path:
    """A copy of a student's run folder sampling at other ``times`` (its ``model.json``): the same weights, another
    few-step sampler, for export paths a recipe's times do not reach."""
    import shutil

    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", "tb", "samples", "pairs"))
    info = json.loads((out / "model.json").read_text())
    info["times"] = list(times)
    (out / "model.json").write_text(json.dumps(info, indent=2))
    return out


# -- video inputs (tests/test_video.py, tests/test_dist.py) -----------------------------------------------------
def video_inputs(root: Path, prompts: list[str], n_videos: int) -> Path:
    """``root/p.txt`` (one prompt a line) and ``root/vids/v{i}.mp4``: random 10-frame 20x24 videos, seeded."""
    from dmdx.data.video import write_video

    root.mkdir(parents=True, exist_ok=True)
    (root / "p.txt").write_text("".join(p + "\n" for p in prompts))
    (root / "vids").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n_videos):
        write_video(root / "vids" / f"v{i}.mp4", torch.rand(3, 10, 20, 24, generator=g) * 2 - 1)
    return root
