#!/bin/bash
# Four-step ADM with the regression anchor on digits (benchmarks/adm-study.md): `--method adm` collects no pairs, so
# it runs as DMDX with no ADP stage (method.adp_fraction=0), on pairs collected before (PAIRS, 1,500 at 25 steps).
# usage: PAIRS=folder benchmarks/adm_study/adm4.sh NAME ITERS [--set k=v ...]
name=$1; iters=$2; shift 2
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1
d=${OUT:-runs/adm-study}/img/$name
nice -n 5 python -m dmdx.cli distill --method dmdx --teacher src/dmdx/assets/teacher_digits --out $d --steps $iters \
  --quiet --set train.sample_every=0 --set train.ckpt_every=$((iters / 2)) --set train.snapshot_every=${SNAP:-200} \
  --set student.times=1,0.75,0.5,0.25 --set method.adp_fraction=0 --set pairs.path=$PAIRS "$@" > $d.log 2>&1 || exit 1
for s in $d/snapshots/step_*; do
  nice -n 5 python -m dmdx.cli eval --model $s --steps 4 --n 1000 --json $s/metrics.json >> $d.log 2>&1
done
