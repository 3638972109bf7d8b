"""Wall-clock of each EMA snapshot of a run since the run started, pairs and set-up included, with its metrics.

    python benchmarks/adm_study/walltime.py RUN ...
The start is the mtime of RUN/config.json (written before the pairs are collected); a snapshot's time is the
mtime of its folder.  Pair collection = the last pairs file's mtime minus the start.  Metrics: the
snapshot's metrics.json written by benchmarks/images.py.
"""

import json
import sys
from pathlib import Path

for run in map(Path, sys.argv[1:]):
    t0 = (run / "config.json").stat().st_mtime
    pf = sorted((run / "pairs").glob("pairs_*.safetensors")) if (run / "pairs").is_dir() else []
    pairs_s = max(p.stat().st_mtime for p in pf) - t0 if pf else 0.0
    print(f"{run}: pairs {pairs_s:.0f} s")
    print("| step | wall s (pairs incl.) | fd | class_acc | precision | recall |")
    print("|---|---|---|---|---|---|")
    for snap in sorted((run / "snapshots").glob("step_*")):
        m = snap / "metrics.json"
        if not m.is_file():
            continue
        r = json.loads(m.read_text())
        wall = (snap / "model.safetensors").stat().st_mtime - t0
        print(f"| {int(snap.name.split('_')[1])} | {wall:.0f} | {r['fd']:.3f} | {r['class_acc']:.3f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} |")
