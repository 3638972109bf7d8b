"""Distributed benchmarks on CPU (benchmarks/distributed.md).

``python benchmarks/dist_bench.py speed OUT``: iterations/s of DMD2 and DMDX on digits, 1 process x 2 threads vs
2 processes x 1 thread (``dmdx distill --nproc 2``), from the runs' log.jsonl (training time only, set-up excluded).

``torchrun --standalone --nproc_per_node 2 benchmarks/dist_bench.py memory OUT``: bytes per rank of the parameters,
gradients and optimiser states of the student, fake score and teacher under ddp and fsdp (DMD2 on digits, after
two iterations, measured from the tensors' local shards).

``python benchmarks/dist_bench.py preempt OUT``: SIGTERM to a training ``dmdx distill`` (one process, and
``--nproc 2`` under ddp and fsdp) of DMD2 on digits and on a tiny SD pipeline, once it has logged 3 steps: the
seconds from the signal to the checkpoint (as the run prints it) and to the command's exit, its status, and the size
of the preemption checkpoint.

``python benchmarks/dist_bench.py fsync OUT``: milliseconds per single-process checkpoint (three 1024x1024 linear
layers with their AdamW states, 24 MB) written into OUT with the fsyncs and with them switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TEACHER = str(Path(__file__).resolve().parents[1] / "src" / "dmdx" / "assets" / "teacher_digits")
COMMON = ["--teacher", TEACHER, "--quiet", "--set", "train.sample_every=0", "--set", "train.ckpt_every=100000",
          "--set", "train.log_every=2", "--set", "pairs.n=256", "--set", "pairs.steps=10", "--set",
          "train.batch_size=16"]


def its_per_s(run: Path) -> float:
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    a, b = rows[0], rows[-1]  # from the first logged step on (the first iterations warm up)
    return (b["step"] - a["step"]) / (b["time"] - a["time"])


def speed(out: Path, steps: int = 12) -> None:
    rows = []
    for method in ("dmd2", "dmdx"):
        for label, threads, nproc in (("1 process x 2 threads", "2", None), ("2 processes x 1 thread", "1", 2)):
            run = out / f"{method}_{nproc or 1}p"
            cmd = [sys.executable, "-m", "dmdx", "distill", "--method", method, "--out", str(run), "--steps",
                   str(steps), *COMMON, *([] if nproc is None else ["--nproc", str(nproc)])]
            if run.exists():
                import shutil

                shutil.rmtree(run / "checkpoints", ignore_errors=True)
                (run / "log.jsonl").unlink(missing_ok=True)
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": threads})
            rows.append({"method": method, "layout": label, "it/s": its_per_s(run)})
            print(rows[-1], flush=True)
    (out / "speed.json").write_text(json.dumps(rows, indent=2) + "\n")


def memory(out: Path) -> None:
    import torch

    from dmdx.train import dist
    from dmdx.train.loop import Trainer
    from dmdx.teachers import build_run
    from dmdx.train.run import default_run_config

    rows = []
    for mode in ("ddp", "fsdp"):
        cfg = default_run_config("dmd2")
        cfg.teacher = TEACHER
        cfg.train.steps, cfg.train.batch_size, cfg.train.parallel = 2, 32, mode
        cfg.train.progress, cfg.train.sample_every, cfg.train.ckpt_every = False, 0, 100000
        run = out / f"mem_{mode}"
        world = dist.setup(mode, torch.device("cpu"))
        with dist.rank_zero_first(world):
            ctx, info = build_run(cfg, run)
        tr = Trainer(run, cfg.method, cfg.train, ctx, info, world=world)
        stage = tr.build_stage(0)
        for step in range(2):
            for phase in stage.method.phases():
                if phase.runs_at(step):
                    tr.run_phase(stage, phase, step)
        nets = {"student": stage.trainables["student"], "fake_score": stage.trainables["fake_score"],
                "gan_head": stage.trainables["gan_head"], "ema": tr.ema, "teacher": ctx.teacher_net}
        for name, net in nets.items():
            params = list(net.parameters())
            opt = stage.optims.get(name)
            states = [v for s in (opt.state.values() if opt else []) for v in s.values() if torch.is_tensor(v)]
            rows.append({"mode": mode, "rank": world.rank, "network": name,
                         "params_MB": dist.local_bytes(params) / 2**20,
                         "grads_MB": dist.local_bytes([p.grad for p in params]) / 2**20,
                         "optim_MB": dist.local_bytes(states) / 2**20})
    every = [None] * world.size
    torch.distributed.all_gather_object(every, rows)
    if world.main:
        flat = [r for rs in every for r in rs]
        (out / "memory.json").write_text(json.dumps(flat, indent=2) + "\n")
        for r in flat:
            print(r)
    dist.teardown()


def tiny_pipeline(out: Path) -> list[str]:
    """A tiny random SD pipeline and two prompts; DMD2 without its GAN (which would need real images)."""
    from dmdx.teachers.tiny import make_tiny_pipeline

    if not (out / "pipe" / "model_index.json").is_file():
        make_tiny_pipeline("sd", out / "pipe")
    (out / "prompts.txt").write_text("a red cat\na blue dog\n")
    return ["--teacher", str(out / "pipe"), "--prompts", str(out / "prompts.txt"), "--quiet", "--set",
            "method.gan=false", "--set", "train.batch_size=4", "--set", "train.health_n=0", "--set",
            "train.log_every=1"]


def preempt(out: Path) -> None:
    import re
    import shutil
    import signal
    import time

    setups = {"digits": [*COMMON, "--set", "train.log_every=1"], "tiny SD pipeline": tiny_pipeline(out)}
    rows = []
    for name, common in setups.items():
        for nproc, parallel in ((None, "none"), (2, "ddp"), (2, "fsdp")):
            run = out / f"preempt_{name.split()[0]}_{parallel}"
            shutil.rmtree(run, ignore_errors=True)
            cmd = [sys.executable, "-m", "dmdx", "distill", "--method", "dmd2", "--out", str(run), "--steps", "100000",
                   *common, "--set", f"train.parallel={'auto' if parallel == 'none' else parallel}",
                   *([] if nproc is None else ["--nproc", str(nproc)])]
            err = open(out / f"{run.name}.err", "w")
            proc = subprocess.Popen(cmd, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1" if nproc else "2"})
            log = run / "log.jsonl"
            while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
                if proc.poll() is not None:
                    raise RuntimeError(f"{run.name} ended first: see {err.name}")
                time.sleep(0.05)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            status = proc.wait()
            seconds = time.monotonic() - t0
            err.close()
            text = (out / f"{run.name}.err").read_text()
            found = re.search(r"at step (\d+) of \d+: checkpoint (\S+) written ([0-9.]+) s after the signal", text)
            if found is None:
                raise RuntimeError(f"{run.name}: no preemption message (status {status}): see {err.name}")
            ckpt = Path(found.group(2))
            size = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
            rows.append({"run": name, "processes": nproc or 1, "parallel": parallel, "step": int(found.group(1)),
                         "signal_to_checkpoint_s": float(found.group(3)), "signal_to_exit_s": round(seconds, 2),
                         "status": status, "checkpoint_MB": round(size / 2**20, 2)})
            print(rows[-1], flush=True)
    (out / "preempt.json").write_text(json.dumps(rows, indent=2) + "\n")


def fsync_cost(out: Path, saves: int = 5) -> None:
    import shutil
    import time

    import torch

    from dmdx.train import checkpoint

    nets = {name: torch.nn.Linear(1024, 1024) for name in ("student", "fake_score", "ema")}
    optims = {name: torch.optim.AdamW(net.parameters()) for name, net in nets.items()}
    for net in nets.values():
        net(torch.randn(2, 1024)).sum().backward()
    for opt in optims.values():
        opt.step()
    synced = checkpoint._fsync
    for label, fsync in (("with fsync", synced), ("without fsync", lambda path: None)):
        checkpoint._fsync = fsync
        shutil.rmtree(out / "fsync", ignore_errors=True)
        t = time.perf_counter()
        for step in range(1, saves + 1):
            checkpoint.save_checkpoint(out / "fsync", step, 0, nets, optims, {})
        print(f"{label}: {(time.perf_counter() - t) / saves * 1000:.0f} ms per checkpoint", flush=True)
    checkpoint._fsync = synced


if __name__ == "__main__":
    what, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"speed": speed, "memory": memory, "preempt": preempt, "fsync": fsync_cost}[what](out)
