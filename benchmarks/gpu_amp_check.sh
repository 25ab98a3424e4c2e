#!/usr/bin/env bash
# Pretraining throughput on one GPU with and without --amp, on synthetic data (nothing is downloaded).
#
#   bash benchmarks/gpu_amp_check.sh                 # tiny, 320 px, batch 32, ~300 iterations per run
#   MODEL=small BATCH=64 AMP_DTYPE=bf16 bash benchmarks/gpu_amp_check.sh
#   NPROC=4 bash benchmarks/gpu_amp_check.sh         # the same under torchrun --nproc_per_node=4 (DDP)
#   DEVICE=cpu MODEL=nano IMG=64 BATCH=4 EPOCHS=2 TRAIN_IMAGES=8 WORKERS=0 bash benchmarks/gpu_amp_check.sh  # smoke
#
# Prints images/s (all processes) averaged over the epochs after the first (cuDNN autotuning and worker
# start-up land in epoch 1). Augmentation is the deterministic letterbox, so the data loader is less
# likely to be the bottleneck; if both runs print about the same number, it still is: raise WORKERS.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-tiny}; IMG=${IMG:-320}; BATCH=${BATCH:-32}; EPOCHS=${EPOCHS:-15}; TRAIN_IMAGES=${TRAIN_IMAGES:-640}
WORKERS=${WORKERS:-8}; NPROC=${NPROC:-1}; AMP_DTYPE=${AMP_DTYPE:-}; DEVICE=${DEVICE:-cuda:0}
WORK=${WORK:-$(mktemp -d /tmp/gpu_amp_check.XXXX)}

"$PYTHON" -c "from synthetic_data import write_coco_layout; \
write_coco_layout('$WORK/coco', ['person', 'car', 'dog', 'cat'], num_train=$TRAIN_IMAGES, num_val=16, img_size=$IMG)"
# evaluate and keep epoch checkpoints only at the end; lr_scaling none so both runs train alike
echo '{"augmentation": "letterbox", "eval_interval": 1000, "save_interval": 1000, "lr_scaling": "none"}' \
    > "$WORK/bench.json"

if [ "$NPROC" -gt 1 ]; then LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC");
else LAUNCH=("$PYTHON"); fi
ARGS=(--coco-root "$WORK/coco" --config "$WORK/bench.json" --model-size "$MODEL" --img-size "$IMG"
      --batch-size "$BATCH" --epochs "$EPOCHS" --workers "$WORKERS" --no-progress)
[ "$NPROC" -gt 1 ] || ARGS+=(--device "$DEVICE")

for mode in fp32 amp; do
    extra=()
    if [ "$mode" = amp ]; then extra=(--amp); [ -n "$AMP_DTYPE" ] && extra+=(--amp-dtype "$AMP_DTYPE"); fi
    "${LAUNCH[@]}" pretrain_multi_class.py "${ARGS[@]}" "${extra[@]}" --output-dir "$WORK/$mode" > "$WORK/$mode.log" 2>&1 \
        || { tail -20 "$WORK/$mode.log"; exit 1; }
done

"$PYTHON" - "$WORK" <<'PY'
import csv, glob, os, sys
work = sys.argv[1]
rates = {}
for mode in ("fp32", "amp"):
    (metrics,) = glob.glob(os.path.join(work, mode, "*", "metrics.csv"))
    rows = list(csv.DictReader(open(metrics)))
    later = [float(r["images_per_second"]) for r in rows[1:]] or [float(rows[0]["images_per_second"])]
    rates[mode] = sum(later) / len(later)
    print(f"{mode:5s} {rates[mode]:8.1f} images/s  (mean of epochs 2-{len(rows)}, final loss {rows[-1]['loss']})")
print(f"amp speed-up x{rates['amp'] / rates['fp32']:.2f}; logs and runs in {work}")
PY
