"""Seconds per distillation iteration and peak memory, per tiny random diffusers family and method (CPU).

    OMP_NUM_THREADS=1 python benchmarks/diffusers_bench.py [--bf16]    # prints the markdown table

Each (family, method) runs in a fresh process so that ru_maxrss is that run's peak resident memory.  The run is set
up as ``dmdx distill --method M --teacher PIPE --prompts p.txt --data IMGS`` does: the default config with the
family's recipe applied and the default bfloat16 teacher; only the budget is changed (``train.batch_size=2``,
7 iterations: 1 warm-up, 6 timed).  The mean is over iterations as the ratio runs them: DMD2's student phase runs
on iterations 0 (warm-up), 5 (critic ratio 5: SDXL, SD3, Flux) or 10 (ratio 10: SD), so it is in 1 / 0 of the 6.
Teacher pairs are collected before the timing starts (their n follows the budget, 14 pairs, 50 Heun steps).
``train.sample_every=0``: the default would add a 64-sample grid at the last iteration to the timing.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = ("sd", "sdxl", "sd3", "flux")  # sd_v costs what sd costs
METHODS = ("dmd", "dmd2", "adm", "adp", "dmdx")
TIMED = 6


def one(family: str, method: str, root: Path, bf16: bool) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from dmdx.teachers import apply_recipe
    from dmdx.teachers.image.tiny import make_tiny_pipeline
    from dmdx.train.loop import Trainer
    from dmdx.teachers import build_run
    from dmdx.train.run import default_run_config

    torch.set_num_threads(1)
    pipe = make_tiny_pipeline(family, root / family)
    (root / "p.txt").write_text("a red cat\na blue dog\n")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / "imgs" / f"{i}.png")
    cfg = default_run_config(method)
    cfg.teacher, cfg.data, cfg.real.prompts = str(pipe), str(root / "imgs"), str(root / "p.txt")
    cfg.train.steps, cfg.train.batch_size, cfg.train.progress = TIMED + 1, 2, False
    cfg.train.sample_every = 0
    cfg.train.bf16 = bf16
    apply_recipe(cfg, {"train.steps", "train.batch_size", "train.sample_every", "train.bf16"})
    ctx, info = build_run(cfg, root / "run")
    tr = Trainer(root / "run", cfg.method, cfg.train, ctx, info)
    tr.run(stop_after=1)  # warm-up iteration (first calls allocate)
    t = time.perf_counter()
    tr.run(resume=True)
    secs = (time.perf_counter() - t) / TIMED
    return {"family": family, "method": method, "s_per_iter": secs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    if len(sys.argv) == 4:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(one(sys.argv[1], sys.argv[2], Path(d), sys.argv[3] == "bf16")))
        sys.exit(0)
    mode = "bf16" if "--bf16" in sys.argv else "fp32"  # --bf16: with train.bf16=true (autocast)
    print("| family | method | s / iteration | peak RSS (MB) |\n|---|---|---|---|")
    for fam in FAMILIES:
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, fam, method, mode], capture_output=True, text=True)
            if out.returncode:
                print(f"| {fam} | {method} | failed | {out.stderr.strip().splitlines()[-1][:80]} |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {fam} | {method} | {r['s_per_iter']:.3f} | {r['peak_rss_mb']:.0f} |", flush=True)
