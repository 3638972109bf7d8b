#!/usr/bin/env bash
# One GPU check of the full-size path (issue 34, section 4): at most 8 minutes on one H100.
#
#   bash benchmarks/gpu/check.sh [OUT]        (OUT: $OUT, else /tmp/dmdx-gpu-check)
#
# Writes full-size SD1.5 and SDXL pipeline folders with random float16 weights (the published architectures,
# nothing downloaded), then runs one iteration (every phase once, after a warm-up iteration) of DMD2 per case with
# benchmarks/real_size.py full: seconds per iteration, torch.cuda.max_memory_allocated, the pass floor (the
# network passes of the iteration, each timed alone) and the ratio; beside each, `dmdx plan`'s figure for the same
# settings (run on the CPU cores while the GPU works).  The cases cover every CUDA-only path of the code: NCCL
# (train.parallel=fsdp makes a process group of one), bf16 autocast on CUDA (train.bf16), a bfloat16 teacher, FSDP2's
# CPU offload with pinned memory (train.cpu_offload), LoRA and full fine-tuning, gradient checkpointing on and off.
# The table is OUT/summary.md (python benchmarks/real_size.py summary OUT); each case's log is OUT/NAME.log.
#
# Smoke test without a GPU (tiny pipelines, CPU): SD15=DIR SDXL=DIR SD15_RES=16 SDXL_RES=16 bash benchmarks/gpu/check.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-/tmp/dmdx-gpu-check}}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
SD15_RES=${SD15_RES:-512}
SDXL_RES=${SDXL_RES:-1024}
LIMIT=${CASE_TIMEOUT:-100}  # seconds per case: a case that hangs does not take the others' time
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

folder() {  # name -> a full-size folder with random weights (written once)
  local dir="$OUT/folders/$1"
  [ -f "$dir/model_index.json" ] || python benchmarks/real_size.py write --arch "$1" --out "$dir" --weights > "$OUT/write-$1.log" 2>&1
  echo "$dir"
}
SD15=${SD15:-$(folder sd15)}
SDXL=${SDXL:-$(folder sdxl)}
echo "folders written after $(( $(date +%s) - start )) s"

plans=()
case_() {  # name teacher resolution set...
  local name=$1 teacher=$2 res=$3; shift 3
  local sets=(--set real.resolution="$res" --set train.bf16=true --set train.batch_size=1 "$@")
  local t0=$(date +%s)
  timeout "$LIMIT" python benchmarks/real_size.py full --teacher "$teacher" --method dmd2 "${sets[@]}" \
    --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - start )) s)"
  # the plan of the same run (real_size's fixed settings: 2 steps, no sample grid, no health), on the CPU meanwhile
  python -m dmdx plan --method dmd2 --teacher "$teacher" "${sets[@]}" --set train.steps=2 --set train.sample_every=0 \
    --set train.health_n=0 --memory 80GB --json "$OUT/$name.plan.json" > "$OUT/$name.plan.txt" 2>&1 &
  plans+=($!)
}
L64=(--set real.student_lora.rank=64 --set real.fake_lora.rank=64)
FULL=(--set real.student_lora.rank=0 --set real.fake_lora.rank=0)
GC=(--set real.grad_checkpointing=true)
case_ sd15-lora "$SD15" "$SD15_RES" "${L64[@]}"
case_ sd15-lora-gc "$SD15" "$SD15_RES" "${L64[@]}" "${GC[@]}"
case_ sd15-lora-shared "$SD15" "$SD15_RES" "${L64[@]}" --set real.shared_base=true
case_ sd15-full-gc "$SD15" "$SD15_RES" "${FULL[@]}" "${GC[@]}"
case_ sd15-full-fsdp "$SD15" "$SD15_RES" "${FULL[@]}" "${GC[@]}" --set train.parallel=fsdp
case_ sd15-full-fsdp-offload "$SD15" "$SD15_RES" "${FULL[@]}" "${GC[@]}" --set train.parallel=fsdp --set train.cpu_offload=true
case_ sdxl-lora-gc "$SDXL" "$SDXL_RES" "${L64[@]}" "${GC[@]}"
case_ sdxl-lora-shared "$SDXL" "$SDXL_RES" "${L64[@]}" "${GC[@]}" --set real.shared_base=true
case_ sdxl-lora "$SDXL" "$SDXL_RES" "${L64[@]}" --set real.shared_base=true
echo "waiting for the plans"
wait "${plans[@]}"
python benchmarks/real_size.py summary "$OUT" | tee "$OUT/summary.md"
echo "check done in $(( $(date +%s) - start )) s"
