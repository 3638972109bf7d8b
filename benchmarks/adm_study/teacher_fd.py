"""FD of students against their teacher's own samples: the distillation gap, apart from the teacher's gap to data.

    python benchmarks/adm_study/teacher_fd.py --teacher T [--n 1000] [--steps 50] [--guidance G] [--cache DIR]
        MODEL_OR_RUN ...
A RUN folder stands for its last EMA snapshot (RUN/snapshots/step_*), RUN@600 for that of iteration 600.  Features:
the dataset's evaluation classifier (as ``dmdx eval``: fd, precision, recall) and its contrastive encoder (the
second judge: fd_c, recall_c).  The teacher's samples (at ``--guidance``, default the teacher's own) use seed 1 and
the students seed 0, each with labels cycling 0..9; the first row, the teacher with seed 0 against seed 1, is the
noise floor of this FD at ``--n``.  A student distilled from a guided teacher is judged against that guided
teacher's samples, which is what it is trained to match (its FD to data also counts the guidance's own distance).
The teacher's features are cached (``teacher_fd_N_STEPS_gG.pt``, plain tensors) in ``--cache`` (default: the
teacher's folder) for later calls.
"""

import argparse
from pathlib import Path

import torch
from fd_seeds import resolve  # RUN[@STEP] -> snapshot folder (same directory)

from dmdx.eval import get_classifier, get_contrastive
from dmdx.eval.images import _batched, frechet_distance, precision_recall
from dmdx.models import generate
from dmdx.teachers import load_model


def features(model, n, steps, seed, nets, guidance=None):
    s = generate(model, n, steps, seed=seed, guidance=guidance)
    x = s.x.detach().float().nan_to_num(0.0).clamp(-1, 1)
    return [_batched(net.features, x) for net in nets]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, help="the teacher's CFG scale (default: its own)")
    ap.add_argument("--cache", help="folder for the teacher's cached features (default: the teacher's folder)")
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    teacher = load_model(args.teacher)
    nets = [get_classifier(teacher.info.data)[0].cpu().eval(), get_contrastive(teacher.info.data)[0].cpu().eval()]
    g = teacher.info.guidance if args.guidance is None else args.guidance
    cache = Path(args.cache or args.teacher) / f"teacher_fd_{args.n}_{args.steps}_g{g}.pt"
    if cache.is_file():
        ref, floor = torch.load(cache, weights_only=True)
    else:
        ref = features(teacher, args.n, args.steps, 1, nets, g)
        floor = features(teacher, args.n, args.steps, 0, nets, g)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((ref, floor), cache)
    rows = [(f"teacher, {args.steps} steps, guidance {g}, seed 0", floor)]
    for spec in args.models:
        path = resolve(spec)
        rows.append((str(path), features(load_model(path), args.n, None, 0, nets)))
    print(f"| model | against the teacher's {args.steps}-step samples at guidance {g}: fd | precision | recall | "
          "fd_c | recall_c |")
    print("|---|---|---|---|---|---|")
    for name, f in rows:
        prec, rec = precision_recall(ref[0], f[0])
        _, rec_c = precision_recall(ref[1], f[1])
        print(f"| {name} | {frechet_distance(ref[0], f[0]):.3f} | {prec:.3f} | {rec:.3f} | "
              f"{frechet_distance(ref[1], f[1]):.3f} | {rec_c:.3f} |", flush=True)


if __name__ == "__main__":
    main()
