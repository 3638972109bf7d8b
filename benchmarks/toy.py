"""Exact Gaussian-mixture teachers: teacher quality vs steps, then one-step students of every method.

    python benchmarks/toy.py --mixture ring8 --iters 3000 --out runs/bench-toy
writes runs/bench-toy/<mixture>/results.json and prints markdown tables (pasted into benchmarks/RESULTS.md).
Every run gets the defaults a user gets (the method's config and the recipe for "gmm" teachers, src/dmdx/recipes.py);
``--lr`` and ``--set k=v`` override them for every run, ``--set recipe=none`` gives the papers' defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import evaluate, evaluate_cached, sh, table

COLS = ["model", "steps", "nfe", "quality", "modes_covered", "weight_error", "max_weight_error", "mode_weights",
        "sw", "ms_per_sample", "train_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mixture", default="ring8")
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="default: the recipe's (or the method's) learning rate")
    ap.add_argument("--out", default="runs/bench-toy")
    ap.add_argument("--only", nargs="*", help="subset of the runs below")
    ap.add_argument("--set", nargs="*", default=[], dest="sets", help="extra --set k=v for every distillation run")
    ap.add_argument("--teacher-steps", type=int, nargs="*", default=[1, 2, 4, 8, 16, 50])
    args = ap.parse_args()
    out = Path(args.out) / args.mixture
    out.mkdir(parents=True, exist_ok=True)
    teacher = f"gmm:{args.mixture}"
    rows = []
    for k in args.teacher_steps:
        r = evaluate_cached(teacher, k, args.n, out / f"teacher_{k}.json")
        rows.append({**r, "model": "exact teacher (heun)"})
    common = ["--steps", str(args.iters), "--quiet", "--set", f"train.batch_size={args.batch}",
              "--set", "train.sample_every=0", "--set", "train.ckpt_every=100000"]
    if args.lr is not None:
        common += ["--set", f"train.lr={args.lr}"]
    for kv in args.sets:
        common += ["--set", kv]
    runs = {
        "dmd2": ["--method", "dmd2"],
        "dmd2-critic1": ["--method", "dmd2", "--set", "method.critic_every=1"],
        "dmd2-nogan": ["--method", "dmd2", "--set", "method.gan=false"],
        "dmd": ["--method", "dmd"],
        "dmd-critic5": ["--method", "dmd", "--set", "method.critic_every=5"],
        "adm": ["--method", "adm"],
        "dmdx": ["--method", "dmdx"],
        "dmdx-pure-gan": ["--method", "dmdx", "--set", "method.adp.reg_weight=0", "--set", "method.adm.reg_weight=0"],
    }
    for name, argv in runs.items():
        if args.only and name not in args.only:
            continue
        run_dir = out / name
        if not (run_dir / "model.json").is_file():
            secs = sh(["distill", *argv, "--teacher", teacher, "--out", str(run_dir), *common])
            (run_dir / "train_seconds.txt").write_text(f"{secs:.1f}\n")
        secs = float((run_dir / "train_seconds.txt").read_text())
        r = evaluate(str(run_dir), 1, args.n, out / f"{name}.json")
        rows.append({**r, "model": f"{name} student", "train_s": secs})
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows, COLS))


if __name__ == "__main__":
    main()
