"""FD / recall of a model over several sampling seeds, in both feature spaces: how much of a difference is noise.

    python benchmarks/adm_study/fd_seeds.py [--seeds 5] [--n 1000] [--steps 50] [--guidance G] [--json OUT]
        MODEL_OR_RUN[@STEP] ...
A RUN folder stands for its last EMA snapshot (RUN/snapshots/step_*), RUN@600 for the snapshot of iteration 600.
``--steps`` and ``--guidance`` apply to teachers only (students use their own times; their CFG is distilled in).
Each seed draws ``--n`` samples (labels cycling 0..9, as ``dmdx eval``) and is scored against the test split by
``dmdx.eval.image_metrics`` (the evaluation classifier: fd, class_acc, recall) and
``dmdx.eval.contrastive_metrics`` (the contrastive encoder: fd_contrastive, recall_contrastive); the table gives
the mean and the standard deviation over seeds.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from dmdx.eval import contrastive_metrics, get_classifier, get_contrastive, image_metrics
from dmdx.models import generate
from dmdx.teachers import load_model

KEYS = ("fd", "fd_contrastive", "recall", "recall_contrastive", "class_acc")


def resolve(spec: str) -> Path:
    path, _, step = spec.partition("@")
    p = Path(path)
    if (p / "snapshots").is_dir():
        snaps = sorted((p / "snapshots").glob("step_*"))
        if step:
            snaps = [s for s in snaps if int(s.name.split("_")[1]) == int(step)]
        if not snaps:
            raise SystemExit(f"{spec}: no such snapshot")
        return snaps[-1]
    return p


def score(model, n: int, steps, seeds: int, guidance=None) -> dict:
    """Mean and standard deviation over sampling seeds of every key of ``KEYS``."""
    clf, enc = get_classifier(model.info.data), get_contrastive(model.info.data)
    vals = {k: [] for k in KEYS}
    for seed in range(seeds):
        s = generate(model, n, steps, seed=seed, guidance=guidance)
        m = {**image_metrics(s.x, s.labels, model.info.data, classifier=clf),
             **contrastive_metrics(s.x, model.info.data, encoder=enc)}
        for k in KEYS:
            vals[k].append(m[k])
    sd = statistics.stdev if seeds > 1 else (lambda v: 0.0)
    return {k: (statistics.mean(v), sd(v)) for k, v in vals.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, help="teachers: the CFG scale (default: the teacher's)")
    ap.add_argument("--json", help="append one JSON line per model to this file")
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"| model | {' | '.join(KEYS)} (mean +- sd over {args.seeds} sampling seeds, n = {args.n}) |")
    print("|---|" + "---|" * len(KEYS))
    for spec in args.models:
        path = resolve(spec)
        model = load_model(path)
        teacher = model.info.kind != "student"
        r = score(model, args.n, args.steps if teacher else None, args.seeds, args.guidance if teacher else None)
        print(f"| {path} | " + " | ".join(f"{m:.3f} +- {s:.3f}" for m, s in r.values()) + " |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"model": str(path), "steps": args.steps if teacher else None,
                                    "guidance": args.guidance if teacher else None, "seeds": args.seeds, "n": args.n,
                                    **{k: m for k, (m, _) in r.items()}, **{f"{k}_sd": s for k, (_, s) in r.items()}})
                        + "\n")


if __name__ == "__main__":
    main()
