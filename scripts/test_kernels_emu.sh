#!/usr/bin/env bash
# Builds ferrotune's CUDA kernels (src/kernels/cuda/*.cu) for the CPU with the host CUDA
# emulator (src/kernels/cuda/emu/) and checks every kernel against a plain C++ reference.
#
#   bash scripts/test_kernels_emu.sh            # everything (about 2 minutes on 2 cores)
#   bash scripts/test_kernels_emu.sh --quick    # without the long attention case
#   bash scripts/test_kernels_emu.sh attention  # one group: kernels | attention | emu
#
# Environment: CXX (default g++), FT_EMU_BUILD (build folder, default target/kernels-emu),
# FT_EMU_UCONTEXT=1 (fibers through ucontext instead of the x86-64 switch), JOBS.
# Exit status 1 on any failed check (each check prints its shapes, errors and tolerance).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-g++}
OUT=${FT_EMU_BUILD:-target/kernels-emu}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
SRC=src/kernels/cuda
EMU=$SRC/emu
mkdir -p "$OUT"

FLAGS=(-std=c++17 -O2 -g0 -Wall -Wextra -pthread -DFT_EMU)
[ "${FT_EMU_UCONTEXT:-0}" = 1 ] && FLAGS+=(-DFT_EMU_UCONTEXT)
KFLAGS=("${FLAGS[@]}" -include "$EMU/cuda_emu.h" -x c++)

echo "== compiling the kernels with the emulator ($CXX, $JOBS jobs) into $OUT"
t0=$(date +%s)
# one job per line: <output> <mode> <source>; mode k = kernel source (.cu), c = plain C++
jobs=()
for f in "$SRC"/*.cu; do jobs+=("$OUT/$(basename "${f%.cu}").o k $f"); done
jobs+=("$OUT/cuda_emu.o k $EMU/cuda_emu.cpp")  # the same flags as the kernels, as the cc crate will
jobs+=("$OUT/test_emu.o k $EMU/tests/test_emu.cu")
for f in "$EMU"/tests/*.cpp; do jobs+=("$OUT/$(basename "${f%.cpp}").o k $f"); done
export CXX OUT
export KF="${KFLAGS[*]}" CF="${FLAGS[*]}"
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c '
  o=$0; mode=$1; src=$2
  if [ "$mode" = k ]; then $CXX $KF -c "$src" -o "$o"; else $CXX $CF -c "$src" -o "$o"; fi || { echo "FAILED: $src" >&2; exit 255; }'
echo "   compiled in $(( $(date +%s) - t0 )) s"

# The library the Rust crate builds (kernels + runtime) may export ft_emu_* symbols only.
# (DW.ref.__gxx_personality_v0 is g++'s hidden weak reference for C++ unwinding: every object
# with a destructor on an unwinding path has it, and it never clashes, so it is allowed.)
LIBOBJS=()
for f in "$SRC"/*.cu; do LIBOBJS+=("$OUT/$(basename "${f%.cu}").o"); done
LIBOBJS+=("$OUT/cuda_emu.o")
bad=$(nm -g --defined-only "${LIBOBJS[@]}" | awk 'NF == 3 && $3 !~ /^_?ft_emu_/ && $3 !~ /^DW\.ref\./ {print $3}' | sort -u)
if [ -n "$bad" ]; then
  echo "FAIL: global symbols other than ft_emu_* in the kernel library:"; echo "$bad"; exit 1
fi
nk=$(nm -g --defined-only "${LIBOBJS[@]}" | awk 'NF == 3 && $3 ~ /^_?ft_emu_sizeof_/' | wc -l)
echo "[PASS] the kernel library exports ft_emu_* symbols only ($nk kernels)"

$CXX "${FLAGS[@]}" -o "$OUT/test_kernels_emu" "${LIBOBJS[@]}" "$OUT"/test_*.o
echo
echo "== emulator failure detection (each case must abort with a message)"
fails=0
for c in barrier divergent lane-exit trap block-size grid-size smem-limit smem-overrun wmma-align; do
  set +e
  msg=$("$OUT/test_kernels_emu" --death "$c" 2>&1 >/dev/null)
  rc=$?
  set -e
  if [ $rc -ne 0 ] && grep -q "ferrotune CUDA emulator" <<<"$msg"; then
    echo "[PASS] $c: ${msg%%$'\n'*}"
  else
    echo "[FAIL] $c: exit $rc, ${msg:-no message}"; fails=$((fails + 1))
  fi
done

echo
echo "== kernels against the C++ references"
t0=$(date +%s)
set +e
"$OUT/test_kernels_emu" "$@"
rc=$?
set -e
echo "   ran in $(( $(date +%s) - t0 )) s"
if [ $rc -ne 0 ] || [ $fails -ne 0 ]; then
  echo "FAILED"; exit 1
fi
echo "ALL PASSED"
