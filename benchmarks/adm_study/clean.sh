#!/bin/bash
# One branch of benchmarks/adm-study.md, 'The study, clean (issue 33)': the ADM stage of a DMDX run replaced, from the
# same ADP checkpoint, by pure ADM (no anchor, no DM term) or by DMD2's DM loss, at one real guidance.
# usage: benchmarks/adm_study/clean.sh BASE NAME SEED KIND DT G [k=v ...]
#   BASE: a finished DMDX run (its checkpoint at the end of ADP is the branch point, benchmarks/adm_study/branch.sh);
#   KIND: adm-none | adm-dmd2 (ADM's generator normalisation, method.adm.grad_norm) | dm (the DM loss in ADM's place:
#   method.adm.gan_g_weight=0, dm_weight=1, same critic phase, rates and warm-up) | recipe (the base's ADM stage as the
#   recipe made it, anchor included, at guidance G); DT: ADM's step (ignored for dm; "recipe" for the base's own);
#   G: the real score's guidance (method.adm.real_guidance); SEED: 0 keeps the checkpoint's RNG, N reseeds it.
# Every branch: heads at the base's x10, the student at ADM's x0.5, 50 critic-only iterations before the student's
# first update (method.adm.critic_warmup), the pairs' guidance kept at the base's 1.5 (ADP is not re-run).
# Output: ${OUT:-runs/adm-study}/br/NAME (scored afterwards with fd_seeds.py; SCORE=0 here).
base=$1; name=$2; seed=$3; kind=$4; dt=$5; g=$6; shift 6
export SCORE=0
common="method.adm.reg_weight=0 method.adm.dm_weight=0 method.adm.critic_warmup=50 method.adm.real_guidance=$g pairs.guidance=1.5"
case $kind in
  adm-none) sets="$common method.adm.dt=$dt method.adm.grad_norm=none";;
  adm-dmd2) sets="$common method.adm.dt=$dt method.adm.grad_norm=dmd2";;
  recipe) sets="method.adm.critic_warmup=50 method.adm.real_guidance=$g pairs.guidance=1.5"
    [ "$dt" != recipe ] && sets="$sets method.adm.dt=$dt";;
  dm) sets="method.adm.reg_weight=0 method.adm.critic_warmup=50 method.adm.real_guidance=$g pairs.guidance=1.5 method.adm.gan_g_weight=0 method.adm.dm_weight=1";;
  *) echo "unknown KIND $kind (adm-none, adm-dmd2, dm, recipe)" >&2; exit 2;;
esac
if [ "$seed" != 0 ]; then export SEED=$seed; else unset SEED; fi
exec "$(dirname "$0")/branch.sh" "$base" "$name" 600 $sets "$@"
