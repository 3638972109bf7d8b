#!/bin/bash
# ADM on digits through `dmdx distill --method adm` at the image recipe (anchor on, pairs collected by the run), EMA
# snapshots every 200 iterations, each scored on 1,000 samples (benchmarks/adm-study.md, 'ADM at the defaults').
# usage: benchmarks/adm_study/adm_defaults.sh NAME ITERS [--set k=v ...]   e.g. --set student.times=1,0.75,0.5,0.25
name=$1; iters=$2; shift 2
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
d=${OUT:-runs/adm-study}/img/$name
mkdir -p $(dirname $d)
t0=$(date +%s)
python -m dmdx.cli distill --method adm --teacher src/dmdx/assets/teacher_digits --out $d --steps $iters --quiet \
  --set train.sample_every=0 --set train.snapshot_every=${SNAP:-200} "$@" > $d.log 2>&1 || exit 1
echo "train_s=$(( $(date +%s) - t0 ))" >> $d.log
for s in $d/snapshots/step_*; do
  python -m dmdx.cli eval --model $s --n 1000 --json $s/metrics.json >> $d.log 2>&1
done
python - $d <<'PY' >> $d.log
import json, sys, pathlib
for s in sorted(pathlib.Path(sys.argv[1], "snapshots").glob("step_*")):
    r = json.loads((s / "metrics.json").read_text())
    print(s.name, {k: round(r[k], 3) for k in ("fd", "class_acc", "precision", "recall") if k in r})
PY
