#!/usr/bin/env bash
# The refinement's GPU checks, called by scripts/gpu-check.sh (or alone):
#
#   here (Rust toolchain, NVRTC 13.0 on LD_LIBRARY_PATH):
#     scripts/gpu-check-seg.sh --build [BIN_DIR]
#       builds tests/cuda_seg_parity.rs with the kernels' PTX embedded and copies the test
#       binary to BIN_DIR/cuda_seg_parity (default gpu-bin, an ignored folder to carry)
#   on the GPU machine (no Rust needed):
#     scripts/gpu-check-seg.sh [--timings-only] [BIN_DIR]
#       runs every parity test with ICHCAM_REQUIRE_GPU=1 (a missing GPU fails), one at a
#       time so that the timings run alone, then prints the CCL timings last:
#         ccl 40x512x512 2%: X ms
#         ccl 512x512x512 30%: X ms
#       (median of 20 runs of the labelling kernels, mask uploaded once, no timing asserts).
#       --timings-only runs just the timing test (for a caller that already ran the suite).
#       The binary is BIN_DIR/cuda_seg_parity or, as scripts/gpu-check.sh --build lays it
#       out, BIN_DIR/tests/cuda_seg_parity.
#
# Exit status: that of the test binary.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--build" ]; then
  bin_dir="${2:-gpu-bin}"
  set -e
  exe="$(cargo test --release --test cuda_seg_parity --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*cuda_seg_parity[^"]*"' | tail -n 1 | sed 's/^"executable":"//; s/"$//')"
  if [ -z "$exe" ] || [ ! -x "$exe" ]; then
    echo "error: could not build the cuda_seg_parity test binary" >&2
    exit 1
  fi
  mkdir -p "$bin_dir"
  cp "$exe" "$bin_dir/cuda_seg_parity"
  echo "copied $exe -> $bin_dir/cuda_seg_parity"
  exit 0
fi

filter=()
if [ "${1:-}" = "--timings-only" ]; then
  filter=(ccl_gpu_timings --exact)
  shift
fi
bin_dir="${1:-gpu-bin}"
exe="$bin_dir/cuda_seg_parity"
[ -x "$exe" ] || exe="$bin_dir/tests/cuda_seg_parity"
if [ ! -x "$exe" ]; then
  echo "error: no cuda_seg_parity under $bin_dir: run scripts/gpu-check-seg.sh --build (or scripts/gpu-check.sh --build) here first and carry $bin_dir" >&2
  exit 1
fi

log="$(mktemp)"
ICHCAM_REQUIRE_GPU=1 "$exe" "${filter[@]}" --test-threads=1 --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "---- segmentation GPU checks (exit $status) ----"
grep -E '^test result' "$log" || true
grep -oE 'ccl [0-9x]+ [0-9]+%: [0-9.]+ ms' "$log" || echo "ccl timings: none printed"
rm -f "$log"
exit "$status"
