#!/usr/bin/env bash
# The emulated CUDA driver (emu/README.md): run the whole CUDA path without a GPU.
#
#   scripts/cuda-emu.sh build [--sanitize]   build libcuda.so and the host-compiled kernels
#                                            (g++ only, no network) into target/cuda-emu
#                                            (--sanitize: ASan+UBSan build in target/cuda-emu-san)
#   scripts/cuda-emu.sh run CMD [ARGS...]    run any command on the emulated device, e.g.
#                                            scripts/cuda-emu.sh run target/release/ichcam info
#   scripts/cuda-emu.sh test                 every CUDA test with ICHCAM_REQUIRE_GPU=1, the WMMA
#                                            self-test, `ichcam parity --device cuda` on every
#                                            fixture, and every kernel's PTX assembled by ptxas
#                                            for its GPU (the sm_90a files' compute_90a PTX for
#                                            sm_90a, registers printed); ends
#                                            with "N passed, M failed"
#
# Environment: EMU_SANITIZE=1 (run/test on the sanitizer build), EMU_SEED=N|random (order of
# blocks and fibers), EMU_THREADS=N (OS threads per launch), CUDA_LAUNCH_BLOCKING=1, and the
# others listed in emu/README.md. NVRTC (libnvrtc.so.13) must be on LD_LIBRARY_PATH for the
# cargo builds that `test` does, or in ./.venv (as .ci/run installs it), with the CUDA headers
# (mma.h) beside it for kernels/conv_tc.cu. ptxas: $PTXAS, on PATH, or beside NVRTC (pip's
# nvidia-cuda-nvcc); without it the PTX step is skipped (not counted), unless
# ICHCAM_REQUIRE_PTXAS=1 (.ci/run) makes that a failure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

CXX="${CXX:-g++}"
JOBS="${EMU_BUILD_JOBS:-2}"

out_dir() {
  if [ "${EMU_SANITIZE:-0}" = "1" ]; then echo "$ROOT/target/cuda-emu-san"; else echo "$ROOT/target/cuda-emu"; fi
}

# True when $1 is missing or older than any of the remaining files.
stale() {
  local target="$1"
  shift
  [ -e "$target" ] || return 0
  local f
  for f in "$@"; do
    [ "$f" -nt "$target" ] && return 0
  done
  return 1
}

build() {
  if [ "${1:-}" = "--sanitize" ]; then export EMU_SANITIZE=1; fi
  local OUT
  OUT="$(out_dir)"
  mkdir -p "$OUT/lib" "$OUT/kernels" "$OUT/gen" "$OUT/test-kernels" "$OUT/bin"
  local SAN="" OPT="-O2"
  if [ "${EMU_SANITIZE:-0}" = "1" ]; then
    SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    OPT="-O1 -g"
  fi
  # The host's own instruction set: the kernels' fmaf becomes one FMA instruction (the same
  # correctly rounded result as libm's fmaf call, many times faster). EMU_MARCH overrides.
  local MARCH="${EMU_MARCH:--march=native}"
  local COMMON="-std=c++17 $OPT $MARCH -fPIC -pthread $SAN"
  local SHIM=(emu/shim/*.h emu/shim/include/*.h emu/tools/gen_register.py "$0")
  local DRV=(emu/driver/*.cpp emu/driver/*.h emu/driver/gen_symbols.txt emu/shim/emu_abi.h emu/tools/gen_stubs.py "$0")

  # The driver.
  if stale "$OUT/lib/libcuda.so.1" "${DRV[@]}"; then
    echo "cuda-emu: building $OUT/lib/libcuda.so.1"
    python3 emu/tools/gen_stubs.py emu/driver/gen_symbols.txt "$OUT/gen/stubs.cpp"
    # shellcheck disable=SC2086
    $CXX $COMMON -Wall -Wextra -Wno-unused-parameter -fvisibility=hidden -Iemu/driver -shared \
      -Wl,-soname,libcuda.so.1 -o "$OUT/lib/libcuda.so.1.tmp" \
      emu/driver/api.cpp emu/driver/exec.cpp emu/driver/ptx.cpp emu/driver/modules.cpp "$OUT/gen/stubs.cpp" -ldl
    mv "$OUT/lib/libcuda.so.1.tmp" "$OUT/lib/libcuda.so.1"
    ln -sf libcuda.so.1 "$OUT/lib/libcuda.so"
  fi

  # One shared object per kernel file (unchanged source + shim + generated registration),
  # and the emulator's own test kernels.
  local KFLAGS="$COMMON -fno-math-errno -ffp-contract=off -fno-strict-aliasing -fno-ipa-reference-addressable -Wno-unknown-pragmas -Wno-unused-function -Wno-sign-compare"
  local pids=() failed=0
  build_kernel() {
    local src="$1" dest="$2" name
    name="$(basename "$src" .cu)"
    python3 emu/tools/gen_register.py "$src" "$OUT/gen/$name.cpp"
    # shellcheck disable=SC2086
    $CXX $KFLAGS -include emu/shim/cuda_shim.h -Iemu/shim -Iemu/shim/include -shared -x c++ "$OUT/gen/$name.cpp" \
      -o "$dest.tmp" -L"$OUT/lib" -l:libcuda.so.1 -Wl,-rpath,'$ORIGIN/../lib' && mv "$dest.tmp" "$dest"
  }
  local src dest
  for src in kernels/*.cu emu/tests/*.cu; do
    [ -e "$src" ] || continue
    case "$src" in
      kernels/*) dest="$OUT/kernels/$(basename "$src" .cu).so" ;;
      *) dest="$OUT/test-kernels/$(basename "$src" .cu).so" ;;
    esac
    if stale "$dest" "$src" "${SHIM[@]}"; then
      echo "cuda-emu: compiling $src"
      build_kernel "$src" "$dest" &
      pids+=($!)
      if [ "${#pids[@]}" -ge "$JOBS" ]; then
        wait "${pids[0]}" || failed=1
        pids=("${pids[@]:1}")
      fi
    fi
  done
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  # A kernel file that was removed must not linger as a host module.
  for dest in "$OUT"/kernels/*.so; do
    [ -e "$dest" ] || continue
    [ -e "kernels/$(basename "$dest" .so).cu" ] || rm -f "$dest"
  done
  [ "$failed" = 0 ] || { echo "cuda-emu: a kernel did not compile for the host" >&2; exit 1; }

  # The emulator's self-tests (C++ programs on the driver API).
  for src in emu/tests/*.cpp; do
    [ -e "$src" ] || continue
    dest="$OUT/bin/$(basename "$src" .cpp)"
    if stale "$dest" "$src" "$OUT/lib/libcuda.so.1" emu/driver/cuda_api.h; then
      echo "cuda-emu: compiling $src"
      # shellcheck disable=SC2086
      $CXX $COMMON -Iemu/driver -o "$dest" "$src" -L"$OUT/lib" -l:libcuda.so.1 -Wl,-rpath,"$OUT/lib"
    fi
  done
  echo "cuda-emu: built $OUT"
}

# Environment of a command on the emulated device.
emu_env() {
  local OUT
  OUT="$(out_dir)"
  [ -e "$OUT/lib/libcuda.so.1" ] || { echo "cuda-emu: not built; run scripts/cuda-emu.sh build${EMU_SANITIZE:+ --sanitize}" >&2; exit 1; }
  export LD_LIBRARY_PATH="$OUT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export EMU_KERNEL_DIR="$OUT/kernels:$OUT/test-kernels"
  if [ "${EMU_SANITIZE:-0}" = "1" ]; then
    local asan
    asan="$($CXX -print-file-name=libasan.so)"
    export LD_PRELOAD="$asan${LD_PRELOAD:+:$LD_PRELOAD}"
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0}"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
  fi
}

# NVRTC for the cargo builds of `test`: already on the library path (as .ci/run sets it; the
# path is then left exactly as it is, since build.rs reruns when LD_LIBRARY_PATH changes), or
# the venv that .ci/run makes.
nvrtc_env() {
  local d
  local IFS=:
  for d in ${LD_LIBRARY_PATH:-}; do
    [ -n "$d" ] && [ -e "$d/libnvrtc.so.13" ] && return 0
  done
  unset IFS
  for d in "$ROOT"/.venv/lib/python3*/site-packages/nvidia/cu13/lib; do
    if [ -e "$d/libnvrtc.so.13" ]; then
      export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      return 0
    fi
  done
  echo "cuda-emu: libnvrtc.so.13 not found: the emulator reads the PTX NVRTC makes of kernels/*.cu." >&2
  echo "  python3 -m venv .venv && .venv/bin/pip install nvidia-cuda-nvrtc==13.0.88   (as .ci/run does)" >&2
  exit 1
}

# The ptxas to check the PTX with: $PTXAS, on PATH, or in the bin/ beside an NVRTC lib folder
# on LD_LIBRARY_PATH (pip's nvidia-cuda-nvcc installs it there); empty when none.
find_ptxas() {
  if [ -n "${PTXAS:-}" ] && [ -x "$PTXAS" ]; then echo "$PTXAS"; return; fi
  if command -v ptxas >/dev/null 2>&1; then command -v ptxas; return; fi
  local d
  local IFS=:
  for d in ${LD_LIBRARY_PATH:-}; do
    if [ -n "$d" ] && [ -e "$d/libnvrtc.so.13" ] && [ -x "$d/../bin/ptxas" ]; then
      echo "$d/../bin/ptxas"
      return
    fi
  done
}

run_cmd() {
  [ $# -ge 1 ] || { echo "usage: scripts/cuda-emu.sh run CMD [ARGS...]" >&2; exit 2; }
  emu_env
  exec "$@"
}

test_all() {
  nvrtc_env
  build
  export ICHCAM_REQUIRE_GPU=1
  if [ -z "${EMU_SEED:-}" ]; then
    EMU_SEED="$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')"
  fi
  export EMU_SEED
  echo "cuda-emu: EMU_SEED=$EMU_SEED (export it to replay this order of blocks and threads)"
  local passed=0 failed=0 failures=()
  record() {  # name status
    if [ "$2" = 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); failures+=("$1"); fi
  }
  local OUT
  OUT="$(out_dir)"
  local log="$OUT/test.log"
  : > "$log"

  # The failures the tests provoke on purpose are reported through their errors; no stderr
  # line per failed launch.
  export EMU_QUIET=1

  # 1. The emulator's own tests (WMMA numerics, what it must catch), counted check by check.
  local t out
  for t in "$OUT"/bin/*; do
    [ -x "$t" ] || continue
    echo "cuda-emu: $(basename "$t")"
    set +e
    out="$( (emu_env; "$t") 2>&1)"
    local rc=$?
    set -e
    echo "$out" >> "$log"
    echo "$out" | grep -E "^FAIL|^skip|passed, .* failed" || true
    local n m
    n=$(echo "$out" | sed -n 's/^\([0-9][0-9]*\) passed, \([0-9][0-9]*\) failed$/\1/p' | tail -1)
    m=$(echo "$out" | sed -n 's/^\([0-9][0-9]*\) passed, \([0-9][0-9]*\) failed$/\2/p' | tail -1)
    if [ -z "$n" ]; then n=0; m=1; fi
    passed=$((passed + n))
    failed=$((failed + m))
    if [ "$m" != 0 ] || [ "$rc" != 0 ]; then
      failures+=("$(basename "$t") (exit $rc)")
      [ "$m" = 0 ] && failed=$((failed + 1))
    fi
  done

  # 2. Every CUDA test binary of cargo, on the emulated device. cargo builds them with the
  # environment of the README's test command (the emulator's LD_LIBRARY_PATH would make
  # build.rs, which watches it, rebuild the crate); the binaries then run on the emulator.
  nice -n 10 cargo build --release --bins -q
  if ! target/release/ichcam info | grep -q "precompiled to PTX"; then
    echo "cuda-emu: the build has no precompiled PTX (NVRTC did not load at build time)" >&2
    exit 1
  fi
  local tests=() f exes=()
  for f in tests/cuda_*.rs; do tests+=(--test "$(basename "$f" .rs)"); done
  mapfile -t exes < <(nice -n 10 cargo test --release --no-run "${tests[@]}" 2>&1 | sed -n 's/.*Executable .* (\(.*\))$/\1/p')
  [ "${#exes[@]}" -gt 0 ] || { echo "cuda-emu: no CUDA test binary was built" >&2; exit 1; }
  local exe rc p fl
  for exe in "${exes[@]}"; do
    echo "cuda-emu: $(basename "$exe")"
    set +e
    out="$( (emu_env; cd "$ROOT" && "$exe" --test-threads="${EMU_TEST_THREADS:-2}") 2>&1)"
    rc=$?
    set -e
    echo "$out" >> "$log"
    echo "$out" | grep -E "^test |^test result|panicked|^---- " || true
    p=$(echo "$out" | sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\1/p' | awk '{s+=$1} END {print s+0}')
    fl=$(echo "$out" | sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\2/p' | awk '{s+=$1} END {print s+0}')
    passed=$((passed + p))
    failed=$((failed + fl))
    if [ "$fl" != 0 ]; then failures+=("$(basename "$exe"): $fl failed"); fi
    if [ "$rc" != 0 ] && [ "$fl" = 0 ]; then failed=$((failed + 1)); failures+=("$(basename "$exe") (exit $rc)"); fi
  done

  # 3. Every kernel's PTX through ptxas, which the emulator cannot stand in for (it runs the
  # C++ source, not the PTX): register and shared-memory limits, and what NVRTC leaves to the
  # assembler. The PTX of the build that was just made: the folder of the newest kernels.rs
  # (build.rs rewrites that file on every run; a folder's own time does not change when
  # files in it are overwritten, so it cannot tell an old build from the new one).
  local px ptx_dir f
  px="$(find_ptxas || true)"
  ptx_dir=""
  f="$(ls -t target/release/build/ichcam-*/out/kernels.rs 2>/dev/null | head -n 1 || true)"
  if [ -n "$f" ]; then ptx_dir="$(dirname "$f")"; fi
  if [ -z "$px" ]; then
    if [ "${ICHCAM_REQUIRE_PTXAS:-0}" = 1 ]; then
      record "ptxas (ICHCAM_REQUIRE_PTXAS=1 but no ptxas found)" 1
    else
      echo "cuda-emu: skip: no ptxas (set PTXAS, or pip install nvidia-cuda-nvcc==13.0.88 beside NVRTC); PTX not assembled"
    fi
  elif [ -z "$ptx_dir" ] || ! ls "$ptx_dir"/*.ptx >/dev/null 2>&1; then
    record "ptxas (no PTX in the build)" 1
  else
    local arch name sm90a=0
    for f in "$ptx_dir"/*.ptx; do
      case "$f" in *.sm90.ptx) arch=sm_90 ;; *.portable.ptx) arch=sm_75 ;; *.sm90a.ptx) arch=sm_90a ;; *) continue ;; esac
      name="ptxas -arch=$arch $(basename "$f")"
      if [ "$arch" = sm_90a ]; then
        # The sm_90a files (wgmma; build.rs's SM90A_MODULES): registers and spills into the
        # output, and the wgmma instructions must be there.
        sm90a=$((sm90a + 1))
        if "$px" -arch=sm_90a -v "$f" -o /dev/null > "$OUT/ptxas-sm90a.log" 2>&1 && grep -q "wgmma.mma_async" "$f"; then
          cat "$OUT/ptxas-sm90a.log" >> "$log"
          grep -E "Compiling entry|Used|spill" "$OUT/ptxas-sm90a.log" | sed 's/^/cuda-emu:   /'
          record "$name" 0
        else
          cat "$OUT/ptxas-sm90a.log" >> "$log"
          echo "cuda-emu: FAIL: $name"
          record "$name" 1
        fi
      elif "$px" -arch="$arch" "$f" -o /dev/null >> "$log" 2>&1; then
        record "$name" 0
      else
        echo "cuda-emu: FAIL: $name"
        record "$name" 1
      fi
    done
    # kernels/conv_wgmma.cu is sm_90a code: the build must have precompiled it for compute_90a.
    [ "$sm90a" -gt 0 ] || { echo "cuda-emu: FAIL: no *.sm90a.ptx in $ptx_dir"; record "ptxas -arch=sm_90a (no sm_90a PTX in the build)" 1; }
    echo "cuda-emu: ptxas ($px) assembled the PTX of $ptx_dir"
  fi

  # 4. ichcam parity --device cuda on every PyTorch fixture.
  for f in tests/fixtures/torch-parity/parity_*.safetensors; do
    echo "cuda-emu: ichcam parity --device cuda $f"
    if (emu_env; target/release/ichcam parity --device cuda "$f") >> "$log" 2>&1; then
      record "parity $(basename "$f")" 0
      tail -1 "$log"
    else
      record "parity $(basename "$f")" 1
      tail -3 "$log"
    fi
  done

  # 5. ichcam info names the emulated device.
  if (emu_env; target/release/ichcam info) 2>&1 | tee -a "$log" | grep -q "gpu 0: ichcam emulated CUDA device"; then
    record "ichcam info" 0
  else
    record "ichcam info" 1
  fi

  if [ "${#failures[@]}" -gt 0 ]; then printf 'cuda-emu: failed: %s\n' "${failures[@]}"; fi
  echo "cuda-emu: log in $log"
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
}

case "${1:-}" in
  build) shift; build "$@" ;;
  run) shift; run_cmd "$@" ;;
  test) shift; test_all "$@" ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac
