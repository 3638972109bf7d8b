"""Image teachers (digits, mnist16): teacher quality vs steps, then students of each method vs the teacher.

    python benchmarks/images.py --teacher runs/teacher-digits --iters 1500 --out runs/bench-img
Prints markdown tables (pasted into benchmarks/RESULTS.md) and writes results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import evaluate, evaluate_cached, sh, table

COLS = ["model", "steps", "nfe", "fd", "class_acc", "precision", "recall", "ms_per_sample", "train_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", default="runs/bench-img")
    ap.add_argument("--teacher-steps", type=int, nargs="*", default=[1, 2, 4, 8, 16, 50])
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--snapshot-every", type=int, default=0,
                    help="save EMA snapshots during training and report FD against training time")
    ap.add_argument("--method-set", nargs="*", default=[], help="extra --set k=v for every distillation run")
    args = ap.parse_args()
    name = Path(args.teacher).name
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for k in args.teacher_steps:
        r = evaluate_cached(args.teacher, k, args.n, out / f"teacher_{k}.json")
        rows.append({**r, "model": "teacher (heun, CFG)"})
    common = ["--steps", str(args.iters), "--quiet", "--set", f"train.batch_size={args.batch}",
              "--set", f"train.lr={args.lr}", "--set", "train.sample_every=0",
              "--set", f"train.ckpt_every={max(args.iters // 2, 1)}",
              "--set", f"train.snapshot_every={args.snapshot_every}"]
    for kv in args.method_set:
        common += ["--set", kv]
    runs = {
        "dmd2-1step": ["--method", "dmd2"],
        "dmd2-4step": ["--method", "dmd2", "--set", "student.times=1,0.75,0.5,0.25"],
        "adm-1step": ["--method", "adm"],
        "dmdx-1step": ["--method", "dmdx"],
        "adm-4step": ["--method", "adm", "--set", "student.times=1,0.75,0.5,0.25"],
    }
    for run, argv in runs.items():
        if args.only and run not in args.only:
            continue
        run_dir = out / run
        if not (run_dir / "train_seconds.txt").is_file():
            secs = sh(["distill", *argv, "--teacher", args.teacher, "--out", str(run_dir), *common,
                       *(["--resume"] if (run_dir / "config.json").is_file() else [])])
            (run_dir / "train_seconds.txt").write_text(f"{secs:.1f}\n")
        secs = float((run_dir / "train_seconds.txt").read_text())
        steps = 4 if "4step" in run else 1
        rows.append({**evaluate(str(run_dir), steps, args.n, out / f"{run}.json"), "model": run, "train_s": secs})
        curves[run] = curve(run_dir, steps, args.n)
    (out / "results.json").write_text(json.dumps({"rows": rows, "curves": curves}, indent=2))
    print(table(rows, COLS))
    target = next((r["fd"] for r in rows if r.get("kind") == "teacher" and r["steps"] == 50), None)
    for run, pts in curves.items():
        if not pts:
            continue
        print(f"\n{run}: FD during training (EMA snapshots; seconds are training wall-clock from log.jsonl)")
        print(table(pts, ["step", "seconds", "fd", "class_acc", "recall"]))
        hit = next((p for p in pts if target is not None and p["fd"] <= target), None)
        print(f"teacher 50-step FD {target}: " + (f"reached at step {hit['step']} after {hit['seconds']:.0f} s"
                                                   if hit else "not reached"))


def curve(run_dir: Path, steps: int, n: int) -> list[dict]:
    """FD of each EMA snapshot, with the training time at that step (from log.jsonl)."""
    times = {}
    log = run_dir / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            times[row["step"]] = row.get("time")
    pts = []
    for snap in sorted((run_dir / "snapshots").glob("step_*")):
        step = int(snap.name.split("_")[1])
        r = evaluate_cached(str(snap), steps, n, snap / "metrics.json")
        pts.append({"step": step, "seconds": times.get(step), **r})
    return pts


if __name__ == "__main__":
    main()
