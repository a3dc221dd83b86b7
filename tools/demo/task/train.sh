#!/bin/sh
# The demo's `train` task, busybox sh only (no SDK): reads /sly_task_data the way the real
# Supervisely agent lays it out and talks on stdout the way the SDK's legacy helpers do.
#
# "Training" learns the mean size of the two-point (rectangle) labels in the project's
# annotations, and starts from model/config.json when there is one. Per epoch it prints an SDK
# progress line, train and val metrics, and saves results/checkpoints/epoch_<n>/ (config.json
# and weights.bin) announced with a CHECKPOINT line; the agent makes each one a model and the
# task's model is the last.
set -eu
D=/sly_task_data
flat() { tr -d '\n\r' < "$1"; }
num() { sed -n "s/.*\"$1\": *\([0-9][0-9.]*\).*/\1/p" | head -n 1; }

CFG=$(flat "$D/task_config.json")
EPOCHS=$(echo "$CFG" | num epochs); EPOCHS=${EPOCHS:-5}
STEP=$(echo "$CFG" | num epoch_seconds); STEP=${STEP:-0.5}
PROJECT=$(find "$D/data" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[ -n "$PROJECT" ] || { echo "no project under $D/data" >&2; exit 1; }
echo "task ${TASK_ID:-?} (${TASK_TYPE:-train}) on project '$(basename "$PROJECT")'"

# Every two-point exterior ([[x0,y0],[x1,y1]]) is a rectangle; polygons have three or more points.
BOXES=$(find "$PROJECT" -path '*/ann/*.json' -type f | while read -r f; do
  flat "$f" | tr -d ' \t' | grep -o '"exterior":\[\[[0-9.]*,[0-9.]*\],\[[0-9.]*,[0-9.]*\]\]' || true
done | tr -c '0-9.\n' ' ')
LABELS=$(echo "$BOXES" | grep -c '[0-9]' || true)
ITEMS=$(find "$PROJECT" -path '*/img/*' -type f | wc -l)
VAL=$(find "$PROJECT" -path '*/val/img/*' -type f | wc -l)
read -r W H <<EOT
$(echo "$BOXES" | awk 'NF == 4 { w += $3 - $1; h += $4 - $2; n++ } END { if (n) printf "%d %d", w / n, h / n; else print "16 16" }')
EOT
START=""
if [ -f "$D/model/config.json" ]; then
  START=$(flat "$D/model/config.json" | sed -n 's/.*"arch": *"\([^"]*\)".*/\1/p')
fi
echo "{\"message\": \"dataset: $ITEMS images ($VAL for validation), $LABELS rectangles; mean box ${W}x${H}; starting from ${START:-scratch}\", \"level\": \"info\"}"

e=1
while [ "$e" -le "$EPOCHS" ]; do
  sleep "$STEP"
  set -- $(awk -v e="$e" 'BEGIN { printf "%.4f %.4f %.4f %.4f", 1.2 / (e + 1), 1 - 0.5 / (e + 1), 1.3 / (e + 1) + 0.02, 1 - 0.6 / (e + 1) }')
  echo "{\"message\": \"progress\", \"event_type\": \"EventType.PROGRESS\", \"subtask\": \"Epochs\", \"current\": $e, \"total\": $EPOCHS}"
  echo "{\"message\": \"metrics\", \"event_type\": \"EventType.METRICS\", \"type\": \"train\", \"epoch\": $e, \"metrics\": {\"loss\": $1, \"accuracy\": $2}}"
  echo "{\"message\": \"metrics\", \"event_type\": \"EventType.METRICS\", \"type\": \"val\", \"epoch\": $e, \"metrics\": {\"loss\": $3, \"accuracy\": $4}}"
  CK="checkpoints/epoch_$e"
  mkdir -p "$D/results/$CK"
  echo "{\"arch\": \"demo-box\", \"epoch\": $e, \"box\": {\"width\": $W, \"height\": $H}, \"val\": {\"loss\": $3, \"accuracy\": $4}}" > "$D/results/$CK/config.json"
  head -c 2048 /dev/urandom > "$D/results/$CK/weights.bin"
  SIZE=$(cat "$D/results/$CK"/* | wc -c)
  echo "{\"message\": \"checkpoint\", \"event_type\": \"EventType.CHECKPOINT\", \"id\": $e, \"subdir\": \"$CK\", \"sizeb\": $SIZE, \"best_now\": true}"
  echo "epoch $e/$EPOCHS done" >&2
  e=$((e + 1))
done
