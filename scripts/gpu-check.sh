#!/usr/bin/env bash
# The whole GPU check in one command: CUDA parity tests, `ichcam info`, the PyTorch parity
# fixtures on the GPU, a short synthetic training run, ichcam's benchmarks and the PyTorch
# baseline, each under a timeout (about 8 minutes in all), then a short table LAST.
#
# The GPU machine has no Rust toolchain: build here, carry `gpu-bin/` (ignored by git).
#
#   1. Here (needs a CUDA 13.0 libnvrtc so that the kernels are precompiled to PTX; --build
#      finds it in .venv and sets ICHCAM_REQUIRE_NVRTC=1):
#        python3 -m venv .venv && .venv/bin/pip install nvidia-cuda-nvrtc==13.0.88
#        scripts/gpu-check.sh --build
#      which runs `cargo build --release --tests --benches` and copies target/release/ichcam
#      and the test executables that use a GPU (found with `cargo test --release --no-run
#      --message-format=json`; those mentioning ICHCAM_REQUIRE_GPU) to gpu-bin/ichcam and
#      gpu-bin/tests/<test name>, stripped (the device tool carries at most 64 MiB).
#   2. On the GPU machine, from the repository root (device tool: carry ["gpu-bin"]):
#        bash scripts/gpu-check.sh            # ICHCAM_GPU_CHECK_QUICK=1 for fewer iterations
#      Full logs go to $OUT (when set) or /tmp/ichcam-gpu-check/.
set -u

if [ "${1:-}" = "--build" ]; then
    set -e
    # Precompiled PTX or nothing: a source-only build would compile on the GPU at first use.
    for d in .venv/lib/python3*/site-packages/nvidia/cu13/lib; do
        if [ -d "$d" ]; then export LD_LIBRARY_PATH="$PWD/$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
    done
    export ICHCAM_REQUIRE_NVRTC="${ICHCAM_REQUIRE_NVRTC:-1}"
    cargo build --release --tests --benches
    rm -rf gpu-bin
    mkdir -p gpu-bin/tests
    cp target/release/ichcam gpu-bin/ichcam
    cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if "test" not in t["kind"] and not m["profile"].get("test"):
        continue
    name = t["name"] if "test" in t["kind"] else "lib-" + t["name"]
    if "bin" in t["kind"]:
        name = "bin-" + t["name"]
    if b"ICHCAM_REQUIRE_GPU" not in open(m["executable"], "rb").read():
        continue
    shutil.copy2(m["executable"], "gpu-bin/tests/" + name)
    print("gpu-bin/tests/" + name)
'
    strip gpu-bin/ichcam gpu-bin/tests/* 2>/dev/null || true
    du -sh gpu-bin
    exit 0
fi

LOG="${OUT:-/tmp/ichcam-gpu-check}"
mkdir -p "$LOG"
QUICK="${ICHCAM_GPU_CHECK_QUICK:-0}"
ITERS=10
[ "$QUICK" = "1" ] && ITERS=3
BIN=gpu-bin/ichcam
declare -a ROWS=()

# run NAME TIMEOUT_S COMMAND...: runs with a timeout, logs to $LOG/NAME.log, records pass/fail.
run() {
    local name="$1" limit="$2"
    shift 2
    local t0 rc secs
    t0=$(date +%s.%N)
    echo "=== $name: $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    secs=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
    tail -n 25 "$LOG/$name.log"
    local status=pass
    [ $rc -ne 0 ] && status="FAIL(rc=$rc)"
    [ $rc -eq 124 ] && status="TIMEOUT(${limit}s)"
    ROWS+=("$(printf '%-34s %-16s %7ss' "$name" "$status" "$secs")")
    return $rc
}

# figure NAME TEXT: a result line for the table.
figure() {
    ROWS+=("$(printf '  %-32s %s' "$1" "$2")")
}

echo "=== nvidia-smi"
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,temperature.gpu --format=csv,noheader || echo "nvidia-smi failed"

if [ ! -x "$BIN" ]; then
    echo "gpu-bin/ichcam is missing: build it here with scripts/gpu-check.sh --build and carry gpu-bin"
    exit 2
fi

run info 60 "$BIN" info

# Every test binary that knows about GPUs (it mentions ICHCAM_REQUIRE_GPU), with a GPU required.
for t in gpu-bin/tests/*; do
    [ -x "$t" ] || continue
    grep -q ICHCAM_REQUIRE_GPU "$t" || continue
    name="test-$(basename "$t")"
    ICHCAM_REQUIRE_GPU=1 run "$name" 180 "$t" --test-threads=4
    res=$(grep -E '^test result:' "$LOG/$name.log" | tail -1)
    [ -n "$res" ] && figure "$name" "${res#test result: }"
done

# PyTorch parity fixtures on the GPU.
if "$BIN" help parity >/dev/null 2>&1; then
    for f in tests/fixtures/torch-parity/parity_*.safetensors; do
        [ -e "$f" ] || continue
        run "parity-$(basename "$f" .safetensors)" 120 "$BIN" parity "$f" --device cuda --dtype f32
    done
fi

# A short end-to-end training run on synthetic phantoms.
if "$BIN" help synth >/dev/null 2>&1 && "$BIN" help train >/dev/null 2>&1; then
    SYN=$(mktemp -d)
    if run synth 60 "$BIN" synth --out "$SYN/data" --volumes 8 --size 128 --slices 16 --seed 1; then
        run train-tiny-cuda 150 "$BIN" train --data "$SYN/data" --model "$SYN/model.safetensors" \
            --config tiny --device cuda --epochs 1 --stage2-epochs 1 --quiet
    fi
fi

# Segmentation of an archive on the GPU and on the CPU with the model just trained: volumes/s
# and how many mask voxels differ between the two paths (the real ct-ich fixture included).
if [ -n "${SYN:-}" ] && [ -f "$SYN/model.safetensors" ]; then
    if run synth-archive 90 "$BIN" synth --out "$SYN/archive" --volumes 24 --size 256 --slices 24 --seed 2; then
        for dev in cuda cpu; do
            run "segment-$dev" 300 "$BIN" segment --model "$SYN/model.safetensors" --device "$dev" --quiet \
                --input "$SYN/archive" tests/fixtures/ct-ich/images --out "$SYN/pred-$dev"
            vps=$(grep -oE '[0-9.]+ volumes/s' "$LOG/segment-$dev.log" | tail -1)
            [ -n "$vps" ] && figure "segment-$dev (25 volumes)" "$vps"
        done
        mkdir -p "$SYN/cpu-masks"
        for d in "$SYN"/pred-cpu/*/; do
            id=$(basename "$d"); [ -f "$d/mask.nii.gz" ] && cp "$d/mask.nii.gz" "$SYN/cpu-masks/$id.nii.gz"
        done
        run mask-agreement 120 "$BIN" eval --pred "$SYN/pred-cuda" --truth "$SYN/cpu-masks" --json "$LOG/cuda-vs-cpu.json"
        diff=$(python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))["volumes"]
d = [x["pred_voxels"] + x["truth_voxels"] - 2 * x["true_positives"] for x in v if not x.get("error")]
t = sum(x["truth_voxels"] for x in v)
print("%d differing mask voxels over %d volumes (CPU mask voxels %d), worst volume %d" % (sum(d), len(d), t, max(d or [0])))
' "$LOG/cuda-vs-cpu.json" 2>/dev/null)
        [ -n "$diff" ] && figure "mask cuda vs cpu" "$diff"
    fi
fi

# GPU connected components: 40x512x512 at 2 % and 512^3 at 30 % (scripts/gpu-check-seg.sh).
if [ -x scripts/gpu-check-seg.sh ] || [ -f scripts/gpu-check-seg.sh ]; then
    run ccl-timings 240 bash scripts/gpu-check-seg.sh --timings-only gpu-bin
    grep -E '^ccl ' "$LOG/ccl-timings.log" | while read -r l; do echo "$l"; done
    while read -r l; do figure "${l%%:*}" "${l#*: }"; done < <(grep -E '^ccl ' "$LOG/ccl-timings.log")
fi

# ichcam's benchmarks: op level, then a train step and a CAM pass at the small and paper configs.
if "$BIN" help bench >/dev/null 2>&1; then
    run bench-conv-small 60 "$BIN" bench --device cuda --config small --what conv --iters "$ITERS" --json
    grep -E '^bench ' "$LOG/bench-conv-small.log" | while read -r l; do echo "$l"; done
    for cfg in small paper; do
        for what in train-step cam; do
            n="bench-$what-$cfg"
            it=$ITERS
            [ "$cfg" = paper ] && [ "$what" = train-step ] && it=$(( ITERS < 5 ? ITERS : 5 ))
            run "$n" 150 "$BIN" bench --device cuda --config "$cfg" --what "$what" --iters "$it" --warmup 1 --json
            ms=$(grep -E '^bench ' "$LOG/$n.log" | sed -E 's/.*median ([0-9.]+) ms.*, ([0-9.]+) slices\/s.*/\1 ms, \2 slices\/s/' | tail -1)
            [ -n "$ms" ] && figure "$n" "$ms"
        done
    done
    for k in fwd bwd-data bwd-weight; do
        l=$(grep -E "^bench conv-$k " "$LOG/bench-conv-small.log" | sed -E 's/.*median ([0-9.]+) ms.*; (.*)$/\1 ms; \2/')
        [ -n "$l" ] && figure "conv-$k small" "$l"
    done
fi

# The PyTorch baseline on the same machine.
if [ -f benches/baselines/torch_baseline.py ] && python3 -c "import torch, torchvision" >/dev/null 2>&1; then
    run torch-baseline 240 env PYTHONUNBUFFERED=1 python3 benches/baselines/torch_baseline.py --iters "$ITERS"
    grep -E '^\{' "$LOG/torch-baseline.log" | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        continue
    name = "torch %s-%s %s" % (r.get("what"), r.get("config"), r.get("mode"))
    v = r.get("error") or "%s ms, %s slices/s" % (r.get("median_ms"), r.get("slices_per_s"))
    print("  %-32s %s" % (name, v))
' >"$LOG/torch-table.txt" 2>/dev/null
fi

echo
echo "=== gpu-check summary ($(date -u +%H:%M:%SZ), logs in $LOG)"
for r in "${ROWS[@]}"; do echo "$r"; done
[ -s "$LOG/torch-table.txt" ] && cat "$LOG/torch-table.txt"
fails=$(printf '%s\n' "${ROWS[@]}" | grep -cE ' (FAIL|TIMEOUT)' || true)
echo "failed steps: $fails"
[ "$fails" -eq 0 ]
