"""Real size: ``dmdx plan`` against measured runs, and one iteration of full-size architectures on the CPU.

    python benchmarks/real_size.py tiny [--families sd sdxl ...] [--methods dmd2 adm dmdx]
        planned vs measured peaks on the tiny pipelines of every family (benchmarks/real-size.md, "Tiny pipelines")
    python benchmarks/real_size.py write --arch sd15 --out DIR [--weights]
        a full-size pipeline folder from the published configs (configs only, or random float16 weights)
    python benchmarks/real_size.py full --teacher DIR --method dmd2 [--set KEY=VALUE ...] [--json FILE]
        one iteration of a full-size run (every phase once, after a warm-up iteration): seconds, peak memory (RSS
        over the baseline before the run is built, and the CPU allocator's peak from two more iterations under the
        profiler; on a GPU torch.cuda.max_memory_allocated), the sum of the network passes involved
    python benchmarks/real_size.py summary OUT
        the table of benchmarks/gpu/check.sh's folder OUT (measured against `dmdx plan`)

"Measured" on the tiny pipelines: the same storage tracker the plan uses, on the real tensors of a real run (the
second execution of every phase, so that gradients and optimiser states exist as in the steady state); the run
and the plan are set up alike (``dmdx distill``'s config with the family's recipe).  On full-size runs: the
process's resident memory, sampled every 20 ms, over its value before the run is built; and the allocator's peak
(``allocator_peaks``: PyTorch's profiler, independent of the plan's tracker), which is what the plan models.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

IMAGE_FAMILIES = ("sd", "sdxl", "sd3", "flux")
VIDEO_FAMILIES = ("cogvideox", "wan")
METHODS = ("dmd2", "adm", "dmdx")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """The peak resident memory of this process inside the block, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def run_config(method: str, teacher: Path, root: Path, overrides: list[str], video: bool):
    """``dmdx distill``'s config of ``method`` on ``teacher`` with the family's recipe and ``overrides``."""
    from dmdx.config import apply_overrides
    from dmdx.teachers import apply_recipe
    from dmdx.train.run import default_run_config

    cfg = default_run_config(method)
    cfg.teacher, cfg.real.prompts = str(teacher), str(root / "prompts.txt")
    cfg.data = str(root / ("videos" if video else "images"))
    base = ["train.steps=2", "train.sample_every=0", "train.progress=false", "train.health_n=0",
            "pairs.steps=2", "pairs.n=2"]
    apply_overrides(cfg, base + overrides)
    apply_recipe(cfg, {o.split("=", 1)[0] for o in base + overrides})
    return cfg


def real_data(root: Path, px: tuple[int, int], video_frames: int | None = None) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "prompts.txt").write_text("a photo of a cat\na red car on a road\n")
    if video_frames:
        import av

        (root / "videos").mkdir(exist_ok=True)
        for i in range(2):
            with av.open(str(root / "videos" / f"{i}.mp4"), "w") as out:
                s = out.add_stream("mpeg4", rate=8)
                s.width, s.height, s.pix_fmt = px[1], px[0], "yuv420p"
                for _ in range(video_frames):
                    frame = av.VideoFrame.from_ndarray((rng.random((*px, 3)) * 255).astype("uint8"), format="rgb24")
                    out.mux(s.encode(frame))
                out.mux(s.encode())
    else:
        (root / "images").mkdir(exist_ok=True)
        for i in range(4):
            Image.fromarray((rng.random((*px, 3)) * 255).astype("uint8")).save(root / "images" / f"{i}.png")


def host_tensors(ctx) -> list:
    """The tensors the plan counts apart as the host's (prompt bank, teacher pairs, real latents)."""
    host = [*(ctx.cond_bank or {}).values(), getattr(ctx.data, "x", None)]
    if ctx.pairs is not None:
        host += [ctx.pairs.noise, ctx.pairs.x0, ctx.pairs.labels]
    return [t for t in host if t is not None]


def measured_phase_peaks(cfg, run_dir: Path) -> list[dict]:
    """Per phase, the peak bytes of every tensor alive (the plan's tracker, on real tensors) during its second
    execution; the host tensors (prompt bank, pairs, real latents) apart, as in the plan."""
    from dmdx.teachers import build_run
    from dmdx.train.loop import Trainer
    from dmdx.train.plan import _Tracker

    ctx, info = build_run(cfg, run_dir)
    trainer = Trainer(run_dir, cfg.method, cfg.train, ctx, info)
    rows = []
    for index, (cls, _, _) in enumerate(trainer.stages):
        stage = trainer.build_stage(index)
        for phase in stage.method.phases():  # warm-up: optimiser states and gradients as in the steady state
            trainer.run_phase(stage, phase, stage.start)
        tracker = _Tracker()
        tracker.add_live()
        for t in host_tensors(ctx):
            if t is not None:
                tracker._relabel(tracker.records[tracker.index[t.untyped_storage()._cdata]], "host")
        with tracker:
            for phase in stage.method.phases():
                tracker.phase = (cls.name, phase.name)
                trainer.run_phase(stage, phase, stage.start)
                tracker.phase = None
        rows += [{"stage": s, "phase": p, "measured": peak} for (s, p), (peak, _) in tracker.peaks.items()]
        del stage
    return rows


def tiny(families, methods) -> None:
    from dmdx.teachers.image.tiny import make_tiny_pipeline
    from dmdx.teachers.video.tiny import make_tiny_video_pipeline
    from dmdx.train.plan import plan_run

    torch.set_num_threads(1)
    print("| family | method | stage | phase | planned (KiB) | measured (KiB) | planned / measured |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for fam in families:
        for method in methods:
            with tempfile.TemporaryDirectory() as d:
                root = Path(d)
                video = fam in VIDEO_FAMILIES
                if video:
                    pipe = make_tiny_video_pipeline(fam, root / fam)
                    real_data(root, (16, 16), video_frames=9)
                    extra = ["video.frames=9", "video.height=16", "video.width=16"]
                else:
                    pipe = make_tiny_pipeline(fam, root / fam)
                    real_data(root, (16, 16))
                    extra = []
                over = ["train.batch_size=2", "real.student_lora.rank=4", "real.fake_lora.rank=4", *extra]
                cfg = run_config(method, pipe, root, over, video)
                torch.manual_seed(0)
                measured = measured_phase_peaks(cfg, root / "run")
                plan = plan_run(run_config(method, pipe, root, over, video), device="cpu")
                planned = {(p.stage, p.phase): p.peak for p in plan.phases}
                for r in measured:
                    pl = planned[(r["stage"], r["phase"])]
                    print(f"| {fam} | {method} | {r['stage']} | {r['phase']} | {pl / 1024:.1f} | "
                          f"{r['measured'] / 1024:.1f} | {pl / r['measured']:.3f} |", flush=True)


def drift(family: str, method: str, steps: int) -> None:
    """How far a shared base moves training from LoRA copies, against how far ``train.bf16`` moves it: one tiny
    pipeline run per (shared base, bf16) pair, same seed and data; the relative distance of the trained LoRA's
    zero-initialised factors (``lora_B``) between runs."""
    from safetensors.torch import load_file

    from dmdx.teachers import build_run
    from dmdx.teachers.image.tiny import make_tiny_pipeline
    from dmdx.train.loop import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pipe = make_tiny_pipeline(family, root / family)
        real_data(root, (16, 16))
        trained = {}
        for shared in (False, True):
            for bf16 in (False, True):
                over = [f"train.steps={steps}", "train.batch_size=2", "train.lr=1e-3", "real.student_lora.rank=4",
                        "real.fake_lora.rank=4", f"real.shared_base={str(shared).lower()}",
                        f"train.bf16={str(bf16).lower()}"]
                cfg = run_config(method, pipe, root, over, video=False)
                run_dir = root / f"run-{shared}-{bf16}"
                torch.manual_seed(0)
                ctx, info = build_run(cfg, run_dir)
                out = Trainer(run_dir, cfg.method, cfg.train, ctx, info).run()
                trained[shared, bf16] = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()
                                         if "lora_B" in k}

    def dist(a, b):
        return float(sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt() / sum((b[k] ** 2).sum() for k in a).sqrt())

    print(f"{family} {method}, {steps} iterations: |LoRA B - LoRA B'| / |LoRA B'|")
    print(f"  shared base vs copies, float32 compute : {dist(trained[True, False], trained[False, False]):.3f}")
    print(f"  shared base vs copies, train.bf16     : {dist(trained[True, True], trained[False, True]):.3f}")
    print(f"  copies: train.bf16 vs float32         : {dist(trained[False, True], trained[False, False]):.3f}")
    print(f"  shared base: train.bf16 vs float32    : {dist(trained[True, True], trained[True, False]):.3f}")


def write(arch: str, out: Path, weights: bool) -> None:
    from dmdx.teachers.image import published as image
    from dmdx.teachers.video import published as video

    mod = image if arch in image.PUBLISHED else video
    print(mod.write_published(arch, out, weights=weights))


def full(teacher: Path, method: str, overrides: list[str], out_json: Path | None, reps: int,
         memory_only: bool = False) -> dict:
    """One iteration (every phase once) of a full-size run after a warm-up iteration; the pass floor.
    ``memory_only``: only the allocator's peaks (its first profiled iteration is the warm-up) and the RSS during
    them; no timing, no floor."""
    import statistics

    from dmdx.pipelines.video import is_video_folder
    from dmdx.teachers import build_run
    from dmdx.train import dist
    from dmdx.train.loop import Trainer
    from dmdx.models import device_of

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="real-size-"))
    video = is_video_folder(teacher)
    cfg = run_config(method, teacher, root, overrides, video)
    if video:
        from dmdx.pipelines.video import geometry

        g = geometry(teacher, cfg.video.frames, cfg.video.height, cfg.video.width)
        real_data(root, (g.height, g.width), video_frames=g.frames)
    else:
        from dmdx.pipelines.image import latent_shape, vae_scale_factor

        c, h, w = latent_shape(teacher, cfg.real.resolution)
        vs = vae_scale_factor(teacher)
        real_data(root, (h * vs, w * vs))
    base = rss()
    # train.parallel=fsdp/ddp without torchrun: a process group of one (NCCL on a GPU), as `dmdx distill` makes it
    world = dist.setup(cfg.train.parallel, device_of(cfg.train.device), cfg.train.dist_timeout)
    with RSSPeak() as setup_peak:
        ctx, info = build_run(cfg, root / "run")
        trainer = Trainer(root / "run", cfg.method, cfg.train, ctx, info, world=world)
    cuda = ctx.device.type == "cuda"
    rows = []
    for index, (cls, _, _) in enumerate(trainer.stages):
        stage = trainer.build_stage(index)
        if memory_only:  # the profiler's first iteration is the warm-up
            with RSSPeak() as peak:
                alloc = allocator_peaks(trainer, stage, host_tensors(ctx))
            rows.append({"stage": cls.name, "peak_gib": (peak.peak - base) / 2**30,
                         "allocator_peak_gib": alloc["peak"] / 2**30,
                         "allocator_phases_gib": {k: v / 2**30 for k, v in alloc["phases"].items()},
                         "live_before_gib": alloc["live_before"] / 2**30, "host_gib": alloc["host"] / 2**30,
                         "missed_frees_gib": alloc["missed_frees"] / 2**30})
            del stage
            continue
        t_warm = time.perf_counter()
        for phase in stage.method.phases():  # warm-up: first calls, optimiser states
            trainer.run_phase(stage, phase, stage.start)
        sync(cuda)
        warm = time.perf_counter() - t_warm
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # the student's no-grad passes: one per critic phase for a one-step student; a k-step student's backward
        # simulation adds a random number (DMD2's student_x0) that the floor counts as made
        nograd = [0]
        hook = ctx.student.register_forward_pre_hook(
            lambda *_: nograd.__setitem__(0, nograd[0] + (not torch.is_grad_enabled())))
        with RSSPeak() as peak:
            secs, cpu = {}, {}
            for phase in stage.method.phases():
                t0, c0 = time.perf_counter(), time.process_time()
                trainer.run_phase(stage, phase, stage.start)
                sync(cuda)
                secs[phase.name] = time.perf_counter() - t0
                cpu[phase.name] = time.process_time() - c0
        hook.remove()
        alloc = None if cuda else allocator_peaks(trainer, stage, host_tensors(ctx))
        row = {"stage": cls.name, "seconds": secs, "iteration_s": sum(secs.values()), "warmup_s": warm,
               "cpu_seconds": cpu, "iteration_cpu_s": sum(cpu.values()), "peak_gib": (peak.peak - base) / 2**30}
        if cuda:
            row["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            row["allocator_peak_gib"] = alloc["peak"] / 2**30
            row["allocator_phases_gib"] = {k: v / 2**30 for k, v in alloc["phases"].items()}
            row["live_before_gib"], row["host_gib"] = alloc["live_before"] / 2**30, alloc["host"] / 2**30
            row["missed_frees_gib"] = alloc["missed_frees"] / 2**30
        row["floor"], row["floor_cpu"] = pass_floor(ctx, stage, reps, cuda, cfg.train.bf16)
        row["student_nograd_passes"] = nograd[0]
        row["floor_s"] = floor_seconds(stage, row["floor"], nograd[0])
        row["ratio"] = row["iteration_s"] / row["floor_s"]
        # the same in CPU time of the process (all its threads): on a shared machine the load of other processes
        # stretches wall-clock times unevenly; CPU time counts only this process's work
        row["floor_cpu_s"] = floor_seconds(stage, row["floor_cpu"], nograd[0])
        row["ratio_cpu"] = row["iteration_cpu_s"] / row["floor_cpu_s"]
        rows.append(row)
        del stage
    result = {"teacher": str(teacher), "method": method, "overrides": overrides, "threads": torch.get_num_threads(),
              "device": str(ctx.device), "parallel": world.parallel,
              "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
              "setup_peak_gib": (setup_peak.peak - base) / 2**30, "stages": rows,
              "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(json.dumps(result, indent=2), flush=True)
    if out_json:
        out_json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def live_storages() -> dict[int, int]:
    """Bytes of every CPU tensor storage the garbage collector finds, by data pointer."""
    import gc

    gc.collect()
    out = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            st = obj.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


def allocator_peaks(trainer, stage, host: list) -> dict:
    """Two more iterations under PyTorch's profiler (``profile_memory``): the CPU allocator's peak in the second, per
    phase and overall, in bytes.  The CPU's counterpart of ``torch.cuda.max_memory_allocated``: tensors only, not the
    allocator's free lists or the libraries' scratch; independent of the plan's tracker.

    The profiler reports the running total of the allocations and frees it saw from its start, and cannot see the
    size of a block allocated before it (last iteration's gradients, freed at the next ``zero_grad``).  So the bytes
    alive at the start (every storage the garbage collector finds; the host tensors ``host`` apart, as in the plan)
    are added, and the first iteration only lets every such block be freed: the frees the profiler missed (the
    bytes alive at the start plus its running total at the end, minus those alive at the end) are all made before the
    second iteration, which is the one measured."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    host_ptrs = {t.untyped_storage().data_ptr() for t in host if t.device.type == "cpu"}
    before = live_storages()
    host_bytes = sum(n for p, n in before.items() if p in host_ptrs)
    live = sum(before.values()) - host_bytes
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for it in range(2):
            for phase in stage.method.phases():
                with record_function(f"phase{it}:{phase.name}"):
                    trainer.run_phase(stage, phase, stage.start)
    after = sum(live_storages().values()) - host_bytes
    # the profiler's event tree, not its chrome trace (a JSON file of every operation: gigabytes at full size)
    mem, spans, todo = [], [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            mem.append((node.start_time_ns, node.extra_fields.total_allocated))
        elif node.tag == _EventType.TorchOp and node.name.startswith("phase1:"):
            spans.append((node.name.split(":", 1)[1], node.start_time_ns, node.end_time_ns))
    mem.sort()
    missed = live + mem[-1][1] - after  # frees of blocks older than the profiler
    peaks = {name: live - missed + max((a for ts, a in mem if t0 <= ts <= t1), default=0) for name, t0, t1 in spans}
    return {"live_before": live, "host": host_bytes, "missed_frees": missed, "phases": peaks,
            "peak": max(peaks.values())}


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


# The network passes one iteration (every phase once) makes, per method and phase (B = the per-rank batch):
#   S+ student forward + backward (its weights), S student forward (no grad), T2 teacher forward with CFG (2B),
#   T teacher forward, Ti teacher forward + backward to its input (a discriminator's features), F fake-score
#   forward, F+ fake score forward + backward (its weights), Fi fake score forward + backward to its input;
#   a trailing * runs inside ADM's float32 block (method.adm.float32_steps: float32 copies of a bf16 teacher).
# A g after the network's letter (Fg+, Fgi: DMD2's GAN terms) is a pass whose backward starts at the GAN head's
# features (the fake score's bottleneck, ``method.bottleneck``), not at the output: forward and backward run only the
# layers up to the features (``Denoiser.features`` stops the forward there).  ADM's and ADP's heads (Ti, Fi) are
# still counted as whole backward passes, an upper bound of their floor.
# A student with k > 1 steps adds no-grad student passes (backward simulation): ``full`` counts the student's no-grad
# calls in the measured iteration and puts that many S in the floor.  Heads are small and not counted.
PASSES = {
    "dmd2": {"student": ["S+", "T2", "F", "Fgi"], "critic": ["S", "F+", "Fg+", "Fg+"]},
    "adm": {"student": ["S+", "Fi*", "Ti*"], "critic": ["S", "T2*", "F*", "T*", "T*", "F+"]},
    "adp": {"student": ["S+", "Ti"], "critic": ["S", "T", "T"]},
}


def floor_seconds(stage, floor: dict, student_nograd: int | None = None) -> float:
    """The sum of the passes of the stage's phases (``PASSES``), each at its measured time; with ``student_nograd``
    the student's no-grad passes ``S`` as counted in the iteration (a multi-step student's backward simulation)."""
    keys = [k for phase in stage.method.phases() for k in PASSES[stage.method.name][phase.name]]
    if student_nograd is not None:
        keys = [k for k in keys if k != "S"] + ["S"] * student_nograd
    return sum(floor[k] for k in keys)


def pass_floor(ctx, stage, reps: int, cuda: bool = False, bf16: bool = False) -> dict:
    """Seconds of every network pass the stage's phases make (``PASSES``), each timed on its own with the phase's
    shapes, under the run's autocast: the floor an iteration cannot beat (a phase's loss adds element-wise work
    around these passes).  Returns (wall-clock seconds, CPU seconds of the process) per pass."""
    import contextlib

    B = ctx.batch_size
    method = stage.method
    nets = {"S": ctx.student, "T": ctx.teacher, "F": getattr(method, "fake_score", None)}
    f32 = getattr(method, "steps_precision", contextlib.nullcontext)

    def run(key):
        net, mode = nets[key[0]], key[1:].rstrip("*")
        tapped = [method.bottleneck] if mode.startswith("g") else None
        mode = mode.removeprefix("g")
        n = 2 * B if mode == "2" else B
        x = ctx.noise(n).requires_grad_(mode == "i")
        t = torch.full((n,), 0.5, dtype=torch.float64)
        flags = [(p, p.requires_grad) for p in net.parameters()]
        net.requires_grad_(mode == "+")  # as the loop sets it for a phase that trains the network
        grad = mode in ("+", "i")
        try:
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16), \
                    f32() if key.endswith("*") else contextlib.nullcontext(), torch.set_grad_enabled(grad):
                if tapped:  # as DMD2.logits: the pass stops at the bottleneck
                    out = net.features(x, t, ctx.cond(n), tapped)[0]
                else:
                    out = net(x, t, ctx.cond(n), guidance=3.0) if mode == "2" else net(x, t, ctx.cond(n))
                if grad:
                    out.float().square().mean().backward()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def timed(key):
        if cuda:
            run(key)  # a first call (allocations, kernel choices) is not timed
            sync(cuda)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            run(key)
        sync(cuda)
        return (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps

    keys = sorted({k for phase in method.phases() for k in PASSES[method.name][phase.name]})
    out = {k: timed(k) for k in keys}
    for net in (n for n in nets.values() if n is not None):
        net.zero_grad(set_to_none=True)
    return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}


def summary(out: Path) -> None:
    """The table of a ``benchmarks/gpu/check.sh`` folder: per case, measured against planned."""
    print("| case | device | s / iteration | pass floor (s) | ratio | measured peak (GiB) | planned peak (GiB) "
          "| planned / measured |\n|---|---|---|---|---|---|---|---|")
    for f in sorted(out.glob("*.json")):
        if f.name.endswith(".plan.json"):
            continue
        name = f.stem
        r = json.loads(f.read_text())
        plan_file = out / f"{name}.plan.json"
        planned = json.loads(plan_file.read_text())["peak"] / 2**30 if plan_file.is_file() else float("nan")
        for st in r["stages"]:
            measured = st.get("cuda_max_allocated_gib", st.get("allocator_peak_gib", st["peak_gib"]))
            print(f"| {name} ({st['stage']}) | {r.get('device', '?')} | {st['iteration_s']:.3f} | {st['floor_s']:.3f} "
                  f"| {st['ratio']:.2f} | {measured:.2f} | {planned:.2f} | {planned / measured:.3f} |")
    failed = [f.stem for f in sorted(out.glob("*.log")) if not (out / f"{f.stem}.json").is_file()
              and not f.stem.startswith("write-") and not f.stem.endswith(".plan")]
    if failed:
        print(f"\nno result (see OUT/NAME.log): {', '.join(failed)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tiny")
    p.add_argument("--families", nargs="+", default=[*IMAGE_FAMILIES, *VIDEO_FAMILIES])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p = sub.add_parser("write")
    p.add_argument("--arch", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--weights", action="store_true")
    p = sub.add_parser("full")
    p.add_argument("--teacher", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--json")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--memory-only", action="store_true", help="the allocator's peaks only (no warm-up, no timing, "
                   "no floor)")
    p = sub.add_parser("summary")
    p.add_argument("out")
    p = sub.add_parser("drift", help="a shared base against LoRA copies, beside train.bf16, on a tiny pipeline")
    p.add_argument("--family", default="sd", choices=IMAGE_FAMILIES)
    p.add_argument("--method", default="dmd2")
    p.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if args.cmd == "tiny":
        tiny(args.families, args.methods)
    elif args.cmd == "summary":
        summary(Path(args.out))
    elif args.cmd == "drift":
        drift(args.family, args.method, args.steps)
    elif args.cmd == "write":
        write(args.arch, Path(args.out), args.weights)
    else:
        full(Path(args.teacher), args.method, args.overrides, Path(args.json) if args.json else None, args.reps,
             args.memory_only)


if __name__ == "__main__":
    main()
