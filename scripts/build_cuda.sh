#!/usr/bin/env bash
# Builds the CUDA wheel of ferrotune on a machine with NO GPU and NO CUDA toolkit:
#
#   nice -n 19 bash scripts/build_cuda.sh     # -> dist-cuda/ferrotune-<ver>+cu12-<tags>.whl
#
# 1. A toolchain folder (.cuda-toolchain/) gets CUDA 12's NVRTC and headers from PyPI
#    (nvidia-cuda-nvrtc-cu12, -runtime-cu12, -nvcc-cu12: PyPI has no CUDA 12 nvcc, but NVRTC
#    compiles CUDA C++ to machine code for every architecture).
# 2. scripts/compile_kernels.py compiles src/kernels/cuda/*.cu into machine code for sm_70
#    (V100), sm_75 (T4), sm_80 (A100), sm_86 (A10), sm_89 (L4/L40), sm_90 (H100/H200), and
#    PTX for compute_90, which the driver compiles on first use on newer GPUs. build.rs
#    embeds them (FERROTUNE_KERNELS_DIR).
# 3. maturin builds with the `cuda` feature in its own target dir (target-cuda/; the CPU
#    build in target/ stays warm). Nothing CUDA is linked: the driver, cuBLAS and NCCL are
#    loaded at run time, so the wheel imports on any machine and `device="cuda"` without a
#    GPU raises GpuUnavailableError saying what is missing.
# 4. The wheel is relabelled 0.1.0 -> 0.1.0+cu12 (same project: installing it replaces the
#    CPU wheel and vice versa) and declares the NVIDIA runtime wheels it loads:
#    nvidia-cublas-cu12 and nvidia-nccl-cu12 (found in site-packages/nvidia/*/lib without
#    LD_LIBRARY_PATH).
#
# Run-time needs: an NVIDIA driver >= 525 (CUDA 12.0) and a GPU of compute capability >= 7.0.
#
# Environment: PYTHON (interpreter for the toolchain venv, default python3),
# CUDA_TOOLCHAIN (default .cuda-toolchain), CUDA_TARGET_DIR (default target-cuda),
# CUDA_DIST (default dist-cuda), CUDA_ARCHS (e.g. "sm_80 sm_90" to build fewer, for a quick
# local check only: a wheel for users needs all of them).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TC=${CUDA_TOOLCHAIN:-$ROOT/.cuda-toolchain}
DIST=${CUDA_DIST:-$ROOT/dist-cuda}
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$ROOT/target-cuda}
export PIP_DISABLE_PIP_VERSION_CHECK=1
LABEL=cu12
# Pinned: the kernels and the PTX are CUDA 12.8's (PTX 8.7 needs a driver >= 570 to JIT;
# the machine code needs >= 525).
CUDA_PKGS=(
  "nvidia-cuda-nvrtc-cu12==12.8.93"
  "nvidia-cuda-runtime-cu12==12.8.90"
  "nvidia-cuda-nvcc-cu12==12.8.93"
)
# What the wheel declares (the libraries it loads at run time).
REQUIRES=(
  "nvidia-cublas-cu12>=12.1,<13"
  "nvidia-nccl-cu12>=2.18"
)

step() { echo; echo "== $*"; }

step "toolchain: $TC"
if [ ! -x "$TC/bin/python" ]; then
  "$PY" -m venv "$TC"
fi
"$TC/bin/python" -m pip install -q "maturin>=1.5,<2" "${CUDA_PKGS[@]}"
SITE=$("$TC/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

step "kernels: NVRTC for every architecture"
KDIR="$CARGO_TARGET_DIR/kernels"
ARCH_ARGS=()
for a in ${CUDA_ARCHS:-}; do ARCH_ARGS+=(--arch "$a"); done
"$TC/bin/python" scripts/compile_kernels.py --cuda-site "$SITE" --out "$KDIR" -q "${ARCH_ARGS[@]}"
export FERROTUNE_KERNELS_DIR=$KDIR

step "maturin build --release --features extension-module,cuda (target dir $CARGO_TARGET_DIR)"
RAW=$(mktemp -d "${TMPDIR:-/tmp}/ferrotune-cuda-wheel.XXXXXX")
trap 'rm -rf "$RAW"' EXIT
# manylinux_2_28 where the symbols allow it (maturin's auditwheel check says so if not).
if ! "$TC/bin/maturin" build --release --features extension-module,cuda \
    --interpreter "$TC/bin/python" --compatibility manylinux_2_28 --out "$RAW/raw"; then
  echo "note: not manylinux_2_28-compatible here; building a plain linux wheel" >&2
  "$TC/bin/maturin" build --release --features extension-module,cuda \
    --interpreter "$TC/bin/python" --out "$RAW/raw"
fi
WHL=$(ls "$RAW"/raw/ferrotune-*.whl)

step "relabel +$LABEL and declare the NVIDIA runtime wheels"
mkdir -p "$DIST"
rm -f "$DIST"/ferrotune-*.whl
REQ_ARGS=()
for r in "${REQUIRES[@]}"; do REQ_ARGS+=(--requires "$r"); done
OUTWHL=$("$TC/bin/python" scripts/cuda_wheel_metadata.py "$WHL" "$DIST" --label "$LABEL" "${REQ_ARGS[@]}")

step "checks"
"$TC/bin/python" -m zipfile -e "$OUTWHL" "$RAW/check" >/dev/null
SO=$(ls "$RAW"/check/ferrotune/_core*.so)
if readelf -d "$SO" | grep -E 'NEEDED.*lib(cuda|cublas|nccl|cudart|nvrtc)'; then
  echo "error: the extension links a CUDA library; they must be loaded at run time" >&2
  exit 1
fi
SIZE=$(du -m "$OUTWHL" | cut -f1)
if [ "$SIZE" -ge 60 ]; then
  echo "error: the wheel is ${SIZE} MB (the GPU check carries it; keep it under 60 MB)" >&2
  exit 1
fi
grep -E '^(Version|Requires-Dist)' "$RAW"/check/ferrotune-*.dist-info/METADATA

cat <<EOF

== done
CUDA wheel: $OUTWHL (${SIZE} MB)
  kernels: sm_70 sm_75 sm_80 sm_86 sm_89 sm_90 + compute_90 PTX (NVRTC 12.8)
  needs: NVIDIA driver >= 525, a GPU of compute capability >= 7.0; pip installs the
  declared nvidia-cublas-cu12 and nvidia-nccl-cu12 with it (a machine whose PyTorch brought
  CUDA 13's cuBLAS/NCCL works too: pip install --no-deps).
  Check it on a GPU: bash scripts/gpu_check.sh $(basename "$OUTWHL")
EOF
