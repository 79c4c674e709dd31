#!/usr/bin/env bash
# Patient-wise cross-validation on a ct-ich-layout folder (default: ../shared/data/ct-ich-dev):
# each fold trains `ichcam train` on the other patients' images and slice labels only (no
# masks), segments the held-out patients, and evaluates against their masks. Prints each
# fold's summary and the pooled per-volume Dice.
#   scripts/ctich_cv.sh [DATA] [OUT] [extra train args...]
set -euo pipefail
DATA="${1:-../shared/data/ct-ich-dev}"
OUT="${2:-out/ctich-cv}"
shift $(( $# > 2 ? 2 : $# )) || true
BIN="${ICHCAM_BIN:-target/release/ichcam}"
[ -x "$BIN" ] || cargo build --release
mkdir -p "$OUT"
ids=$(ls "$DATA/images" | sed 's/\.nii\.gz$//' | sort)
n=$(echo "$ids" | wc -l)
folds="${ICHCAM_CV_FOLDS:-3}"
i=0
for id in $ids; do echo "$id $((i % folds))"; i=$((i+1)); done > "$OUT/folds.txt"
for f in $(seq 0 $((folds-1))); do
  fd="$OUT/fold$f"; rm -rf "$fd"; mkdir -p "$fd/train/images" "$fd/test/images" "$fd/test/labels"
  head -1 "$DATA/slice_labels.csv" > "$fd/train/slice_labels.csv"
  while read -r id k; do
    if [ "$k" = "$f" ]; then
      cp "$DATA/images/$id.nii.gz" "$fd/test/images/"; cp "$DATA/labels/$id.nii.gz" "$fd/test/labels/"
    else
      cp "$DATA/images/$id.nii.gz" "$fd/train/images/"
      grep "^$id," "$DATA/slice_labels.csv" >> "$fd/train/slice_labels.csv" || true
    fi
  done < "$OUT/folds.txt"
  "$BIN" train --data "$fd/train" --model "$fd/model.safetensors" --device cpu --quiet --fresh "$@"
  "$BIN" segment --model "$fd/model.safetensors" --input "$fd/test/images" --out "$fd/pred" --device cpu --quiet > /dev/null
  "$BIN" eval --pred "$fd/pred" --truth "$fd/test/labels" --json "$fd/eval.json" | tail -n +1
done
python3 - "$OUT" "$folds" <<'PY'
import json, sys
out, folds = sys.argv[1], int(sys.argv[2])
vols = []
for f in range(folds):
    vols += json.load(open(f"{out}/fold{f}/eval.json"))["volumes"]
pos = [v for v in vols if v["truth_voxels"] > 0]
neg = [v for v in vols if v["truth_voxels"] == 0]
mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
print(f"pooled over {len(vols)} held-out volumes ({len(pos)} with hemorrhage):")
for v in vols:
    print(f"  {v['id']}: truth {v['truth_ml']:.2f} mL, pred {v['pred_ml']:.2f} mL, dice {v['dice']:.3f}")
print(f"mean Dice (volumes with hemorrhage) {mean([v['dice'] for v in pos]):.3f}; "
      f"false-positive volumes {sum(v['pred_voxels'] > 0 for v in neg)} of {len(neg)}")
PY
