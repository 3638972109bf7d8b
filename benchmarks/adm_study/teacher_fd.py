"""FD of students against their teacher's own samples: the distillation gap, apart from the teacher's gap to data.

    python benchmarks/adm_study/teacher_fd.py --teacher T [--n 1000] [--steps 50] MODEL_OR_RUN ...
A RUN folder stands for its last EMA snapshot (RUN/snapshots/step_*), RUN@600 for that of iteration 600.  Features: the dataset's evaluation classifier
(as ``dmdx eval``).  The teacher's samples use seed 1 and the students seed 0, each with labels cycling 0..9; the
first row, the teacher at ``--steps`` with seed 0 against seed 1, is the noise floor of this FD at ``--n``.
The teacher's features are cached next to it (``teacher_fd_N_STEPS.pt``, plain tensors) for later calls.
"""

import argparse
from pathlib import Path

import torch
from fd_seeds import resolve  # RUN[@STEP] -> snapshot folder (same directory)

from dmdx.eval.images import (
    _batched,
    frechet_distance,
    get_classifier,
    precision_recall,
)
from dmdx.models import generate
from dmdx.teachers import load_model


def features(model, n, steps, seed, clf):
    s = generate(model, n, steps, seed=seed)
    return _batched(clf.features, s.x.detach().float().nan_to_num(0.0).clamp(-1, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    teacher = load_model(args.teacher)
    clf, _ = get_classifier(teacher.info.data)
    clf = clf.cpu().eval()
    cache = Path(args.teacher) / f"teacher_fd_{args.n}_{args.steps}.pt"
    if cache.is_file():
        ref, floor = torch.load(cache, weights_only=True)
    else:
        ref, floor = features(teacher, args.n, args.steps, 1, clf), features(teacher, args.n, args.steps, 0, clf)
        torch.save((ref, floor), cache)
    rows = [(f"teacher, {args.steps} steps, seed 0", floor)]
    for spec in args.models:
        path = resolve(spec)
        rows.append((str(path), features(load_model(path), args.n, None, 0, clf)))
    print(f"| model | fd to the teacher's {args.steps}-step samples | precision | recall |")
    print("|---|---|---|---|")
    for name, f in rows:
        prec, rec = precision_recall(ref, f)
        print(f"| {name} | {frechet_distance(ref, f):.3f} | {prec:.3f} | {rec:.3f} |")


if __name__ == "__main__":
    main()
