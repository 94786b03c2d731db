#!/usr/bin/env bash
# What one short GPU lease runs (minutes, one command), most important first:
#   1. benchmarks/gpu.py (training img/s of the paper's 12M and 46M steps, the anonymizer) within
#      GPU_BUDGET_S, its JSON in OUT/gpu.json;
#   2. the shipped model's run, training/configs/utkface_gpu128.yaml, at base widths 64 and 128 side
#      by side on the one GPU (each is launch-bound at these sizes, so they share it well) until
#      DEADLINE_S after the start, less the time the exports take; a run that fails in its first two
#      minutes is started again in fp32 (bf16-mixed has never run on a GPU here before);
#   3. the exports (benchmarks/gpu_export.py: 128x128 and the same run's 64x64), the width-64 run's
#      last.ckpt in 15 MiB parts (a later lease resumes from it: `cat last.ckpt.part-* > last.ckpt`),
#      and logs, CSV metrics, sample grids and configs in OUT/lease.tar.gz.
#
#   bash benchmarks/gpu_lease.sh OUT DATA_ROOT [DEADLINE_S=560] [GPU_BUDGET_S=150]
# DATA_ROOT: fdf-build output (only train/ is needed); python3 must have the project's dependencies.
# TRAIN_ARGS: more fdf-train options, last (e.g. "--trainer.accelerator cpu" to try the script on a CPU).
set -u
OUT=${1:?output folder}
DATA=${2:?fdf-build output folder}
DEADLINE_S=${3:-560}
GPU_BUDGET_S=${4:-150}
EXPORT_S=45
START=$(date +%s)
RUNS=runs/gpu
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[lease $(elapsed)s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$RUNS/nvidia-smi.csv" 2>&1
DEVICE=$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')")
say "device: $DEVICE"

say "gpu.py, budget ${GPU_BUDGET_S}s"
timeout $((GPU_BUDGET_S + 40)) python3 benchmarks/gpu.py --budget_s "$GPU_BUDGET_S" --sections training anonymizer \
    > "$OUT/gpu.json" 2> "$RUNS/gpu.log"
say "gpu.py rc=$? $(head -c 3000 "$OUT/gpu.json")"

train() {  # width precision seconds
    local w=$1 precision=$2 seconds=$3
    timeout $((seconds + 60)) python3 -m training.cli --config training/configs/utkface_gpu128.yaml --data.root "$DATA" \
        --run_dir "$RUNS/w$w" --trainer.logger.init_args.save_dir "$RUNS/w$w" --model.network.base_width "$w" \
        --trainer.precision "$precision" --trainer.enable_progress_bar false \
        --trainer.max_time "$(printf '00:00:%02d:%02d' $((seconds / 60)) $((seconds % 60)))" ${TRAIN_ARGS:-} \
        >> "$RUNS/w$w.log" 2>&1
}

run_width() {  # width: bf16-mixed, or fp32 when bf16 fails at once
    local w=$1 t0 left
    t0=$(date +%s)
    left=$(( DEADLINE_S - $(elapsed) - EXPORT_S - 25 ))  # 25 s: imports, data setup, the last checkpoint
    train "$w" bf16-mixed "$left" && return 0
    if (( $(date +%s) - t0 < 120 )); then
        say "width $w failed in bf16-mixed after $(( $(date +%s) - t0 ))s; again in fp32"
        rm -rf "$RUNS/w$w/checkpoints"
        left=$(( DEADLINE_S - $(elapsed) - EXPORT_S - 25 ))
        train "$w" 32-true "$left"
    fi
}

TRAIN_START=$(date +%s)
say "training widths 64 and 128 until ~$((DEADLINE_S - EXPORT_S))s"
run_width 64 & P64=$!
run_width 128 & P128=$!
wait $P64; say "width 64 done rc=$?"
wait $P128; say "width 128 done rc=$?"

for w in 64 128; do
    python3 benchmarks/gpu_export.py --run_dir "$RUNS/w$w" --out "$OUT" --width "$w" --started "$TRAIN_START" \
        --device "$DEVICE" > "$RUNS/export_w$w.json" 2>> "$RUNS/w$w.log"
    say "export w$w: $(cat "$RUNS/export_w$w.json")"
done
rm -f "$OUT"/fdf_utkface64_w128_ema.pt  # what comes back is limited: the width-128 run's 64x64 model is not needed
if [ -f "$RUNS/w64/checkpoints/last.ckpt" ]; then
    split -b 15M -d "$RUNS/w64/checkpoints/last.ckpt" "$OUT/w64_last.ckpt.part-"
fi
for w in 64 128; do tail -n 40 "$RUNS/w$w.log"; done
tar czf "$OUT/lease.tar.gz" --exclude='*.ckpt' --exclude='*.ckpt.tmp-*' "$RUNS"
say "done"; ls -la "$OUT"
