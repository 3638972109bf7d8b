#!/bin/bash
# benchmarks/adm-study.md, 'Trained vector teacher': a built-in MLP teacher on scatter7, then one-step DMDX at the
# vector recipe, DMDX at the paper's defaults (--set recipe=none) and DMD2 at the recipe; 1,000 iterations each.
# usage: benchmarks/adm_study/vector.sh [OUT]   (default runs/adm-study/vector)
set -e
out=${1:-runs/adm-study/vector}
mkdir -p $out
export OMP_NUM_THREADS=1
common="--steps 1000 --quiet --set train.batch_size=256 --set train.sample_every=0 --set train.ckpt_every=100000"
dmdx teacher train --data scatter7 --out $out/teacher --quiet
dmdx eval --model $out/teacher --n 5000 --json $out/teacher.json
for run in "dmdx" "dmdx-paper --set recipe=none" "dmd2"; do
  set -- $run
  name=$1; shift
  method=${name%%-*}
  t0=$(date +%s)
  dmdx distill --method $method --teacher $out/teacher --out $out/$name $common "$@"
  echo "$name train_s=$(( $(date +%s) - t0 ))" >> $out/times.txt
  dmdx eval --model $out/$name --steps 1 --n 5000 --json $out/$name.json
done
