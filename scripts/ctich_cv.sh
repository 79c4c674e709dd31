#!/usr/bin/env bash
# Patient-wise k-fold cross-validation on a ct-ich-layout folder (images/, labels/,
# slice_labels.csv): folds stratified by hemorrhage (patients with and without a positive
# slice dealt separately, shuffled with a fixed seed); each fold trains `ichcam train` with
# its defaults on the other folds' images and slice labels only (no mask is in its training
# folder), segments the held-out patients, evaluates them against their masks, and the
# script prints one row per fold and the mean +- standard deviation over the folds.
#
#   scripts/ctich_cv.sh DATA OUT [--folds 5] [--seed 0] [--reuse] [--init DIR] [--cam]
#                       [--train "ARGS"] [--segment "ARGS"]
#
#   --reuse       keep each fold's trained model when it exists (re-segment and re-evaluate
#                 only: for refinement options)
#   --init DIR    train stage 3 alone on DIR/foldK/model.safetensors, the finished two-stage
#                 model of another run of the same folds, config and seed (`ichcam train
#                 --stage3-from`): its train.time is then the added stage's time alone
#   --cam         also report the CAM diagnostics (eval --cam)
#   --train/--segment  extra arguments for `ichcam train` / `ichcam segment`
#   ICHCAM_BIN    the binary (default target/release/ichcam, built if missing)
# Writes OUT/folds.txt, OUT/foldK/{train,test,model.safetensors,pred,eval.json},
# OUT/cv.json and OUT/table.md (the printed table).
set -euo pipefail
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 2 ] || usage
DATA="$(cd "$1" && pwd)"; OUT="$2"; shift 2
FOLDS=5; SEED=0; REUSE=0; INIT=""; CAM=""; TRAIN_ARGS=""; SEG_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --folds) FOLDS="$2"; shift 2;;
    --seed) SEED="$2"; shift 2;;
    --reuse) REUSE=1; shift;;
    --init) INIT="$(cd "$2" && pwd)"; shift 2;;
    --cam) CAM="--cam"; shift;;
    --train) TRAIN_ARGS="$2"; shift 2;;
    --segment) SEG_ARGS="$2"; shift 2;;
    *) echo "unknown option $1" >&2; usage;;
  esac
done
BIN="${ICHCAM_BIN:-target/release/ichcam}"
[ -x "$BIN" ] || cargo build --release
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"

# Stratified folds: each class shuffled with the seed and dealt round robin.
python3 - "$DATA" "$FOLDS" "$SEED" > "$OUT/folds.txt" <<'PY'
import csv, os, random, sys
data, k, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = sorted(f[:-7] for f in os.listdir(os.path.join(data, "images")) if f.endswith(".nii.gz"))
pos = set()
with open(os.path.join(data, "slice_labels.csv")) as f:
    for r in csv.DictReader(f):
        if r.get("any_hemorrhage", "0") not in ("0", ""):
            pos.add(r["patient"])
rng = random.Random(seed)
for cls in (sorted(i for i in ids if i in pos), sorted(i for i in ids if i not in pos)):
    rng.shuffle(cls)
    for j, i in enumerate(cls):
        print(i, j % k)
PY
if [ -n "$INIT" ] && [ -f "$INIT/folds.txt" ] && ! cmp -s "$INIT/folds.txt" "$OUT/folds.txt"; then
  echo "--init $INIT: its folds.txt differs from these folds (same --folds and --seed?)" >&2
  exit 1
fi

for f in $(seq 0 $((FOLDS-1))); do
  fd="$OUT/fold$f"
  mkdir -p "$fd"
  rm -rf "$fd/train" "$fd/test" "$fd/pred"
  mkdir -p "$fd/train/images" "$fd/test/images" "$fd/test/labels"
  head -1 "$DATA/slice_labels.csv" > "$fd/train/slice_labels.csv"
  while read -r id k; do
    if [ "$k" = "$f" ]; then
      ln -s "$DATA/images/$id.nii.gz" "$fd/test/images/"
      ln -s "$DATA/labels/$id.nii.gz" "$fd/test/labels/"
    else
      ln -s "$DATA/images/$id.nii.gz" "$fd/train/images/"
      grep "^$id," "$DATA/slice_labels.csv" >> "$fd/train/slice_labels.csv" || true
    fi
  done < "$OUT/folds.txt"
  if [ "$REUSE" = 0 ] || [ ! -f "$fd/model.safetensors" ]; then
    rm -f "$fd"/model.*
    FRESH=--fresh
    if [ -n "$INIT" ]; then
      FRESH="--fresh --stage3-from $INIT/fold$f/model.safetensors"
    fi
    start=$(date +%s)
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e s wall, %U s user, %S s sys" -o "$fd/train.time" \
      "$BIN" train --data "$fd/train" --model "$fd/model.safetensors" --quiet $FRESH $TRAIN_ARGS \
      > "$fd/train.log" 2>&1
    echo "fold $f trained in $(( $(date +%s) - start )) s ($(cat "$fd/train.time"))" >&2
  fi
  # shellcheck disable=SC2086
  "$BIN" segment --model "$fd/model.safetensors" --input "$fd/test/images" --out "$fd/pred" \
    --quiet $SEG_ARGS > "$fd/segment.log" 2>&1
  "$BIN" eval --pred "$fd/pred" --truth "$fd/test/labels" --json "$fd/eval.json" $CAM \
    > "$fd/eval.txt" 2>&1
done

python3 - "$OUT" "$FOLDS" "$SEED" "$TRAIN_ARGS" "$SEG_ARGS" <<'PY' | tee "$OUT/table.md"
import json, statistics, sys, os
out, k, seed, targs, sargs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
cols = [("dice_slice_pooled", "pooled slice Dice"), ("dice", "volume Dice"),
        ("slice_auc", "slice AUC"), ("slice_sensitivity", "slice sens."),
        ("slice_specificity", "slice spec."), ("cam_pointing", "CAM pointing"),
        ("cam_peak_hit", "CAM peak hit")]
rows, allv = [], []
for f in range(k):
    r = json.load(open(f"{out}/fold{f}/eval.json"))
    s = r["summary"]; allv += r["volumes"]
    t = open(f"{out}/fold{f}/train.time").read().strip() if os.path.exists(f"{out}/fold{f}/train.time") else "-"
    rows.append((f, s, t))
have = [c for c in cols if any(s.get(c[0]) is not None for _, s, _ in rows)]
fmt = lambda v: "-" if v is None else f"{v:.3f}"
print(f"train: `ichcam train {targs}`".rstrip() + f"; segment: `ichcam segment {sargs}`".rstrip() + f"; {k} folds, seed {seed}")
print()
print("| fold | volumes (+/-) | truth slices | " + " | ".join(c[1] for c in have) + " | FP volumes | training |")
print("|" + " --- |" * (len(have) + 5))
for f, s, t in rows:
    print(f"| {f} | {s['n_positive']}/{s['n_negative']} | {s['n_truth_slices']} | "
          + " | ".join(fmt(s.get(c[0])) for c in have)
          + f" | {s['false_positive_volumes']} of {s['n_negative']} | {t} |")
def ms(key):
    v = [s.get(key) for _, s, _ in rows if s.get(key) is not None]
    if not v: return "-"
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"
fp = sum(s["false_positive_volumes"] for _, s, _ in rows); neg = sum(s["n_negative"] for _, s, _ in rows)
print(f"| mean ± sd | | | " + " | ".join(ms(c[0]) for c in have) + f" | {fp} of {neg} | |")
# Pooled over all held-out volumes (every truth slice once).
pos = [v for v in allv if v.get("truth_voxels", 0) > 0]
n = sum(v["truth_slices"] for v in pos)
pooled = sum((v["dice_slice"] or 0) * v["truth_slices"] for v in pos) / n if n else float("nan")
print()
print(f"all {len(allv)} held-out volumes pooled: slice Dice {pooled:.3f} over {n} truth slices, "
      f"volume Dice {statistics.mean(v['dice'] for v in pos):.3f} over {len(pos)} volumes, "
      f"{fp} of {neg} hemorrhage-free volumes false positive")
json.dump({"folds": [s for _, s, _ in rows], "pooled_slice_dice": pooled,
           "false_positive_volumes": fp, "negative_volumes": neg},
          open(f"{out}/cv.json", "w"), indent=1)
PY
