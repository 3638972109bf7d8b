"""Tiny runs for tests: the exact ring8 teacher, a small MLP surrogate, few steps."""

from __future__ import annotations

from pathlib import Path

import torch

from dmdx.config import TrainConfig
from dmdx.train.loop import Trainer
from dmdx.train.run import RunConfig, build_run, default_run_config


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
