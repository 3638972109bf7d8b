#!/bin/bash
# One digits run of benchmarks/adm-study.md through benchmarks/images.py (EMA snapshots every 100 iterations, 1,000
# samples per evaluation, lr 1e-4 = the default, batch 64 = the default); the teacher's 50-step FD is 0.856.
# usage: benchmarks/adm_study/img.sh NAME RUN ITERS [--set-value k=v ...]   RUN: dmd2-1step dmdx-1step adm-4step ...
# TEACHER=FOLDER for another teacher than the shipped digits one (e.g. runs/teacher-mnist16)
# outputs under ${OUT:-runs/adm-study}/img/NAME (log: NAME.log)
name=$1; run=$2; iters=$3; shift 3
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1
root=${OUT:-runs/adm-study}/img
mkdir -p $root
ms=(); [ $# -gt 0 ] && ms=(--method-set "$@")
nice -n 5 python benchmarks/images.py --teacher ${TEACHER:-src/dmdx/assets/teacher_digits} --iters $iters --n 1000 \
  --out $root/$name --teacher-steps --snapshot-every ${SNAP:-100} --only $run "${ms[@]}" > $root/$name.log 2>&1
