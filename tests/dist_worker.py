"""One rank of the distributed tests (tests/test_dist.py launches two of these, under torchrun or directly).

``python dist_worker.py main OUT P K``: gradients of each DMD2 phase under ddp, the average of gradients only rank
1 has, a ddp and an fsdp run of the same seed, the ddp run again with SIGTERM sent to rank 1 during step K
(preempted there) and resumed, the resume of the single-process run in P on two ranks, then ``dmdx distill`` with
a NaN injected on rank 1 (the process exits with the CLI's status).  ``kill OUT``: ``dmdx distill`` with rank 1
SIGKILLed after its step-4 checkpoint on torchrun's first attempt.  ``video OUT PIPE PROMPTS VIDEOS``: a tiny Wan
pipeline's ``dmdx distill`` under fsdp, then resumed from its first checkpoint.  A folder ``surrogate`` next to OUT
is copied into every run folder (the analytic teacher's fitted MLP, a cache that is otherwise fitted again for each
run).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from helpers import state_of, tiny_config


def seed_dir(run_dir: Path, surrogate: Path) -> Path:
    if surrogate.is_dir() and not (run_dir / "surrogate").exists():
        shutil.copytree(surrogate, run_dir / "surrogate")
    return run_dir


def trainer(cfg, run_dir):
    from dmdx.train import dist
    from dmdx.train.loop import Trainer
    from dmdx.teachers import build_run

    world = dist.setup(cfg.train.parallel, torch.device("cpu"), cfg.train.dist_timeout)
    with dist.rank_zero_first(world):
        ctx, info = build_run(cfg, seed_dir(Path(run_dir), Path(run_dir).parent.parent / "surrogate"))
    return Trainer(Path(run_dir), cfg.method, cfg.train, ctx, info, world=world)


def capture_grads(tr, stage, phase, seed: int) -> dict:
    grads = {}
    for name in phase.trains:
        def step(*_, _name=name):
            net = tr.ckpt_nets(stage)[_name]
            grads.update({f"{_name}.{k}": p.grad.detach().clone() for k, p in net.named_parameters()
                          if p.grad is not None})
        stage.optims[name].step = step
    torch.manual_seed(seed)
    tr.run_phase(stage, phase, 0)
    return grads


def full_states(tr) -> dict:
    """Student and EMA as full tensors (gathered under fsdp), on every rank."""
    out = {}
    for name, net in (("student", tr.student), ("ema", tr.ema)):
        out[name] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                     for k, v in net.state_dict().items()}
    return out


def branch_net() -> torch.nn.ModuleDict:
    """A body, a head only samples of label 1 go through, and a head nothing uses."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"body": torch.nn.Linear(4, 3), "head": torch.nn.Linear(3, 1),
                                "unused": torch.nn.Linear(3, 1)})


def branch_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's 8 samples, all of label r: rank 0's batch never takes the head's branch."""
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(100 + rank)), torch.full((8,), rank)


def branch_loss(net, x, y) -> torch.Tensor:
    h = net["body"](x)
    out = h.sum(1)
    if bool((y == 1).any()):  # a branch taken by data: the head gets no gradient on a batch without label 1
        out = out + torch.where(y == 1, net["head"](h).squeeze(1), torch.zeros(()))
    return (out ** 2).mean()


def uneven_grads(world) -> dict:
    net = branch_net()
    branch_loss(net, *branch_batch(world.rank)).backward()
    had = sorted(k for k, p in net.named_parameters() if p.grad is not None)
    world.average_gradients(list(net.parameters()))
    return {"had": had, "grads": {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}}


def preempted_run(cfg, run_dir: Path, at: int) -> dict:
    """The ddp run of ``cfg`` with SIGTERM sent to rank 1 during step ``at`` (a real signal, from itself); then
    resumed from the checkpoint that stop wrote, by a fresh trainer, to the end."""
    from dmdx.train.loop import Preempted

    rank = int(os.environ["RANK"])
    tr = trainer(cfg, run_dir)
    if rank == 1:
        run_phase = tr.run_phase

        def signalled(stage, phase, step):
            if step == at - 1:  # 0-based: the at-th step
                os.kill(os.getpid(), signal.SIGTERM)
            return run_phase(stage, phase, step)

        tr.run_phase = signalled
    try:
        tr.run()
        raise AssertionError("the run was not preempted")
    except Preempted as e:
        stopped = {"step": e.step, "path": str(e.path), "message": str(e),
                   "state": (e.path / "state.json").read_text()}  # kept only until the resumed run prunes it
    del tr
    tr = trainer(cfg, run_dir)
    tr.run(resume=True)
    return {"stopped": stopped, "final": full_states(tr)}


def main(out: Path, single_run: Path, preempt_at: int) -> int:
    rank = int(os.environ["RANK"])
    # 1. gradients of each DMD2 phase, averaged over two ranks (rank r draws with seed 100 + r)
    cfg = tiny_config("dmd2", steps=4, grad_clip=0.0, parallel="ddp")
    tr = trainer(cfg, out / "grads")
    torch.manual_seed(cfg.train.seed + rank)
    stage = tr.build_stage(0)
    res = {}
    for phase in stage.method.phases():
        res[phase.name] = capture_grads(tr, stage, phase, 100 + rank)
    torch.save(res, out / f"grads_{rank}.pt")
    torch.save(uneven_grads(tr.world), out / f"uneven_{rank}.pt")
    # 2. ddp and fsdp runs of one seed at world size 2 (checkpoints at 3 and 6); the ddp run again, preempted
    for mode in ("ddp", "fsdp"):
        cfg = tiny_config("dmd2", steps=6, ckpt_every=3, parallel=mode)
        tr = trainer(cfg, out / mode)
        tr.run()
        states = full_states(tr)
        if rank == 0:
            torch.save(states, out / f"{mode}_final.pt")
    cfg = tiny_config("dmd2", steps=6, ckpt_every=3, parallel="ddp")
    torch.save(preempted_run(cfg, out / "preempted", preempt_at), out / f"preempted_{rank}.pt")
    # 3. a single-process run (old checkpoint format, step 3) resumed on two ranks, sharded
    cfg = tiny_config("dmd2", steps=6, ckpt_every=3, parallel="fsdp")
    tr = trainer(cfg, single_run)
    tr.run(resume=True, stop_after=0)  # restore only
    states = full_states(tr)
    if rank == 0:
        torch.save(states, out / "resumed_1to2_start.pt")
    tr.run(resume=True)
    states = full_states(tr)
    if rank == 0:
        torch.save(states, out / "resumed_1to2_final.pt")
    # 4. a NaN on rank 1 only, through the CLI (the trainers above let go first: the CLI's teardown frees them)
    del tr, stage
    return cli(out / "nan", "nan")


def cli(out: Path, mode: str) -> int:
    from dmdx import cli as dmdx_cli
    from dmdx.methods.dmd2 import DMD2
    from dmdx.train.loop import Trainer

    rank = int(os.environ["RANK"])
    if rank == 0:
        seed_dir(out, out.parent.parent / "surrogate")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        (out.parent / f"{out.name}.restarted_{rank}").touch()
    if mode == "nan" and rank == 1:
        orig = DMD2.critic_loss
        calls = [0]

        def poisoned(self):
            calls[0] += 1
            loss, logs = orig(self)
            if calls[0] >= 3:
                (out.parent / "nan_at").write_text(str(time.time()))
                return loss * float("nan"), logs
            return loss, logs

        DMD2.critic_loss = poisoned
    if mode == "kill" and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        orig_ckpt = Trainer.checkpoint

        def checkpoint(self, stage, step):
            orig_ckpt(self, stage, step)
            if step == 4:
                os.kill(os.getpid(), signal.SIGKILL)

        Trainer.checkpoint = checkpoint
    args = ["distill", "--method", "dmd2", "--teacher", "gmm:ring8", "--out", str(out), "--quiet",
            "--steps", "8", "--set", "recipe=none", "--set", "surrogate_steps=20", "--set", "train.batch_size=16",
            "--set", "train.ckpt_every=2", "--set", "train.sample_every=0", "--set", "train.log_every=1",
            "--set", "method.critic_every=2"]
    code = dmdx_cli.main(args)
    (out.parent / f"exit_{rank}").write_text(str(time.time()))
    return code


def video(out: Path, pipe: str, prompts: str, videos: str) -> int:
    """``dmdx distill --method dmd2`` of a tiny Wan pipeline under fsdp (the recipe's bf16 teacher, gradient
    checkpointing, 4 student times; student and critic every step) for 2 steps with checkpoints at 1 and 2, then
    the same run resumed from its step-1 checkpoint.  Each transformer block is its own FSDP unit, as the blocks of
    a full-size model are."""
    from dmdx import cli as dmdx_cli
    from dmdx.train import dist

    dist.UNIT_MIN_PARAMS = 1
    rank = int(os.environ["RANK"])
    run = out / "run"
    args = ["distill", "--method", "dmd2", "--teacher", pipe, "--prompts", prompts, "--data", videos,
            "--out", str(run), "--steps", "2", "--quiet", "--set", "train.parallel=fsdp", "--set", "train.batch_size=2",
            "--set", "train.ckpt_every=1", "--set", "train.log_every=1", "--set", "train.health_n=0",
            "--set", "method.critic_every=1", "--set", "video.frames=9", "--set", "video.height=16",
            "--set", "video.width=16"]
    teardown, dist.teardown = dist.teardown, lambda: None  # one group for both commands (no re-rendezvous)
    code = dmdx_cli.main(args)
    if code:
        return code
    if rank == 0:  # the uninterrupted run's result; then back to its step-1 checkpoint
        shutil.copy(run / "model.safetensors", out / "uninterrupted.safetensors")
        shutil.copy(run / "log.jsonl", out / "uninterrupted.jsonl")
        shutil.move(run / "checkpoints" / "step_0000002", out / "uninterrupted_step_0000002")
        (run / "model.safetensors").unlink()
    dist.current().barrier()
    dist.teardown = teardown
    return dmdx_cli.main(args + ["--resume"])


if __name__ == "__main__":
    what, out = sys.argv[1], Path(sys.argv[2])
    if what == "main":
        sys.exit(main(out, Path(sys.argv[3]), int(sys.argv[4])))
    if what == "video":
        sys.exit(video(out, *sys.argv[3:6]))
    else:
        sys.exit(cli(out, what))
