"""Seconds per distillation iteration and peak memory, per tiny random diffusers family and method (CPU).

    OMP_NUM_THREADS=1 python benchmarks/diffusers_bench.py > benchmarks/diffusers.md

Each (family, method) runs in a fresh process so that ru_maxrss is that run's peak resident memory.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(family: str, method: str, root: Path) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import make_trainer, tiny_config

    from dmdx.teachers.tiny import make_tiny_pipeline

    torch.set_num_threads(1)
    pipe = make_tiny_pipeline(family, root / family)
    (root / "p.txt").write_text("a red cat\na blue dog\n")
    cfg = tiny_config(method, teacher=str(pipe), steps=6, batch_size=2)
    cfg.real.prompts, cfg.real.teacher_dtype = str(root / "p.txt"), "float32"
    cfg.pairs.n, cfg.pairs.steps, cfg.pairs.solver = 4, 2, "euler"
    cfg.student.times = [1.0]
    if method == "dmd2":
        cfg.method.gan = False  # no --data here: DM + fake-score DSM only
    tr = make_trainer(cfg, root / "run")
    tr.run(stop_after=1)  # warm-up iteration (first calls allocate)
    t = time.perf_counter()
    tr.run(resume=True)
    secs = (time.perf_counter() - t) / 5
    return {"family": family, "method": method, "s_per_iter": secs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    if len(sys.argv) == 3:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(one(sys.argv[1], sys.argv[2], Path(d))))
        sys.exit(0)
    print("| family | method | s / iteration | peak RSS (MB) |\n|---|---|---|---|")
    for fam in ("sd", "sdxl", "sd3", "flux"):
        for method in ("dmd2", "adm", "dmdx"):
            out = subprocess.run([sys.executable, __file__, fam, method], capture_output=True, text=True)
            if out.returncode:
                print(f"| {fam} | {method} | failed | {out.stderr.strip().splitlines()[-1][:80]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {fam} | {method} | {r['s_per_iter']:.3f} | {r['peak_rss_mb']:.0f} |", flush=True)
