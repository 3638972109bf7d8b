"""Seconds per distillation iteration and peak memory, per tiny random video family and method (CPU).

    OMP_NUM_THREADS=1 python benchmarks/video_bench.py     # prints the table of benchmarks/video.md

Each (family, method, checkpointing) runs in a fresh process so that ru_maxrss is that run's peak resident memory.
The config is what ``dmdx distill`` resolves at its defaults (bf16 teacher, the kind's recipe: CogVideoX ADM /
DMDX 8 student steps, Wan 4 steps, gradient checkpointing on), batch 2, 9 frames of 16x16 pixels.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(family: str, method: str, gc: bool, root: Path) -> dict:
    import torch

    from dmdx.config import TrainConfig
    from dmdx.data.video import write_video
    from dmdx.teachers import apply_recipe
    from dmdx.teachers.video.tiny import make_tiny_video_pipeline
    from dmdx.train.loop import Trainer
    from dmdx.teachers import build_run
    from dmdx.train.run import default_run_config

    torch.set_num_threads(1)
    pipe = make_tiny_video_pipeline(family, root / family)
    (root / "p.txt").write_text("a red cat runs\na blue bird flies over hills\n")
    (root / "vids").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        write_video(root / "vids" / f"{i}.mp4", torch.rand(3, 9, 16, 16, generator=g) * 2 - 1)
    cfg = default_run_config(method)
    cfg.teacher, cfg.real.prompts = str(pipe), str(root / "p.txt")
    cfg.data = str(root / "vids") if method == "dmd2" else None
    cfg.video.frames, cfg.video.height, cfg.video.width = 9, 16, 16
    cfg.pairs.n, cfg.pairs.steps = 4, 2
    cfg.train = TrainConfig(steps=6, batch_size=2, log_every=1, ckpt_every=1000, sample_every=0, progress=False)
    apply_recipe(cfg, {"pairs.n", "pairs.steps"})
    cfg.real.grad_checkpointing = gc
    ctx, info = build_run(cfg, root / "run")
    tr = Trainer(root / "run", cfg.method, cfg.train, ctx, info)
    tr.run(stop_after=1)  # warm-up iteration (first calls allocate)
    t = time.perf_counter()
    tr.run(resume=True)
    secs = (time.perf_counter() - t) / 5
    return {"family": family, "method": method, "gc": gc, "times": len(cfg.student.times), "s_per_iter": secs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    if len(sys.argv) == 4:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(one(sys.argv[1], sys.argv[2], sys.argv[3] == "1", Path(d))))
        sys.exit(0)
    print("| family | method | student steps | grad checkpointing | s / iteration | peak RSS (MB) |\n"
          "|---|---|---|---|---|---|")
    for fam in ("cogvideox", "wan"):
        for method in ("adm", "dmd2", "dmdx"):
            for gc in ("1", "0"):
                out = subprocess.run([sys.executable, __file__, fam, method, gc], capture_output=True, text=True)
                if out.returncode:
                    print(f"| {fam} | {method} | | {gc} | failed | {out.stderr.strip().splitlines()[-1][:80]} |")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {fam} | {method} | {r['times']} | {'on' if r['gc'] else 'off'} | {r['s_per_iter']:.3f} | "
                      f"{r['peak_rss_mb']:.0f} |", flush=True)
