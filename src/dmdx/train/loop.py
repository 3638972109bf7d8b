"""The training loop shared by every method: optimisers, requires_grad, accumulation, clipping, warm-up, EMA,
bf16 autocast, checkpoints, logging and sample grids.  It never looks at which method it runs.

Distributed runs (``train.parallel``, see ``dist.py`` and docs/scaling.md) keep this one loop: the trainable
networks are replicated or sharded here, gradients averaged (ddp) or reduce-scattered by FSDP2, every rank checks
that its loss is finite and all stop together, and logs, progress bar, sample grids, snapshots and the exported
model come from rank 0.

Life on a cluster (docs/scaling.md, "On a cluster"): a signal in ``train.preempt_signals`` (SIGTERM, SIGUSR1) makes
every rank finish its step; the ranks agree on it after each step, write a checkpoint at that step and raise
:class:`Preempted` (``dmdx`` exits with status 75).  A collective that fails (a rank stopped, hung or gone past
``train.dist_timeout``) raises :class:`RankLostError` on every rank that sees it, naming the ranks that did not
answer (status 4)."""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig
from ..methods import get_method
from ..methods.base import Context, Method, Phase
from ..models import ModelInfo, save_model
from ..sampling import sample_ode, student_sample
from ..viz import save_samples
from . import dist
from .checkpoint import latest_checkpoint, load_dcp_state, read_rng, save_checkpoint, save_dcp_checkpoint
from .health import Health


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stopped without writing a checkpoint."""


class RankLostError(RuntimeError):
    """A collective failed (a rank stopped answering within ``train.dist_timeout``, or its connection closed); the
    message names the ranks that did not answer and the step.  Raised on every rank that sees the failure."""


class Preempted(Exception):
    """A preemption signal stopped the run after a step; a checkpoint at that step was written (``path``)."""

    def __init__(self, message: str, step: int, path: Path, signame: str):
        super().__init__(message)
        self.step, self.path, self.signame = step, path, signame


UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """``train.preempt_signals`` as signals ("SIGTERM" or "TERM", any case); a ValueError names the allowed ones."""
    out = []
    for name in names:
        key = str(name).strip().upper()
        key = key if key.startswith("SIG") else "SIG" + key
        sig = signal.Signals.__members__.get(key)
        if sig is None or key in UNCATCHABLE:
            allowed = ", ".join(s.name for s in signal.Signals if s.name not in UNCATCHABLE and "_" not in s.name)
            raise ValueError(f"train.preempt_signals: {name!r} is not a signal a process can catch; allowed: {allowed}")
        out.append(sig)
    return out


class StopSignals:
    """While a run trains, a signal of ``train.preempt_signals`` only records itself (the step in progress
    finishes); the previous handlers come back afterwards.  Python lets only the main thread set handlers: a run
    in another thread keeps the signals' defaults."""

    def __init__(self, names: list[str]):
        self.signals = parse_signals(names)
        self.received: int = 0  # the first signal's number, 0: none
        self.at: float | None = None  # when (time.monotonic())
        self._old: dict = {}

    def _on_signal(self, signum, frame) -> None:
        if not self.received:
            self.received, self.at = signum, time.monotonic()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


@dataclass
class Stage:
    index: int
    method: Method
    trainables: dict[str, nn.Module]
    optims: dict[str, torch.optim.Optimizer]
    start: int
    frozen: dict[str, frozenset[str]]  # names of the parameters each network does not train (Method.trainable)

    def set_trainable(self, name: str, on: bool) -> None:
        """``requires_grad`` of network ``name``: ``on`` for the parameters it trains, off for its frozen ones.  By
        name, on the parameters registered now (FSDP2 swaps gathered and sharded ones in and out)."""
        net, frozen = self.trainables[name], self.frozen[name]
        if not frozen:
            net.requires_grad_(on)
            return
        for n, p in net.named_parameters():
            p.requires_grad_(on and n not in frozen)

    def trained(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every parameter network ``name`` trains, in ``named_parameters`` order."""
        return [(n, p) for n, p in self.trainables[name].named_parameters() if n not in self.frozen[name]]


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over parameters; buffers copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """``dst``'s parameters and buffers set to ``src``'s, in place (same structure and sharding; optimisers keep
    their parameters)."""
    for pd, ps in zip(dst.parameters(), src.parameters()):
        pd.copy_(ps)
    for bd, bs in zip(dst.buffers(), src.buffers()):
        bd.copy_(bs)


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


def frozen_parameters(net: nn.Module, keep) -> frozenset[str]:
    """Names of the parameters of ``net`` that fail ``keep(name, parameter)`` (a method's ``trainable``; None: every
    parameter trains).  A filter that keeps none is a method's bug, not a user's: asserted."""
    if keep is None:
        return frozenset()
    named = list(net.named_parameters())
    out = frozenset(n for n, p in named if not keep(n, p))
    assert len(out) < len(named), f"the method's parameter filter keeps none of {type(net).__name__}'s parameters"
    return out


def stage_lr_scale(train: TrainConfig, stage_cfg) -> dict:
    """A stage's learning-rate multipliers: ``train.lr_scale``, overridden by the stage's own ``lr_scale`` (a
    method config field, so a DMDX run's ADP and ADM stages may give the student different rates)."""
    return {**train.lr_scale, **(getattr(stage_cfg, "lr_scale", None) or {})}


def check_lr_scale(method_cfg, train: TrainConfig) -> None:
    """``train.lr_scale`` (and a stage's ``lr_scale``) may only name networks the method (that stage) trains: a
    typo would otherwise be silently ignored."""
    known = trained_network_names(method_cfg, train.steps)
    unknown = sorted(set(train.lr_scale) - known)
    if unknown:
        raise ValueError(f"train.lr_scale names unknown networks {unknown}; method {method_cfg.name!r} trains "
                         f"{sorted(known)}")
    for cls, stage_cfg, _ in get_method(method_cfg.name).stages(method_cfg, train.steps):
        own = getattr(stage_cfg, "lr_scale", None) or {}
        stage_known = {"student", *cls.network_names}
        unknown = sorted(set(own) - stage_known)
        if unknown:
            raise ValueError(f"{cls.name}'s lr_scale names unknown networks {unknown}; that stage trains "
                             f"{sorted(stage_known)}")


class Trainer:
    """Run ``method_cfg`` (a method config dataclass with a ``name``) for ``train.steps`` iterations."""

    def __init__(self, run_dir: Path, method_cfg, train: TrainConfig, ctx: Context, export_info: ModelInfo,
                 world: dist.World | None = None):
        self.run_dir = Path(run_dir)
        self.tc = train
        self.ctx = ctx
        self.export_info = export_info
        parse_signals(train.preempt_signals)  # a typo fails now, not at the first preemption
        self.world = world if world is not None else dist.setup(train.parallel, ctx.device, train.dist_timeout)
        # train.batch_size is the global batch; methods draw the per-rank micro-batch
        ctx.batch_size = dist.per_rank_batch(train.batch_size, self.world.size, train.grad_accum)
        if self.world.size > 1:
            ctx.shared_randint = self.world.shared_randint
        if self.world.parallel == "fsdp" and train.bf16:
            # FSDP2's bf16 policy gathers bf16 parameters for every forward: no float32 prediction is possible there
            ctx.full_precision = contextlib.nullcontext
        self.stages = get_method(method_cfg.name).stages(method_cfg, train.steps)
        self.starts = [0]
        for _, _, n in self.stages[:-1]:
            self.starts.append(self.starts[-1] + n)
        self.student = ctx.student
        self._prepared: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.world.broadcast_module(self.student)
        self.ema = copy.deepcopy(self.student).requires_grad_(False)  # frozen copies before wrapping
        self._plain: nn.Module | None = None  # fsdp: an unsharded CPU copy on rank 0 for sample grids
        if self.fsdp and self.world.main and train.sample_every > 0:
            self._plain = copy.deepcopy(self.student).requires_grad_(False).cpu()
        self.prepare(self.student, broadcast=False)
        self.prepare(self.ema, broadcast=False)
        self.updates: dict[str, int] = {}
        self.last_ckpt: Path | None = None
        self.health = Health(self.run_dir, train, ctx, main=self.world.main)

    @property
    def fsdp(self) -> bool:
        return self.world.parallel == "fsdp"

    def prepare(self, net: nn.Module, broadcast: bool = True) -> None:
        """Replicate (rank 0's initial weights to every rank) and, for fsdp, shard a trainable network; once."""
        if net in self._prepared:
            return
        self._prepared.add(net)
        if broadcast:
            self.world.broadcast_module(net)
        if self.fsdp:
            dist.shard(net, self.world, self.tc.bf16, self.tc.cpu_offload, self.ctx.device)

    # -- stages ----------------------------------------------------------------------------------------------
    def build_stage(self, index: int) -> Stage:
        cls, mcfg, _ = self.stages[index]
        method = cls(mcfg, self.ctx)
        trainables = {"student": self.student, **method.networks()}
        for net in trainables.values():
            self.prepare(net)
        tc = self.tc
        frozen = {name: frozen_parameters(net, method.trainable(name)) for name, net in trainables.items()}
        stage = Stage(index, method, trainables, {}, self.starts[index], frozen)
        stage.optims = {name: torch.optim.AdamW([p for _, p in stage.trained(name)], lr=self.base_lr(name, mcfg),
                                                betas=tuple(tc.betas), weight_decay=tc.weight_decay)
                        for name in trainables}
        for name in trainables:
            self.updates[name] = 0
        return stage

    def base_lr(self, name: str, stage_cfg=None) -> float:
        return self.tc.lr * float(stage_lr_scale(self.tc, stage_cfg).get(name, 1.0))

    def ckpt_nets(self, stage: Stage) -> dict[str, nn.Module]:
        return {**stage.trainables, "ema": self.ema}

    # -- one phase -------------------------------------------------------------------------------------------
    def run_phase(self, stage: Stage, phase: Phase, step: int) -> dict[str, float]:
        tc, dev = self.tc, self.ctx.device
        for name in stage.trainables:
            stage.set_trainable(name, name in phase.trains)
        for name in phase.trains:
            stage.optims[name].zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        world = self.world
        for _ in range(tc.grad_accum):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tc.bf16):
                loss, part = phase.loss()
            finite = bool(torch.isfinite(loss))
            bad = world.ranks_where(not finite) if world.size > 1 else []  # every rank agrees before any backward
            if not finite or bad:
                where = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"
                if world.size > 1:  # the same message on every rank
                    raise NonFiniteLossError(
                        f"phase {phase.name!r} gave a non-finite loss on rank(s) {bad} of {world.size} at step "
                        f"{step}; every rank stops ({where}). Try a lower learning rate (--set train.lr=...) or "
                        "stronger clipping.")
                raise NonFiniteLossError(
                    f"phase {phase.name!r} gave a non-finite loss ({loss.item()}) at step {step}; stopping ({where}). "
                    f"Terms: {part}. Try a lower learning rate (--set train.lr=...) or stronger clipping.")
            (loss / tc.grad_accum).backward()
            for k, v in part.items():
                logs[k] = logs.get(k, 0.0) + v / tc.grad_accum
        for name in phase.trains:
            net = stage.trainables[name]
            if world.parallel == "ddp":  # once per phase, after all micro-steps (DDP's no_sync + sync); every
                # parameter, so that a rank whose batch left one without a gradient contributes zeros
                world.average_gradients(list(net.parameters()))
            params = [p for p in net.parameters() if p.grad is not None]
            if tc.grad_clip > 0 and params:
                norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                logs[f"grad/{name}"] = float(dist.full_tensor(norm))
            n = self.updates[name]
            for group in stage.optims[name].param_groups:
                group["lr"] = self.base_lr(name, stage.method.cfg) * (min(1.0, (n + 1) / tc.warmup) if tc.warmup > 0 else 1.0)
            stage.optims[name].step()
            self.updates[name] = n + 1
            if name == "student":
                update_ema(self.ema, self.student, ema_decay(tc.ema_decay, n, tc.ema_warmup))
        if self.fsdp:
            for net in stage.trainables.values():
                dist.reshard(net)
        return logs

    # -- outputs ---------------------------------------------------------------------------------------------
    def ema_state(self) -> dict | None:
        """The EMA backbone's full state (gathered from the shards under fsdp, a collective: call it on every
        rank; rank 0 gets the tensors, the others an empty dict); None when ``self.ema`` is a full copy."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.ema.backbone, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))

    def export(self, folder: Path | None = None) -> None:
        """The EMA student as a model folder (``run_dir`` by default), written by rank 0."""
        state = self.ema_state()
        if self.world.main:
            save_model(self.run_dir if folder is None else folder, self.ema, self.export_info, state=state)

    def plain_ema(self) -> nn.Module | None:
        """On rank 0, an unsharded EMA denoiser for sampling (collective under fsdp); None on other ranks."""
        state = self.ema_state()
        if not self.world.main:
            return None
        if state is None:
            return self.ema
        self._plain.backbone.load_state_dict(state)
        return self._plain.to(self.ctx.device)

    @torch.no_grad()
    def save_sample_grid(self, step: int, noise: torch.Tensor, cond) -> None:
        den = self.plain_ema()
        if den is None:
            return
        info = self.export_info
        gen = torch.Generator(device=noise.device).manual_seed(0)
        # in chunks of the per-rank batch: what fits a training step fits a no-grad chunk (at 512 px, SD1.5's 64-sample
        # grid in one batch took a run that trained in 16-18 GB to 24 GB, issue 34)
        chunk = max(1, self.ctx.batch_size)
        xs = []
        for i in range(0, noise.shape[0], chunk):
            c = None if cond is None else {k: v[i:i + chunk] for k, v in cond.items()}
            if info.kind == "student":
                xs.append(student_sample(den, den.schedule, noise[i:i + chunk], info.times or [1.0], c, generator=gen))
            else:
                xs.append(sample_ode(lambda a, b, cc: den(a, b, cc, guidance=info.guidance), den.schedule,
                                     noise[i:i + chunk], 20, c))
        x = torch.cat(xs)
        (self.run_dir / "samples").mkdir(exist_ok=True)
        save_samples(x.cpu(), self.run_dir / "samples" / f"step_{step:07d}.png", title=f"step {step}")
        if den is self._plain:
            self._plain.cpu()

    def checkpoint(self, stage: Stage, step: int, preempted: str | None = None) -> None:
        """Write the checkpoint of ``step`` and export the EMA student; a preemption checkpoint (``preempted``: the
        signal's name, recorded in its ``state.json``) skips the export to stop sooner."""
        info = {"preempted": preempted} if preempted else {}
        if self.world.distributed:
            self.last_ckpt = self.save_dcp(stage, step, info)
        else:
            extra = {"rng": torch.get_rng_state(), "updates": dict(self.updates)}
            if torch.cuda.is_available():
                extra["cuda_rng"] = torch.cuda.get_rng_state_all()
            self.last_ckpt = save_checkpoint(self.run_dir, step, stage.index, self.ckpt_nets(stage), stage.optims,
                                             extra, keep=self.tc.keep_ckpts, info=info)
        if not preempted:
            self.export()

    # -- distributed checkpoints (DCP) ----------------------------------------------------------------------
    def _dcp_state(self, stage: Stage, optim_names) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"nets": {name: get_model_state_dict(net) for name, net in self.ckpt_nets(stage).items()},
                "optim": {name: get_optimizer_state_dict(stage.trainables[name], stage.optims[name])
                          for name in optim_names}}

    def save_dcp(self, stage: Stage, step: int, info: dict | None = None) -> Path:
        # an optimiser that never stepped has no state to save (DCP would make one by a zero-learning-rate step)
        optim_names = sorted(name for name, opt in stage.optims.items() if opt.state)
        meta = {"stage": stage.index, "nets": sorted(self.ckpt_nets(stage)), "optim": optim_names,
                "updates": dict(self.updates), "world": self.world.size, "parallel": self.world.parallel,
                **(info or {})}
        return save_dcp_checkpoint(self.run_dir, step, self._dcp_state(stage, optim_names), meta, self.world,
                                   keep=self.tc.keep_ckpts)

    def _check_nets(self, ckpt: dict, stage: Stage) -> dict[str, nn.Module]:
        nets = self.ckpt_nets(stage)
        missing = set(nets) - set(ckpt["nets"])
        if missing:
            raise ValueError(f"checkpoint {ckpt['path']} lacks networks {sorted(missing)}: it was written by a "
                             "different method or config")
        return nets

    def _fresh_rng(self, step: int) -> None:
        """A rank the checkpoint has no RNG state for (resumed at a larger world size) starts a new stream."""
        torch.manual_seed(self.tc.seed + self.world.rank + 1_000_003 * step)

    def restore_dcp(self, ckpt: dict) -> Stage:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        stage = self.build_stage(ckpt["stage"])
        self._check_nets(ckpt, stage)
        for name in stage.trainables:  # DCP sizes an empty optimiser's state from the parameters' grads
            stage.set_trainable(name, True)
        state = self._dcp_state(stage, ckpt["optim"])
        load_dcp_state(ckpt["path"], state)
        for name, net in self.ckpt_nets(stage).items():
            set_model_state_dict(net, state["nets"][name])
        for name in ckpt["optim"]:
            set_optimizer_state_dict(stage.trainables[name], stage.optims[name], state["optim"][name])
        self.updates.update(ckpt["updates"])
        rng = read_rng(ckpt["path"], self.world.rank)
        if rng is None:
            self._fresh_rng(ckpt["step"])
        else:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        self.last_ckpt = ckpt["path"]
        return stage

    def restore(self, ckpt: dict) -> Stage:
        if ckpt.get("format") == "dcp":
            return self.restore_dcp(ckpt)
        stage = self.build_stage(ckpt["stage"])
        nets = self._check_nets(ckpt, stage)
        if self.fsdp:  # a single-process checkpoint, read whole by every rank and sharded
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            full = StateDictOptions(full_state_dict=True)
            for name, net in nets.items():
                set_model_state_dict(net, ckpt["nets"][name], options=full)
            for name, opt in stage.optims.items():
                net = stage.trainables[name]
                if ckpt["optim"][name]["state"]:
                    stage.set_trainable(name, True)
                    set_optimizer_state_dict(net, opt, _fqn_optim_state(stage.trained(name), ckpt["optim"][name]),
                                             options=full)
        else:
            for name, net in nets.items():
                net.load_state_dict(ckpt["nets"][name])
            for name, opt in stage.optims.items():
                opt.load_state_dict(ckpt["optim"][name])
        self.updates.update(ckpt["extra"]["updates"])
        if self.world.rank == 0:
            torch.set_rng_state(ckpt["extra"]["rng"])
            if "cuda_rng" in ckpt["extra"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["extra"]["cuda_rng"])
        else:
            self._fresh_rng(ckpt["step"])
        self.last_ckpt = ckpt["path"]
        return stage

    # -- the loop --------------------------------------------------------------------------------------------
    def stop_request(self, signals: StopSignals) -> tuple[str, list[int]] | None:
        """The preemption signal a rank received (its name and the ranks that got one; the same answer on every
        rank), or None.  With several ranks this is one all-reduce of ``world size`` floats per step, tiny next to
        the step's gradient all-reduces; it is what makes every rank stop after the same step."""
        got = self.world.per_rank(signals.received)
        ranks = [r for r, v in enumerate(got) if v]
        return (signal.Signals(int(got[ranks[0]])).name, ranks) if ranks else None

    def run(self, resume: bool = False, stop_after: int | None = None) -> Path:
        """Train to ``train.steps``; ``stop_after`` ends this call early after that many iterations (as a killed
        run would, but after a checkpoint when the step is a checkpoint step).  Raises :class:`Preempted` after a
        preemption signal's checkpoint, :class:`RankLostError` when a collective fails."""
        with StopSignals(self.tc.preempt_signals) as signals:
            return self._run(signals, resume, stop_after)

    def _run(self, signals: StopSignals, resume: bool, stop_after: int | None) -> Path:
        tc, world = self.tc, self.world
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None and dist.elastic_restart():
            resume = True  # torchrun restarted the group after a lost rank: continue from the last checkpoint
        if ckpt is not None and not resume:
            raise ValueError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run or choose "
                             "another --out")
        gen = torch.Generator().manual_seed(tc.seed + 1)  # fixed sample-grid noise, off the training RNG
        grid_n = getattr(self.ctx, "grid_n", 0) or (64 if self.ctx.is_image else 2000)  # video contexts: a few
        grid_noise = torch.randn((grid_n, *self.ctx.shape), generator=gen).to(self.ctx.device)
        grid_cond = ({"labels": (torch.arange(grid_n) % self.ctx.num_classes).to(self.ctx.device)}
                     if self.ctx.num_classes > 0 else None)
        log_path = self.run_dir / "log.jsonl"
        writer = pbar = None
        step = ckpt["step"] if ckpt is not None else 0
        doing, began = step, time.monotonic()  # the step in progress and its start (for a failed collective's report)
        try:
            if ckpt is not None:
                stage = self.restore(ckpt)
            else:
                torch.manual_seed(tc.seed + world.rank)  # each rank its own noise, labels, prompts
                stage = self.build_stage(0)
            if world.main:
                _trim_log(log_path, step)  # (a run resumed before its first checkpoint starts its log again)
            writer = _tensorboard(self.run_dir / "tb") if world.main else None
            pbar = _progress(tc, step) if world.main else None
            acc: dict[str, list[float]] = {}
            t0 = time.perf_counter()
            end = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
            while step < end:
                doing, began = step + 1, time.monotonic()
                while stage.index + 1 < len(self.stages) and step >= self.starts[stage.index + 1]:
                    # the next stage starts from what this one would export, its EMA (docs/methods.md, DMDX)
                    copy_weights(self.student, self.ema)
                    stage = self.build_stage(stage.index + 1)
                local = step - stage.start
                for phase in stage.method.phases():
                    if phase.runs_at(local):
                        for k, v in self.run_phase(stage, phase, step).items():
                            acc.setdefault(k, []).append(v)
                step += 1
                if step % tc.log_every == 0 or step == tc.steps:
                    means = world.mean_floats({k: sum(v) / len(v) for k, v in acc.items()})  # over ranks
                    # every rank samples (FSDP's forward is collective); rank 0's signals are logged
                    with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=tc.bf16):  # as training
                        health = self.health(stage.method, step, pbar if world.main else None)
                    acc.clear()
                    if world.main:  # the one place that logs
                        row = {"step": step, "stage": stage.method.name, **means, **health,
                               "time": time.perf_counter() - t0}
                        with log_path.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        if writer is not None:
                            for k, v in row.items():
                                if isinstance(v, float) and k != "time":
                                    writer.add_scalar(k, v, step)
                        if pbar is not None:
                            pbar.set_postfix({**{k.split("/")[-1]: f"{v:.4g}" for k, v in row.items()
                                                 if k.startswith("loss/")}, **self.health.postfix(row)},
                                             refresh=False)
                if pbar is not None:
                    pbar.update(1)
                stop = self.stop_request(signals) if step < tc.steps else None  # a finished run just finishes
                if stop is not None:
                    self.checkpoint(stage, step, preempted=stop[0])
                    raise self._preempted(stop, step, signals)
                if step % tc.ckpt_every == 0 or step == tc.steps:
                    self.checkpoint(stage, step)
                if tc.snapshot_every > 0 and step % tc.snapshot_every == 0:
                    self.export(self.run_dir / "snapshots" / f"step_{step:07d}")
                if tc.sample_every > 0 and (step % tc.sample_every == 0 or step == tc.steps):
                    self.save_sample_grid(step, grid_noise, grid_cond)
        except RuntimeError as e:
            if world.size > 1 and dist.is_collective_failure(e) and not isinstance(e, NonFiniteLossError):
                where = (f"the last checkpoint is {self.last_ckpt}" if self.last_ckpt
                         else "no checkpoint was written yet")
                report = dist.describe_failure(world, doing, e, time.monotonic() - began,
                                               stop=lambda: bool(signals.received))
                raise RankLostError(f"{report}. Every rank stops ({where}; continue with --resume, "
                                    f"train.dist_timeout={tc.dist_timeout:g} s)") from e
            raise
        finally:
            if pbar is not None:
                pbar.close()
            if writer is not None:
                writer.close()
        return self.run_dir

    def _preempted(self, stop: tuple[str, list[int]], step: int, signals: StopSignals) -> Preempted:
        name, ranks = stop
        who = f" (received by rank(s) {ranks} of {self.world.size})" if self.world.size > 1 else ""
        since = f" {time.monotonic() - signals.at:.1f} s after the signal" if signals.at is not None else ""
        msg = f"preempted by {name}{who} at step {step} of {self.tc.steps}: checkpoint {self.last_ckpt} written{since}"
        return Preempted(msg, step, self.last_ckpt, name)


def _trim_log(log_path: Path, step: int) -> None:
    """Drop log rows after the checkpoint a run resumes from (a killed run logged steps it will redo)."""
    if not log_path.is_file():
        return
    rows = log_path.read_text().splitlines()
    keep = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(keep) != len(rows):
        log_path.write_text("".join(r + "\n" for r in keep))


def _fqn_optim_state(trained: list[tuple[str, nn.Parameter]], osd: dict) -> dict:
    """A ``torch.optim`` state dict keyed by parameter index (one optimiser over the parameters ``trained``, a
    network's ``(name, parameter)`` list) re-keyed by parameter name, as ``torch.distributed.checkpoint.state_dict``
    expects."""
    names = [n for n, _ in trained]
    return {"state": {names[i]: v for i, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}


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


__all__ = ["Trainer", "NonFiniteLossError", "RankLostError", "Preempted", "update_ema", "ema_decay", "copy_weights"]
