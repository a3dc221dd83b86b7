#!/bin/sh
# The demo's `inference` task, busybox sh only (no SDK): applies the model in model/ to the
# project in data/<name>/ and writes results/<name>/, a Supervisely project the agent uploads:
# the input's images and annotations, each with one more label, a `prediction` rectangle of the
# model's learned size at the image's centre (nnCreated), and the class added to meta.json.
set -eu
D=/sly_task_data
flat() { tr -d '\n\r' < "$1"; }
num() { sed -n "s/.*\"$1\": *\([0-9][0-9]*\).*/\1/p" | head -n 1; }

PROJECT=$(find "$D/data" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[ -n "$PROJECT" ] || { echo "no project under $D/data" >&2; exit 1; }
[ -f "$D/model/config.json" ] || { echo "no model: $D/model/config.json is missing" >&2; exit 1; }
NAME=$(basename "$PROJECT")
OUT="$D/results/$NAME"
MODEL=$(flat "$D/model/config.json")
W=$(echo "$MODEL" | num width); W=${W:-16}
H=$(echo "$MODEL" | num height); H=${H:-16}
echo "task ${TASK_ID:-?} (${TASK_TYPE:-inference}): model box ${W}x${H} on project '$NAME'"

mkdir -p "$D/results"
cp -R "$PROJECT" "$OUT"
# prepend KEY VALUE: put VALUE (JSON) first in the first list named KEY on stdin; the @@ marker
# tells an empty list (no comma) from a full one
prepend() { sed "s/\"$1\": *[[]/\"$1\": [$2@@/; s/@@ *[]]/]/; s/@@/, /"; }
CLASS='{"title": "prediction", "description": "", "shape": "rectangle", "color": "#FF6F00", "geometry_config": {}, "hotkey": ""}'
META=$(flat "$OUT/meta.json")
if ! echo "$META" | grep -q '"title": *"prediction"'; then
  echo "$META" | prepend classes "$CLASS" > "$OUT/meta.json"
fi

TOTAL=$(find "$OUT" -path '*/ann/*.json' -type f | wc -l)
i=0
for ann in $(find "$OUT" -path '*/ann/*.json' -type f | sort); do
  i=$((i + 1))
  A=$(flat "$ann")
  SIZE=$(echo "$A" | grep -o '"size": *{[^}]*}' | head -n 1)
  IH=$(echo "$SIZE" | num height); IW=$(echo "$SIZE" | num width)
  if [ -n "$IH" ] && [ -n "$IW" ]; then
    set -- $(awk -v w="$W" -v h="$H" -v iw="$IW" -v ih="$IH" 'BEGIN {
      if (w > iw - 1) w = iw - 1; if (h > ih - 1) h = ih - 1
      x = int((iw - w) / 2); y = int((ih - h) / 2); printf "%d %d %d %d", x, y, x + w, y + h }')
    LABEL="{\"classTitle\": \"prediction\", \"description\": \"\", \"tags\": [], \"points\": {\"exterior\": [[$1, $2], [$3, $4]], \"interior\": []}, \"geometryType\": \"rectangle\", \"shape\": \"rectangle\", \"nnCreated\": true, \"nnUpdated\": false}"
    echo "$A" | prepend objects "$LABEL" > "$ann"
  else
    echo "$(basename "$ann"): no image size in its annotation; left as it was" >&2
  fi
  echo "{\"message\": \"progress\", \"event_type\": \"EventType.PROGRESS\", \"subtask\": \"Inference\", \"current\": $i, \"total\": $TOTAL}"
done
echo "{\"message\": \"model applied\", \"event_type\": \"EventType.MODEL_APPLIED\"}"
