"""FD / recall of a model over several sampling seeds: how much of a difference in FD is the sampling noise.

    python benchmarks/adm_study/fd_seeds.py [--seeds 5] [--n 1000] [--steps 50] MODEL_OR_RUN[@STEP] ...
A RUN folder stands for its last EMA snapshot (RUN/snapshots/step_*), RUN@600 for the snapshot of iteration 600.
``--steps`` applies to teachers only (students use their own times).  Each seed draws ``--n`` samples (labels
cycling 0..9, as ``dmdx eval``) and is scored by ``dmdx.eval.image_metrics`` against the test split; the table gives
the mean and the standard deviation over seeds, and each seed's FD.
"""

import argparse
import statistics
from pathlib import Path

import torch

from dmdx.eval import image_metrics
from dmdx.eval.images import get_classifier
from dmdx.models import generate
from dmdx.teachers import load_model


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"| model | fd mean +- sd over {args.seeds} seeds, n = {args.n} | recall mean +- sd | fd per seed |")
    print("|---|---|---|---|")
    for spec in args.models:
        path = resolve(spec)
        model = load_model(path)
        clf = get_classifier(model.info.data)
        steps = None if model.info.kind == "student" else args.steps
        fds, recs = [], []
        for seed in range(args.seeds):
            s = generate(model, args.n, steps, seed=seed)
            m = image_metrics(s.x, s.labels, model.info.data, classifier=clf)
            fds.append(m["fd"])
            recs.append(m["recall"])
        sd = statistics.stdev if args.seeds > 1 else (lambda v: 0.0)
        print(f"| {path} | {statistics.mean(fds):.3f} +- {sd(fds):.3f} | {statistics.mean(recs):.3f} +- "
              f"{sd(recs):.3f} | {' '.join(f'{f:.3f}' for f in fds)} |", flush=True)


if __name__ == "__main__":
    main()
