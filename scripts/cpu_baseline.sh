#!/usr/bin/env bash
# CPU baseline (issue 13): PyTorch eager, PyTorch channels_last and ONNX Runtime beside
# ichcam on exactly the workloads of `ichcam bench --device cpu`, 2 threads each, each tool
# in its own process, round-robin, best of several rounds; prints a table with ratios and
# peak RSS. Makes its own venv (.venv-torch) on first use.
#
#   scripts/cpu_baseline.sh [--rounds 3] [--iters 7] [--workloads small:train-step,...]
#       [--json FILE]
# Environment: ICHCAM_BIN (default: builds target/release/ichcam), VENV (default .venv-torch),
# PYTHON (the interpreter that makes the venv, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-torch}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, onnxruntime, onnx" 2>/dev/null; then
    echo "cpu_baseline: making $VENV (torch, onnxruntime, onnx from PyPI)" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    # The CPU-only wheel index may be unreachable; PyPI's torch runs on the CPU as well.
    "$VENV/bin/pip" install --quiet torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || "$VENV/bin/pip" install --quiet torch
    "$VENV/bin/pip" install --quiet onnxruntime onnx onnxscript
fi
if [ -z "${ICHCAM_BIN:-}" ]; then
    nice -n 10 cargo build --release --quiet
    ICHCAM_BIN=target/release/ichcam
fi
echo "cpu_baseline: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec "$VENV/bin/python" benches/baselines/cpu_baseline.py --ichcam "$ICHCAM_BIN" "$@"
