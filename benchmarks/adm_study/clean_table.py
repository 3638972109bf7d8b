"""The table of benchmarks/adm-study.md, 'The study, clean': each branch's critic (from its log) and scores.

    python benchmarks/adm_study/clean_table.py --scores SCORES.jsonl [--from 300] RUN ...
For each run folder (benchmarks/adm_study/clean.sh): the ADM stage's training seconds (log rows after ``--from``),
the critic's accuracy (mean of the stage's last tenth of logs, and the best 5-log mean), its gap
(``critic/adm/gap``: rms(x_real - x_fake) / spread of x_fake, last tenth) and the scores that
``fd_seeds.py --json SCORES.jsonl`` recorded for the run's snapshots (mean over sampling seeds).
"""

import argparse
import json
from pathlib import Path


def stage_rows(run: Path, start: int) -> list[dict]:
    return [r for r in (json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()) if r["step"] > start]


def tail_mean(rows, key) -> float | None:
    v = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not v:
        return None
    w = v[-max(1, len(v) // 10):]
    return sum(w) / len(w)


def best5(rows, key) -> float | None:
    v = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not v:
        return None
    w = min(5, len(v))
    return max(sum(v[i:i + w]) / w for i in range(len(v) - w + 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scores", required=True)
    ap.add_argument("--from", dest="start", type=int, default=300)
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    scores = {}
    for line in Path(args.scores).read_text().splitlines():
        r = json.loads(line)
        scores[r["model"]] = r
    keys = ("fd", "fd_contrastive", "recall", "recall_contrastive", "class_acc")
    print("| run | s (ADM stage) | critic acc end / best | gap | step | " + " | ".join(keys) + " |")
    print("|---|---|---|---|---|" + "---|" * len(keys))
    for run in map(Path, args.runs):
        if not (run / "log.jsonl").is_file():
            continue
        rows = stage_rows(run, args.start)
        t0 = next((r["time"] for r in stage_rows(run, 0) if r["step"] == args.start), 0.0)
        secs = rows[-1]["time"] - t0 if rows else float("nan")
        acc, best, gap = tail_mean(rows, "critic/adm/acc"), best5(rows, "critic/adm/acc"), tail_mean(rows,
                                                                                                 "critic/adm/gap")
        fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
        snaps = sorted(p for p in scores if p.startswith(str(run) + "/snapshots/"))
        for i, snap in enumerate(snaps or [None]):
            s = scores.get(snap, {})
            head = (f"| {run.name} | {secs:.0f} | {fmt(acc, '{:.2f}')} / {fmt(best, '{:.2f}')} | {fmt(gap)} "
                    if i == 0 else "| | | | ")
            step = int(snap.rsplit("_", 1)[1]) if snap else "-"
            print(head + f"| {step} | " + " | ".join(fmt(s.get(k)) for k in keys) + " |")


if __name__ == "__main__":
    main()
