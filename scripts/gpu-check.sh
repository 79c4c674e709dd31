#!/usr/bin/env bash
# The whole GPU check in one command (one 10-minute device call): ichcam's six benchmark
# workloads of issue 14, the backbone's convolutions shape by shape on each kernel family
# (`bench --what conv`), and PyTorch's figures for the same workloads (eager fp32, eager bf16
# channels_last, CUDA graph, torch.compile) with peak memory, then the CUDA test binaries,
# the PyTorch parity fixtures and a short synthetic train + segment run while time remains,
# and LAST a table: workload | ichcam ms | PyTorch best ms | ratio | goal.
#
# Every step has its own timeout, and no step starts past the budget
# (ICHCAM_GPU_CHECK_BUDGET_S, default 540 s; the table needs a few seconds more).
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
#      gpu-bin/tests/<test name>, stripped, and packs them as gpu-pack/gpu-bin.tar.xz (the
#      device tool carries at most 64 MiB; gpu-bin/ itself is about 500 MB, the pack about 11 MB).
#   2. Still here: scripts/gpu-check.sh --dry-run
#      runs nothing heavy: every `ichcam bench` command line is parsed for real (`--describe`),
#      every other ichcam command's flags are checked against its `--help`, the PyTorch
#      script runs with `--dry-run`, test binaries with `--list`; any mismatch fails.
#   3. On the GPU machine, from the repository root (device tool: carry ["gpu-pack"]; the
#      script unpacks gpu-bin/ from it):
#        bash scripts/gpu-check.sh            # ICHCAM_GPU_CHECK_QUICK=1 for fewer iterations
#      Full logs go to $OUT (when set) or /tmp/ichcam-gpu-check/.
set -u

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

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
    # gpu-bin/ is about 500 MB, over what the device tool carries (64 MiB): carry the xz
    # archive instead; the run unpacks it. Preset 9 (a 64 MiB dictionary) sees what the test
    # executables share (the library, the PTX): about 11 MB, where the default preset 6 (8 MiB)
    # made 58 MB (4 minutes on 2 cores either way).
    mkdir -p gpu-pack
    python3 -c 'import tarfile; t = tarfile.open("gpu-pack/gpu-bin.tar.xz", "w:xz", preset=9); t.add("gpu-bin"); t.close()'
    size=$(stat -c %s gpu-pack/gpu-bin.tar.xz)
    echo "gpu-pack/gpu-bin.tar.xz: $size bytes (carry [\"gpu-pack\"])"
    [ "$size" -lt $((60 << 20)) ] || { echo "gpu-pack/gpu-bin.tar.xz is over 60 MiB: the device tool carries at most 64 MiB"; exit 1; }
    exit 0
fi

# On the GPU machine only the archive was carried: unpack it (python's tarfile: no xz binary needed).
if [ ! -x gpu-bin/ichcam ] && [ -f gpu-pack/gpu-bin.tar.xz ]; then
    python3 -c 'import tarfile; tarfile.open("gpu-pack/gpu-bin.tar.xz").extractall(".")' \
        || { echo "could not unpack gpu-pack/gpu-bin.tar.xz"; exit 2; }
fi

LOG="${OUT:-/tmp/ichcam-gpu-check}"
[ "$DRY" = 1 ] && LOG="${OUT:-/tmp/ichcam-gpu-check-dry}"
mkdir -p "$LOG"
QUICK="${ICHCAM_GPU_CHECK_QUICK:-0}"
ITERS=10
[ "$QUICK" = "1" ] && ITERS=3
BUDGET="${ICHCAM_GPU_CHECK_BUDGET_S:-540}"
START=$(date +%s)
BIN="${ICHCAM_BIN:-gpu-bin/ichcam}"
if [ "$DRY" = 1 ] && [ ! -x "$BIN" ] && [ -x target/release/ichcam ]; then BIN=target/release/ichcam; fi
declare -a ROWS=()
DRY_FAILS=0

# check_cmd COMMAND...: (dry run) whether the command line parses, without running it.
check_cmd() {
    local args=("$@")
    while [ "${args[0]}" = env ] || [[ "${args[0]}" == *=* ]]; do args=("${args[@]:1}"); done
    local exe="${args[0]}"
    if [ "$exe" = "$BIN" ]; then
        local sub="${args[1]}"
        if [ "$sub" = bench ]; then
            "${args[@]}" --describe >/dev/null 2>"$LOG/dry.err" || { echo "  does not parse: $(head -c 400 "$LOG/dry.err")"; return 1; }
            return 0
        fi
        local help
        help=$("$BIN" "$sub" --help 2>&1) || { echo "  no subcommand $sub"; return 1; }
        local a bad=0
        for a in "${args[@]:2}"; do
            [[ "$a" == --* ]] || continue
            a="${a%%=*}"
            grep -qE -- "(^|[ ,])$a([ =,]|$)" <<<"$help" || { echo "  $sub has no flag $a"; bad=1; }
        done
        return $bad
    fi
    if [[ "${args[*]}" == *torch_baseline.py* ]]; then
        "${args[@]}" --dry-run >/dev/null 2>"$LOG/dry.err" || { echo "  does not parse: $(head -c 400 "$LOG/dry.err")"; return 1; }
        return 0
    fi
    if [ -x "$exe" ]; then
        "$exe" --list >/dev/null 2>&1 || { echo "  $exe --list failed"; return 1; }
        return 0
    fi
    echo "  not checked: $exe"
    return 0
}

# run NAME TIMEOUT_S COMMAND...: runs with a timeout (cut to the budget left), logs to
# $LOG/NAME.log, records pass/fail; skipped when the budget is spent. --dry-run: checks it.
run() {
    local name="$1" limit="$2"
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$DRY" = 1 ]; then
        echo "=== $name (${limit}s): $*"
        if check_cmd "$@"; then ROWS+=("$(printf '%-34s %-16s' "$name" "parses")"); else ROWS+=("$(printf '%-34s %-16s' "$name" "BAD-ARGS")"); DRY_FAILS=$((DRY_FAILS + 1)); fi
        return 0
    fi
    if [ "$left" -lt 10 ]; then
        ROWS+=("$(printf '%-34s %-16s' "$name" "skipped(budget)")")
        return 125
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0 rc secs
    t0=$(date +%s.%N)
    echo "=== $name (${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    secs=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
    tail -n 8 "$LOG/$name.log"
    local status=pass
    [ $rc -ne 0 ] && status="FAIL(rc=$rc)"
    [ $rc -eq 124 ] && status="TIMEOUT(${limit}s)"
    ROWS+=("$(printf '%-34s %-16s %7ss' "$name" "$status" "$secs")")
    return $rc
}

# figure NAME TEXT: a result line for the summary.
figure() {
    ROWS+=("$(printf '  %-32s %s' "$1" "$2")")
}

if [ "$DRY" = 0 ]; then
    echo "=== nvidia-smi"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,temperature.gpu --format=csv,noheader || echo "nvidia-smi failed"
fi

if [ ! -x "$BIN" ]; then
    echo "$BIN is missing: build it here with scripts/gpu-check.sh --build and carry gpu-bin"
    exit 2
fi

run info 60 "$BIN" info

# ---- 1. ichcam's six workloads (f32; bf16 too where `bench --precision` exists) -------------
PREC=(f32)
if "$BIN" bench --help 2>/dev/null | grep -q -- '--precision'; then PREC=(f32 bf16); fi
SLOW=$(( ITERS < 5 ? ITERS : 5 ))
# name | limit | bench arguments
WL=(
    "train-r101|150|--config paper --what train-step --iters $SLOW --warmup 1"
    "cam-r101|60|--config paper --what cam --iters $ITERS --warmup 2"
    "train-r18|90|--config small --what train-step --iters $ITERS --warmup 2"
    "cam-r18|60|--config small --what cam --iters $ITERS --warmup 2"
    "latency-r18|40|--config small --what cam-latency --iters $(( ITERS * 5 )) --warmup 5"
    "ccl-2pct|40|--what ccl --dims 40x512x512 --fill 0.02 --iters $(( ITERS * 2 )) --warmup 3"
    "ccl-30pct|60|--what ccl --dims 512x512x512 --fill 0.30 --iters $ITERS --warmup 2"
)
for p in "${PREC[@]}"; do
    for w in "${WL[@]}"; do
        IFS='|' read -r name limit wargs <<<"$w"
        extra=()
        if [ "$p" != f32 ]; then
            [[ "$name" == ccl-* ]] && continue
            extra=(--precision "$p")
        fi
        # shellcheck disable=SC2086
        run "bench-$name-$p" "$limit" "$BIN" bench --device cuda $wargs "${extra[@]}" --json
    done
done
# The CAM pass launched op by op (the CUDA graph's gain).
run "bench-cam-r18-f32-eager" 60 "$BIN" bench --device cuda --config small --what cam --no-graph --iters "$ITERS" --warmup 2 --json
run "bench-latency-r18-f32-eager" 40 "$BIN" bench --device cuda --config small --what cam-latency --no-graph --iters $(( ITERS * 5 )) --warmup 5 --json
# The ResNet-101 CAM pass in one piece (not split into chunks to stay under 0.8 GB, as
# the default does): what the chunking costs in time and saves in memory.
run "bench-camwhole-r101-f32" 60 "$BIN" bench --device cuda --config paper --what cam --cam-chunk 32 --iters "$ITERS" --warmup 2 --json
if [ "$DRY" = 0 ]; then
    r=$(grep -E '^\{' "$LOG/bench-camwhole-r101-f32.log" 2>/dev/null | tail -1 | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print('%.3f ms, %s MB measured, %.0f MB planned' % (d['median_ms'], d.get('device_mb'), d.get('pass_plan_mb', 0)))" 2>/dev/null)
    [ -n "$r" ] && figure "cam-r101 in one piece" "$r"
fi
# The bf16 CAM passes above ran channels-last with bf16 activation storage (`--layout auto
# --act-storage auto` at bf16); the same passes channels-last in f32 storage, and NCHW: which
# layout and storage the eval (and training) backbone should take by default.
if [[ " ${PREC[*]} " == *" bf16 "* ]] && "$BIN" bench --help 2>/dev/null | grep -q -- '--act-storage'; then
    for cfg in "r101 paper" "r18 small"; do
        read -r tag preset <<<"$cfg"
        run "bench-cam-$tag-bf16-f32store" 60 "$BIN" bench --device cuda --config "$preset" --what cam --precision bf16 --act-storage f32 --iters "$ITERS" --warmup 2 --json
        run "bench-cam-$tag-bf16-nchw" 60 "$BIN" bench --device cuda --config "$preset" --what cam --precision bf16 --layout nchw --iters "$ITERS" --warmup 2 --json
    done
    # The bf16 train steps above ran channels-last (`--layout auto` at bf16: the native NHWC
    # forward-with-statistics, data- and weight-gradient kernels); the same steps NCHW.
    run "bench-train-r18-bf16-nchw" 90 "$BIN" bench --device cuda --config small --what train-step --precision bf16 --layout nchw --iters "$ITERS" --warmup 2 --json
    # The bf16 train steps above stored their channels-last activations in bf16 (`--act-storage
    # auto` at bf16); the same step in f32 storage.
    run "bench-train-r18-bf16-f32store" 90 "$BIN" bench --device cuda --config small --what train-step --precision bf16 --act-storage f32 --iters "$ITERS" --warmup 2 --json
    # (ResNet-101's after PyTorch: below.)
fi
# The sm_90a wgmma kernels (opt-in, ICHCAM_WGMMA=1, until proven on a GPU): their tests
# first; the passes with them only when they passed (docs/precision.md, "wgmma"). The
# forwards' test gates the CAM passes; the train step also needs the data- and
# weight-gradient kernels' tests (2 and 1 of their tests are emulator-only: ignored here).
if [ -x gpu-bin/tests/cuda_conv_wgmma ] && [[ " ${PREC[*]} " == *" bf16 "* ]]; then
    if ICHCAM_REQUIRE_GPU=1 run test-cuda_conv_wgmma 120 gpu-bin/tests/cuda_conv_wgmma --test-threads=2; then
        for cfg in "r101 paper" "r18 small"; do
            read -r tag preset <<<"$cfg"
            run "bench-cam-$tag-bf16-wgmma" 60 env ICHCAM_WGMMA=1 "$BIN" bench --device cuda --config "$preset" --what cam --precision bf16 --iters "$ITERS" --warmup 2 --json
        done
        grads_ok=1
        for t in cuda_conv_wgmma_dgrad cuda_conv_wgmma_wgrad; do
            [ -x "gpu-bin/tests/$t" ] || { grads_ok=0; continue; }
            ICHCAM_REQUIRE_GPU=1 run "test-$t" 120 "gpu-bin/tests/$t" --test-threads=1 || grads_ok=0
        done
        if [ "$grads_ok" = 1 ]; then
            ICHCAM_WGMMA=1 ICHCAM_REQUIRE_GPU=1 run test-cuda_train_bf16_storage-wgmma 120 gpu-bin/tests/cuda_train_bf16_storage --test-threads=4
            ICHCAM_WGMMA=1 ICHCAM_REQUIRE_GPU=1 run test-cuda_conv_nhwc_wgrad-wgmma 120 gpu-bin/tests/cuda_conv_nhwc_wgrad --test-threads=2
            run "bench-train-r18-bf16-wgmma" 90 env ICHCAM_WGMMA=1 "$BIN" bench --device cuda --config small --what train-step --precision bf16 --iters "$ITERS" --warmup 2 --json
            WGMMA_TRAIN_OK=1
        fi
    fi
fi
# The stage-3 U-Net train step (not one of the six workloads): its CUDA graph, then eager.
run "bench-unet-step-small-f32" 40 "$BIN" bench --device cuda --config small --what unet-step --iters "$ITERS" --warmup 2 --json
run "bench-unet-step-small-f32-eager" 40 "$BIN" bench --device cuda --config small --what unet-step --no-graph --iters "$ITERS" --warmup 2 --json

# The backbone's convolutions shape by shape, the data for the WMMA / mma.sync routing
# thresholds (docs/precision.md, docs/perf.md): forward, data and weight gradient of every
# distinct conv of the preset's network at its train-step batch and size on f32, WMMA and
# mma.sync (bf16, and tf32 where `bench --precision` exists), what MmaRoute::Auto takes and
# the fastest; the network's conv time per family and Auto's misroutes go to the summary.
CONV_ITERS=$(( ITERS < 5 ? ITERS : 5 ))
CONV_PREC=()
[ "${#PREC[@]}" -gt 1 ] && CONV_PREC=(--precision tf32)
# conv_figure STEP: the summary lines of a `bench --what conv` log, one per precision.
conv_figure() {
    [ "$DRY" = 1 ] && return 0
    local line
    while IFS= read -r line; do
        [ -n "$line" ] && figure "${1#bench-} ${line%%:*}" "${line#*: }"
    done < <(grep -E '^\{' "$LOG/$1.log" 2>/dev/null | python3 -c '
import json, sys
s = {}
for l in sys.stdin:
    try:
        d = json.loads(l)
    except ValueError:
        continue
    if d.get("what") == "conv-summary":
        s[d["variant"]] = d
if "f32" in s:
    for p in ("bf16", "tf32"):
        a = s.get("auto-" + p)
        if not a:
            continue
        t = lambda v: s[v]["total_ms"] if v in s else float("nan")
        print("%s: ms/step f32 %.2f | WMMA %.2f | mma %.2f | Auto %.2f | best %.2f; Auto slower on %s of %s (shape, pass), +%.2f ms"
              % (p, t("f32"), t("wmma-" + p), t("mma-" + p), a["total_ms"], t("best-" + p),
                 a["auto_slower"], a["pairs"], a["auto_lost_ms"]))
' 2>/dev/null)
}
run bench-conv-small 60 "$BIN" bench --device cuda --config small --what conv --iters "$CONV_ITERS" --warmup 1 "${CONV_PREC[@]}" --json
conv_figure bench-conv-small
# ResNet-101's here while the budget leaves room for PyTorch and the tests, else at the end.
CONV_PAPER=(run bench-conv-paper 60 "$BIN" bench --device cuda --config paper --what conv --iters "$CONV_ITERS" --warmup 1 "${CONV_PREC[@]}" --json)
CONV_PAPER_DONE=0
if [ "$DRY" = 1 ] || [ $(( BUDGET - ($(date +%s) - START) )) -ge 300 ]; then
    "${CONV_PAPER[@]}"
    conv_figure bench-conv-paper
    CONV_PAPER_DONE=1
fi

# ---- 2. PyTorch on the same workloads ------------------------------------------------------
if [ "$DRY" = 1 ] || { [ -f benches/baselines/torch_baseline.py ] && python3 -c "import torch, torchvision" >/dev/null 2>&1; }; then
    run torch-eager-graph 200 env PYTHONUNBUFFERED=1 python3 benches/baselines/torch_baseline.py \
        --iters "$ITERS" --modes bf16,graph,fp32 --budget-s 170
    # torch.compile is slow to compile: the CAM passes and the small train step only (the
    # issue's best PyTorch figure for the ResNet-101 train step is eager bf16).
    run torch-compile 180 env PYTHONUNBUFFERED=1 python3 benches/baselines/torch_baseline.py \
        --iters "$ITERS" --modes compile --workloads latency-r18,cam-r18,cam-r101,train-r18 --budget-s 150
fi

# The ResNet-101 bf16 train step NCHW (the channels-last one is bench-train-r101-bf16), after
# PyTorch so that it cannot squeeze the baseline out of the budget.
if [[ " ${PREC[*]} " == *" bf16 "* ]] && "$BIN" bench --help 2>/dev/null | grep -q -- '--layout'; then
    run "bench-train-r101-bf16-nchw" 150 "$BIN" bench --device cuda --config paper --what train-step --precision bf16 --layout nchw --iters "$SLOW" --warmup 1 --json
fi
# The ResNet-101 bf16 train step on the wgmma kernels (forward, data and weight gradient),
# where their tests passed above.
if [ "$DRY" = 1 ] || [ "${WGMMA_TRAIN_OK:-0}" = 1 ]; then
    run "bench-train-r101-bf16-wgmma" 150 env ICHCAM_WGMMA=1 "$BIN" bench --device cuda --config paper --what train-step --precision bf16 --iters "$SLOW" --warmup 1 --json
fi

# ---- 3. correctness on the GPU while time remains ------------------------------------------
for t in gpu-bin/tests/*; do
    [ -x "$t" ] || continue
    grep -q ICHCAM_REQUIRE_GPU "$t" || continue
    case "$(basename "$t")" in
        cuda_conv_wgmma | cuda_conv_wgmma_dgrad | cuda_conv_wgmma_wgrad)
            [ -s "$LOG/test-$(basename "$t").log" ] && continue ;;
    esac
    name="test-$(basename "$t")"
    ICHCAM_REQUIRE_GPU=1 run "$name" 120 "$t" --test-threads=4
    [ "$DRY" = 1 ] && continue
    res=$(grep -E '^test result:' "$LOG/$name.log" 2>/dev/null | tail -1)
    [ -n "$res" ] && figure "$name" "${res#test result: }"
done

for f in tests/fixtures/torch-parity/parity_*.safetensors; do
    [ -e "$f" ] || continue
    run "parity-$(basename "$f" .safetensors)" 60 "$BIN" parity "$f" --device cuda --dtype f32
done

# A short end-to-end training run on synthetic phantoms and a segmentation with it.
SYN=$(mktemp -d)
if run synth 60 "$BIN" synth --out "$SYN/data" --volumes 8 --size 128 --slices 16 --seed 1; then
    # The small preset at 128 px: all three stages (stage 3, the U-Net, graphed too).
    run train-small-cuda 150 "$BIN" train --data "$SYN/data" --model "$SYN/model.safetensors" \
        --config small --size 128 --device cuda --epochs 1 --stage2-epochs 1 --unet-epochs 1 --quiet
    if [ "$DRY" = 1 ] || [ -f "$SYN/model.safetensors" ]; then
        run segment-cuda 120 "$BIN" segment --model "$SYN/model.safetensors" --device cuda --quiet \
            --input "$SYN/data" --out "$SYN/pred-cuda"
        [ "$DRY" = 0 ] && vps=$(grep -oE '[0-9.]+ volumes/s' "$LOG/segment-cuda.log" 2>/dev/null | tail -1) && [ -n "$vps" ] && figure "segment-cuda" "$vps"
    fi
fi

if [ "$CONV_PAPER_DONE" = 0 ]; then
    "${CONV_PAPER[@]}"
    conv_figure bench-conv-paper
fi

# ---- the summary, then the table LAST ------------------------------------------------------
echo
echo "=== gpu-check summary ($(date -u +%H:%M:%SZ), $(( $(date +%s) - START )) s, logs in $LOG)"
for r in "${ROWS[@]}"; do echo "$r"; done
if [ "$DRY" = 1 ]; then
    echo "dry run: $DRY_FAILS command line(s) do not parse"
    [ "$DRY_FAILS" -eq 0 ]
    exit
fi
fails=$(printf '%s\n' "${ROWS[@]}" | grep -cE ' (FAIL|TIMEOUT)' || true)
echo "failed steps: $fails"
echo
python3 - "$LOG" <<'PY'
import glob, json, os, sys
log = sys.argv[1]
# The issue's goals (ms) and PyTorch's figures there (for when PyTorch did not run here).
ROWS = [
    ("train-r101", "train step R101+LSTM 1x32 512^2", 34.0, 68.4),
    ("cam-r101", "CAM pass R101 32x512^2", 6.4, 12.9),  # and <= 0.8 GB
    ("train-r18", "train step R18+LSTM 4x32 256^2", 9.4, 18.8),
    ("cam-r18", "CAM pass R18 128x256^2", 1.7, 3.37),
    ("latency-r18", "one-slice CAM R18 256^2", 0.2, 0.47),
    ("ccl-2pct", "CCL 40x512^2 2%", 0.5, 1.14),
    ("ccl-30pct", "CCL 512^3 30%", 10.0, 23.8),
]
def lines(path):
    try:
        for l in open(path):
            l = l.strip()
            if l.startswith("{"):
                try:
                    yield json.loads(l)
                except ValueError:
                    pass
    except OSError:
        return
ich = {}
for f in glob.glob(os.path.join(log, "bench-*.log")):
    tag = os.path.basename(f)[len("bench-"):-len(".log")]
    for r in lines(f):
        if "median_ms" in r:
            ich[tag] = r
torch = {}
for f in glob.glob(os.path.join(log, "torch-*.log")):
    for r in lines(f):
        if "median_ms" in r and r.get("workload"):
            torch.setdefault(r["workload"], []).append(r)
print("workload | ichcam ms | PyTorch best ms | ratio | goal")
print("--- | --- | --- | --- | ---")
for key, label, goal, issue_torch in ROWS:
    # The variant: what follows the workload in the step's name (f32, bf16-wgmma, f32-eager, ...).
    mine = [(v["median_ms"], tag[len(key) + 1:], v) for tag, v in ich.items()
            if tag.startswith(key + "-")]
    best = min(mine, key=lambda m: m[0]) if mine else None
    ts = torch.get(key, [])
    tb = min(ts, key=lambda r: r["median_ms"]) if ts else None
    i_ms = "%.3f (%s%s%s)" % (best[0], best[1], ", %.0f MB" % best[2]["device_mb"] if best and best[2].get("device_mb") else "",
                              ", plan %.0f MB in chunks of %s" % (best[2]["pass_plan_mb"], best[2].get("cam_chunk")) if best and best[2].get("pass_plan_mb") else
                              ", counted %.0f MB" % best[2]["train_plan_mb"] if best and best[2].get("train_plan_mb") else "") if best else "n/a"
    t_ms = "%.3f (%s%s)" % (tb["median_ms"], tb["mode"], ", %.0f MB" % tb["peak_mb"] if tb.get("peak_mb") else "") if tb else "n/a (issue: %.2f)" % issue_torch
    ref = tb["median_ms"] if tb else None
    ratio = "%.2fx" % (best[0] / ref) if best and ref else ("%.2fx (vs issue)" % (best[0] / issue_torch) if best else "n/a")
    met = ("met" if best[0] <= goal else "not met") if best else "n/a"
    g = "<= %g ms" % goal
    if key == "cam-r101":
        g += ", <= 0.8 GB"
        if best and best[2].get("device_mb") and best[2]["device_mb"] > 0.8 * 1024:
            met = "not met"
    print("%s | %s | %s | %s | %s (%s)" % (label, i_ms, t_ms, ratio, g, met))
PY
[ "$fails" -eq 0 ]
