"""Evaluate saved EMA snapshots of toy runs: python benchmarks/adm_study/evalsnaps.py RUN/snapshots/step_0000500 ..."""

import sys

from dmdx.evaluate import evaluate
from dmdx.teachers import load_model

for path in sys.argv[1:]:
    r = evaluate(load_model(path), 1, 5000)
    print(path, f"q={r['quality']:.3f} modes={r['modes_covered']} tv={r['weight_error']:.3f} "
          f"max={r['max_weight_error']:.3f} sw={r['sw']:.3f} w=" + " ".join(f"{x:.2f}" for x in r['mode_weights']),
          flush=True)
