#!/bin/bash
# One toy run of benchmarks/adm-study.md: distil, then evaluate the final EMA student (5,000 samples).
# usage: benchmarks/adm_study/toy.sh NAME MIXTURE METHOD ITERS [--set k=v ...]   (outputs under ${OUT:-runs/adm-study})
name=$1; mix=$2; method=$3; iters=$4; shift 4
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1
root=${OUT:-runs/adm-study}/toy
d=$root/$mix/$name
mkdir -p $root/$mix
t0=$(date +%s)
nice -n 5 python -m dmdx.cli distill --method $method --teacher gmm:$mix --out $d --steps $iters --quiet \
  --set train.batch_size=256 --set train.sample_every=0 --set train.ckpt_every=100000 "$@" > $d.log 2>&1 \
  || { echo "FAIL $name" >> $root/summary.txt; exit 1; }
t1=$(date +%s)
nice -n 5 python -m dmdx.cli eval --model $d --steps 1 --n 5000 --json $d.json >> $d.log 2>&1
python - "$d.json" "$mix" "$name" "$((t1-t0))" "$*" <<'PY' >> $root/summary.txt
import json, sys
r = json.load(open(sys.argv[1]))
r = r[0] if isinstance(r, list) else r
if "class_mode_weights" in r:  # a class-conditional mixture: each class against its own modes
    w = " | ".join(f"{c}: " + " ".join(f"{x:.2f}" for x in v) for c, v in r["class_mode_weights"].items())
    head = f"q={r['quality']:.3f} off_class={r['off_class']:.3f} modes={r['modes_covered']} "
else:
    w = " ".join(f"{x:.2f}" for x in r["mode_weights"])
    head = f"q={r['quality']:.3f} modes={r['modes_covered']} we={r['weight_error']:.3f} "
print(sys.argv[2], sys.argv[3], head + f"mwe={r.get('max_weight_error', -1):.3f} sw={r['sw']:.3f} w=" + w,
      f"t={sys.argv[4]}s", sys.argv[5])
PY
