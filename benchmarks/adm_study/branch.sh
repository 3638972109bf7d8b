#!/bin/bash
# One ADM stage of benchmarks/adm-study.md ('MNIST 16x16: what gets past ADP's output') from a shared ADP stage.
# usage: benchmarks/adm_study/branch.sh BASE NAME AT [k=v ...]
#   BASE: a finished DMDX run folder (img.sh) whose checkpoint at the end of ADP is kept (img.sh checkpoints at half
#   the run, which is where ADP ends at the default adp_fraction); NAME: the new run, ${OUT:-runs/adm-study}/br/NAME;
#   AT: the snapshot scored at the end (fd_seeds.py NAME@AT, five sampling seeds).
# The new run is BASE's folder up to that checkpoint (its log rows up to there, its pairs and snapshots), resumed with
# `dmdx distill --resume --set k=v ...`: ADP is not repeated, and every branch starts from the same student, critics
# and RNG state.  A resumed CPU run continues exactly as an uninterrupted one (tests/test_train.py).
# SEED=N: another training seed for the branch (the checkpoint's RNG state is replaced by torch.manual_seed(N)'s: the
# same student and critics, other noise, times and labels from there on); SCORE=0: no fd_seeds.py at the end.
base=$1; name=$2; at=$3; shift 3
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1
steps=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['train']['steps'])" "$base/config.json")
ckpt=$(printf "step_%07d" $((steps / 2)))
[ -d "$base/checkpoints/$ckpt" ] || { echo "$base has no checkpoint $ckpt" >&2; exit 1; }
root=${OUT:-runs/adm-study}/br
d=$root/$name
rm -rf "$d" && mkdir -p "$d/checkpoints" "$d/snapshots"
cp -r "$base/config.json" "$base/health_ref.json" "$base/pairs" "$d/"
cp -r "$base/checkpoints/$ckpt" "$d/checkpoints/"
for s in "$base"/snapshots/step_*; do [ "${s##*_}" -le $((10#${ckpt#step_})) ] 2>/dev/null && cp -r "$s" "$d/snapshots/"; done
python - "$base/log.jsonl" "$d/log.jsonl" $((steps / 2)) <<'PY'
import json, sys
rows = [line for line in open(sys.argv[1]) if json.loads(line)["step"] <= int(sys.argv[3])]
open(sys.argv[2], "w").writelines(rows)
PY
if [ -n "$SEED" ]; then python - "$d/checkpoints/$ckpt/optim.pt" "$SEED" <<'PY'
import sys, torch
state = torch.load(sys.argv[1], weights_only=True)
torch.manual_seed(int(sys.argv[2]))
state["extra"]["rng"] = torch.get_rng_state()
torch.save(state, sys.argv[1])
PY
fi
sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
t0=$(date +%s)
nice -n 5 python -m dmdx.cli distill --method dmdx --out "$d" --resume --quiet "${sets[@]}" > "$d.log" 2>&1
echo "training s $(( $(date +%s) - t0 ))" >> "$d.log"
[ "${SCORE:-1}" = 0 ] || python benchmarks/adm_study/fd_seeds.py "$d@$at" > "$d.fd" 2>&1
