#!/bin/sh
# The demo's `train` task: reads its config and data, reports progress and metrics,
# saves a checkpoint per epoch and writes a model to results/model/. Busybox sh only.
set -e
D=/sly_task_data
echo "task ${TASK_ID} (${TASK_TYPE}) starting"
EPOCHS=$(sed -n 's/.*"epochs": *\([0-9][0-9]*\).*/\1/p' "$D/task_config.json" | head -n 1)
EPOCHS=${EPOCHS:-5}
STEP=$(sed -n 's/.*"epoch_seconds": *\([0-9.][0-9.]*\).*/\1/p' "$D/task_config.json" | head -n 1)
STEP=${STEP:-0.5}
IMAGES=$(find "$D/data" -path "*/img/*" -type f | wc -l)
echo "{\"message\": \"dataset: $IMAGES images, model files: $(find "$D/model" -type f 2>/dev/null | wc -l)\", \"level\": \"info\"}"
mkdir -p "$D/results/model" "$D/results/checkpoints"
loss=1000
e=1
while [ "$e" -le "$EPOCHS" ]; do
  sleep "$STEP"
  loss=$((loss * 7 / 10))
  echo "{\"message\": \"epoch $e/$EPOCHS\", \"event_type\": \"progress\", \"current\": $e, \"total\": $EPOCHS}"
  l=$(printf "0.%03d" "$loss")
  echo "{\"message\": \"train loss $l\", \"event_type\": \"metrics\", \"type\": \"train\", \"epoch\": $e, \"metrics\": {\"loss\": $l}}"
  echo "epoch $e weights, loss $l" > "$D/results/checkpoints/epoch_$e.txt"
  echo "{\"message\": \"checkpoint epoch $e\", \"event_type\": \"checkpoint\", \"path\": \"checkpoints/epoch_$e.txt\"}"
  echo "stderr: epoch $e done" >&2
  e=$((e + 1))
done
cat "$D/model/config.json" > "$D/results/model/config.json" 2>/dev/null || echo '{}' > "$D/results/model/config.json"
head -c 4096 /dev/urandom > "$D/results/model/weights.bin"
echo "{\"message\": \"model saved\", \"level\": \"info\"}"
