"""The training loop shared by every method: optimisers, requires_grad, accumulation, clipping, warm-up, EMA,
bf16 autocast, checkpoints, logging and sample grids.  It never looks at which method it runs."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig
from ..denoiser import Denoiser
from ..methods import get_method
from ..methods.base import Context, Method, Phase
from ..models import ModelInfo, save_model
from ..sampling import sample_ode, student_sample
from ..viz import save_samples
from .checkpoint import latest_checkpoint, save_checkpoint


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stopped without writing a checkpoint."""


@dataclass
class Stage:
    index: int
    method: Method
    trainables: dict[str, nn.Module]
    optims: dict[str, torch.optim.Optimizer]
    start: int


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over parameters; buffers copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def ema_decay(decay: float, n: int, warmup: bool = True) -> float:
    """The EMA decay for the student's ``n``-th update (0-based) of a stage.

    With ``warmup`` the decay is ``min(decay, (1 + n) / (10 + n))`` (as diffusers' ``EMAModel``): a fixed 0.999 over
    a few hundred updates would keep most of the initial weights (0.999**200 = 0.82) and hide what was learned.
    """
    if decay <= 0:
        return 0.0
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def trained_network_names(method_cfg, steps: int) -> set[str]:
    """Every network name a run of ``method_cfg`` trains, over all its stages."""
    stages = get_method(method_cfg.name).stages(method_cfg, steps)
    return {"student"}.union(*(cls.network_names for cls, _, _ in stages))


def check_lr_scale(method_cfg, train: TrainConfig) -> None:
    """``train.lr_scale`` may only name networks the method trains (a typo would otherwise be silently ignored)."""
    known = trained_network_names(method_cfg, train.steps)
    unknown = sorted(set(train.lr_scale) - known)
    if unknown:
        raise ValueError(f"train.lr_scale names unknown networks {unknown}; method {method_cfg.name!r} trains "
                         f"{sorted(known)}")


class Trainer:
    """Run ``method_cfg`` (a method config dataclass with a ``name``) for ``train.steps`` iterations."""

    def __init__(self, run_dir: Path, method_cfg, train: TrainConfig, ctx: Context, export_info: ModelInfo):
        self.run_dir = Path(run_dir)
        self.tc = train
        self.ctx = ctx
        self.export_info = export_info
        self.stages = get_method(method_cfg.name).stages(method_cfg, train.steps)
        self.starts = [0]
        for _, _, n in self.stages[:-1]:
            self.starts.append(self.starts[-1] + n)
        self.student = ctx.student
        self.ema = copy.deepcopy(self.student).requires_grad_(False)
        self.updates: dict[str, int] = {}
        self.last_ckpt: Path | None = None

    # -- stages ----------------------------------------------------------------------------------------------
    def build_stage(self, index: int) -> Stage:
        cls, mcfg, _ = self.stages[index]
        method = cls(mcfg, self.ctx)
        trainables = {"student": self.student, **method.networks()}
        tc = self.tc
        optims = {name: torch.optim.AdamW(net.parameters(), lr=self.base_lr(name), betas=tuple(tc.betas),
                                          weight_decay=tc.weight_decay)
                  for name, net in trainables.items()}
        for name in trainables:
            self.updates[name] = 0
        return Stage(index, method, trainables, optims, self.starts[index])

    def base_lr(self, name: str) -> float:
        return self.tc.lr * float(self.tc.lr_scale.get(name, 1.0))

    def ckpt_nets(self, stage: Stage) -> dict[str, nn.Module]:
        return {**stage.trainables, "ema": self.ema}

    # -- one phase -------------------------------------------------------------------------------------------
    def run_phase(self, stage: Stage, phase: Phase, step: int) -> dict[str, float]:
        tc, dev = self.tc, self.ctx.device
        for name, net in stage.trainables.items():
            net.requires_grad_(name in phase.trains)
        for name in phase.trains:
            stage.optims[name].zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for _ in range(tc.grad_accum):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tc.bf16):
                loss, part = phase.loss()
            if not torch.isfinite(loss):
                where = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"
                raise NonFiniteLossError(
                    f"phase {phase.name!r} gave a non-finite loss ({loss.item()}) at step {step}; stopping ({where}). "
                    f"Terms: {part}. Try a lower learning rate (--set train.lr=...) or stronger clipping.")
            (loss / tc.grad_accum).backward()
            for k, v in part.items():
                logs[k] = logs.get(k, 0.0) + v / tc.grad_accum
        for name in phase.trains:
            net = stage.trainables[name]
            params = [p for p in net.parameters() if p.grad is not None]
            if tc.grad_clip > 0 and params:
                logs[f"grad/{name}"] = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
            n = self.updates[name]
            for group in stage.optims[name].param_groups:
                group["lr"] = self.base_lr(name) * (min(1.0, (n + 1) / tc.warmup) if tc.warmup > 0 else 1.0)
            stage.optims[name].step()
            self.updates[name] = n + 1
            if name == "student":
                update_ema(self.ema, self.student, ema_decay(tc.ema_decay, n, tc.ema_warmup))
        return logs

    # -- outputs ---------------------------------------------------------------------------------------------
    def export(self) -> None:
        save_model(self.run_dir, self.ema, self.export_info)

    @torch.no_grad()
    def save_sample_grid(self, step: int, noise: torch.Tensor, cond) -> None:
        info, den = self.export_info, self.ema
        if info.kind == "student":
            x = student_sample(den, den.schedule, noise, info.times or [1.0], cond,
                               generator=torch.Generator(device=noise.device).manual_seed(0))
        else:
            x = sample_ode(lambda a, b, c: den(a, b, c, guidance=info.guidance), den.schedule, noise, 20, cond)
        (self.run_dir / "samples").mkdir(exist_ok=True)
        save_samples(x.cpu(), self.run_dir / "samples" / f"step_{step:07d}.png", title=f"step {step}")

    def checkpoint(self, stage: Stage, step: int) -> None:
        extra = {"rng": torch.get_rng_state(), "updates": dict(self.updates)}
        if torch.cuda.is_available():
            extra["cuda_rng"] = torch.cuda.get_rng_state_all()
        self.last_ckpt = save_checkpoint(self.run_dir, step, stage.index, self.ckpt_nets(stage), stage.optims, extra,
                                         keep=self.tc.keep_ckpts)
        self.export()

    def restore(self, ckpt: dict) -> Stage:
        stage = self.build_stage(ckpt["stage"])
        nets = self.ckpt_nets(stage)
        missing = set(nets) - set(ckpt["nets"])
        if missing:
            raise ValueError(f"checkpoint {ckpt['path']} lacks networks {sorted(missing)}: it was written by a "
                             "different method or config")
        for name, net in nets.items():
            net.load_state_dict(ckpt["nets"][name])
        for name, opt in stage.optims.items():
            opt.load_state_dict(ckpt["optim"][name])
        self.updates.update(ckpt["extra"]["updates"])
        torch.set_rng_state(ckpt["extra"]["rng"])
        if "cuda_rng" in ckpt["extra"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["extra"]["cuda_rng"])
        self.last_ckpt = ckpt["path"]
        return stage

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_after: int | None = None) -> Path:
        """Train to ``train.steps``; ``stop_after`` ends this call early after that many iterations (as a killed
        run would, but after a checkpoint when the step is a checkpoint step)."""
        tc = self.tc
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None and not resume:
            raise ValueError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run or choose "
                             "another --out")
        gen = torch.Generator().manual_seed(tc.seed + 1)  # fixed sample-grid noise, off the training RNG
        grid_n = getattr(self.ctx, "grid_n", 0) or (64 if self.ctx.is_image else 2000)  # video contexts: a few
        grid_noise = torch.randn((grid_n, *self.ctx.shape), generator=gen).to(self.ctx.device)
        grid_cond = ({"labels": (torch.arange(grid_n) % self.ctx.num_classes).to(self.ctx.device)}
                     if self.ctx.num_classes > 0 else None)
        if ckpt is not None:
            stage = self.restore(ckpt)
            step = ckpt["step"]
        else:
            torch.manual_seed(tc.seed)
            stage = self.build_stage(0)
            step = 0
        writer = _tensorboard(self.run_dir / "tb")
        log_path = self.run_dir / "log.jsonl"
        pbar = _progress(tc, step)
        acc: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        end = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
        try:
            while step < end:
                while stage.index + 1 < len(self.stages) and step >= self.starts[stage.index + 1]:
                    stage = self.build_stage(stage.index + 1)
                local = step - stage.start
                for phase in stage.method.phases():
                    if phase.runs_at(local):
                        for k, v in self.run_phase(stage, phase, step).items():
                            acc.setdefault(k, []).append(v)
                step += 1
                if step % tc.log_every == 0 or step == tc.steps:
                    row = {"step": step, "stage": stage.method.name,
                           **{k: sum(v) / len(v) for k, v in acc.items()}, "time": time.perf_counter() - t0}
                    with log_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    if writer is not None:
                        for k, v in row.items():
                            if isinstance(v, float) and k != "time":
                                writer.add_scalar(k, v, step)
                    if pbar is not None:
                        pbar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in row.items()
                                          if k.startswith("loss/")}, refresh=False)
                    acc.clear()
                if pbar is not None:
                    pbar.update(1)
                if step % tc.ckpt_every == 0 or step == tc.steps:
                    self.checkpoint(stage, step)
                if tc.snapshot_every > 0 and step % tc.snapshot_every == 0:
                    save_model(self.run_dir / "snapshots" / f"step_{step:07d}", self.ema, self.export_info)
                if tc.sample_every > 0 and (step % tc.sample_every == 0 or step == tc.steps):
                    self.save_sample_grid(step, grid_noise, grid_cond)
        finally:
            if pbar is not None:
                pbar.close()
            if writer is not None:
                writer.close()
        return self.run_dir


def _progress(tc: TrainConfig, step: int):
    if not tc.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=tc.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0)


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional (pip install dmdx[tb])
        return None
    return SummaryWriter(str(path))


__all__ = ["Trainer", "NonFiniteLossError", "update_ema", "ema_decay"]
