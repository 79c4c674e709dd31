#!/usr/bin/env bash
# The follow-up GPU call after scripts/gpu-check.sh (one short device call, ~3 minutes): the
# CUDA test binaries that failed on the first H200 run (2026-12-04, docs/perf.md), the
# reduced-precision parity test twice (a result that moves between runs is a race), and a
# per-kernel time profile (ncu, one metric, no clock control) of one eager bf16 train step
# and one eager bf16 CAM pass of the small preset, summarised by scripts/ncu_summary.py.
# ICHCAM_RECHECK_TESTS: the test binaries (names, or `all`); ICHCAM_RECHECK_NCU=0: no profile.
# Build and carry as for gpu-check.sh (scripts/gpu-check.sh --build; carry ["gpu-pack"]).
# Logs: $OUT/recheck.tgz and $OUT/ncu-*.csv.
set -u
LOG=/tmp/ichcam-recheck
mkdir -p "$LOG"
if [ ! -x gpu-bin/ichcam ] && [ -f gpu-pack/gpu-bin.tar.xz ]; then
    python3 -c 'import tarfile; tarfile.open("gpu-pack/gpu-bin.tar.xz").extractall(".")' || exit 2
fi
export ICHCAM_REQUIRE_GPU=1 ICHCAM_BIN="$PWD/gpu-bin/ichcam"
declare -a ROWS=()
TESTS=${ICHCAM_RECHECK_TESTS:-cuda_errors cuda_graph cuda_parity cuda_conv_tc cuda_unet_parity parity}
# ICHCAM_RECHECK_TESTS=all: every test binary gpu-bin carries (those that use a GPU).
[ "$TESTS" = all ] && TESTS=$(cd gpu-bin/tests && ls)
for t in $TESTS; do
    timeout 120 "gpu-bin/tests/$t" --test-threads=4 >"$LOG/test-$t.log" 2>&1
    rc=$?
    ROWS+=("$(printf '%-26s rc=%-3s %s' "$t" "$rc" "$(grep -E '^test result' "$LOG/test-$t.log" | tail -1)")")
    grep -E '^test .*FAILED$' "$LOG/test-$t.log" | head -5
done
for i in 1 2; do
    timeout 90 gpu-bin/tests/cuda_parity_precision --test-threads=1 >"$LOG/precision-$i.log" 2>&1
    ROWS+=("$(printf '%-26s rc=%-3s %s' "precision run $i" "$?" "$(grep -E '^test result' "$LOG/precision-$i.log" | tail -1)")")
    grep -E ' at (tf32|bf16): ' "$LOG/precision-$i.log" | sort >"$LOG/precision-$i.txt"
done
if diff "$LOG/precision-1.txt" "$LOG/precision-2.txt" >"$LOG/precision.diff"; then
    ROWS+=("precision: both runs print the same errors (no run-to-run movement)")
else
    ROWS+=("precision: the two runs DIFFER (see precision.diff)")
fi
cat "$LOG/precision-1.txt"
# A second timing of three workloads of the first run (its spread: the same version twice).
for w in "cam-r18-bf16|--config small --what cam --precision bf16" \
         "train-r18-bf16|--config small --what train-step --precision bf16" \
         "train-r18-bf16-wgmma|--config small --what train-step --precision bf16" \
         "ccl-2pct-f32|--what ccl --dims 40x512x512 --fill 0.02"; do
    IFS='|' read -r name wargs <<<"$w"
    env=()
    [[ "$name" == *wgmma ]] && env=(ICHCAM_WGMMA=1)
    # shellcheck disable=SC2086
    timeout 90 env "${env[@]}" gpu-bin/ichcam bench --device cuda $wargs --iters 10 --warmup 2 --json >"$LOG/bench-$name.log" 2>&1
    ROWS+=("$(printf '%-26s rc=%-3s %s' "bench $name" "$?" "$(grep -E '^\{' "$LOG/bench-$name.log" | tail -1 | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("median %.3f ms, min %.3f ms" % (d["median_ms"], d["min_ms"]))' 2>/dev/null)")")
done
[ -n "${OUT:-}" ] && tar czf "$OUT/recheck.tgz" -C "$LOG" .
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "${ICHCAM_RECHECK_NCU:-1}" = 1 ] && [ -n "$NCU" ] && [ -n "${OUT:-}" ]; then
    for w in train-step cam; do
        timeout "${ICHCAM_RECHECK_NCU_S:-80}" "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
            --launch-count 1600 \
            gpu-bin/ichcam bench --device cuda --config small --what "$w" --precision bf16 --no-graph \
            --iters 1 --warmup 0 --json >"$OUT/ncu-$w.csv" 2>"$LOG/ncu-$w.err"
        ROWS+=("$(printf '%-26s rc=%s' "ncu $w" "$?")")
        python3 scripts/ncu_summary.py "$OUT/ncu-$w.csv" 25 || tail -5 "$LOG/ncu-$w.err"
    done
    tar czf "$OUT/recheck.tgz" -C "$LOG" .
else
    ROWS+=("ncu: not run (ICHCAM_RECHECK_NCU=0, not found, or no OUT)")
fi
echo
echo "=== gpu-recheck summary"
for r in "${ROWS[@]}"; do echo "$r"; done
