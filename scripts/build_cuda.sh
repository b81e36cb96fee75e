#!/usr/bin/env bash
# Build a CUDA-enabled ferrotune wheel on a machine with NO GPU and NO system CUDA toolkit.
#
#   nice -n 19 bash scripts/build_cuda.sh        # -> dist-cuda/ferrotune-<ver>+cu13-*.whl
#
# What it does (see also docs in /work/shared/notes/candle-training.md, "CUDA builds"):
#  1. A dedicated virtualenv (.cuda-toolchain/) gets nvcc and friends from PyPI wheels
#     (CUDA 13.0: its PTX needs a driver >= R580). CUDA_HOME = <site-packages>/nvidia/cu13.
#  2. candle 0.11 turns on cudarc's `dynamic-linking` feature, so the extension is linked
#     with -lcuda -lnvrtc -lcurand -lcublas -lcublasLt (and candle-kernels adds -lcudart).
#     No driver and no cuBLAS here, so stub libraries with the right sonames and symbols
#     are generated from cudarc's own bindings into $CUDA_HOME/lib/stubs (a directory
#     cudarc's build script already puts on the link path). libcudart is the real one.
#  3. `maturin build --release --features extension-module,cuda` in a SEPARATE target dir
#     (target-cuda/; the CPU build in target/ stays warm). The extension gets
#     RUNPATH $ORIGIN/../nvidia/cu13/lib so pip's nvidia-* cu13 wheels are found without
#     LD_LIBRARY_PATH.
#  4. The wheel is re-labelled with a PEP 440 local version (0.1.0 -> 0.1.0+cu13): same
#     project name, so installing it REPLACES the CPU wheel (and vice versa).
#
# Environment knobs:
#   CUDA_COMPUTE_CAP   GPU arch for candle's kernels (default 80: PTX for compute_80 runs on
#                      A100 and, JIT-compiled by the driver, on H100; 90 -> Hopper only)
#   PYTHON             interpreter for the toolchain venv (default python3)
#   CUDA_TOOLCHAIN     toolchain venv path (default .cuda-toolchain)
#   CUDA_TARGET_DIR    cargo target dir (default target-cuda)
#   CUDA_DIST          wheel output dir (default dist-cuda)
#   CUDA_LOCAL_LABEL   local version label (default cu13, or cu13.nccl; empty string = keep 0.1.0)
#   CUDA_NCCL          1: also the `nccl` feature (data-parallel gradients summed on the GPUs
#                      with NCCL). Links the real libnccl.so.2 from the nvidia-nccl-cu13 wheel
#                      (installed into the toolchain venv) and adds RUNPATH
#                      $ORIGIN/../nvidia/nccl/lib; the GPU machine then needs that wheel too.
#                      Without it, data-parallel training sums gradients through the host.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TC=${CUDA_TOOLCHAIN:-$ROOT/.cuda-toolchain}
DIST=${CUDA_DIST:-$ROOT/dist-cuda}
NCCL=${CUDA_NCCL:-0}
if [ "$NCCL" = 1 ]; then LABEL=${CUDA_LOCAL_LABEL-cu13.nccl}; else LABEL=${CUDA_LOCAL_LABEL-cu13}; fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$ROOT/target-cuda}
export PIP_DISABLE_PIP_VERSION_CHECK=1

# CUDA 13.0 toolchain (pinned: a newer nvcc emits newer PTX that an R580 driver cannot JIT).
CUDA_PKGS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-nvvm==13.0.88"
)

step() { echo; echo "== $*"; }

step "toolchain venv: $TC"
if [ ! -x "$TC/bin/python" ]; then
  "$PY" -m venv "$TC"
fi
"$TC/bin/python" -m pip install -q "maturin>=1.5,<2" "wheel>=0.40" "${CUDA_PKGS[@]}"
SITE=$("$TC/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CUDA_HOME="$SITE/nvidia/cu13"
if [ ! -x "$CUDA_HOME/bin/nvcc" ] || [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ] \
   || [ ! -f "$CUDA_HOME/lib/libcudart.so.13" ]; then
  echo "error: unexpected layout under $CUDA_HOME (want bin/nvcc, include/, lib/libcudart.so.13)" >&2
  exit 1
fi
ln -sfn libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"  # for -lcudart (candle-kernels)
# Only CUDA_HOME may steer cudarc/cudaforge: they also read these, and NVCC wins over PATH.
unset CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB NVCC
export PATH="$CUDA_HOME/bin:$TC/bin:$PATH"
NVCC_RELEASE=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
echo "nvcc $NVCC_RELEASE at $(command -v nvcc); CUDA_HOME=$CUDA_HOME; CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

step "link stubs (driver, nvrtc, curand, cublas, cublasLt) from cudarc's bindings"
CUDARC_DIR=$(cargo metadata --format-version 1 --features cuda --manifest-path "$ROOT/Cargo.toml" \
  | "$TC/bin/python" -c '
import json, os, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
if len(pkgs) != 1:
    sys.exit("expected exactly one cudarc in the cuda build graph, got %d" % len(pkgs))
print(os.path.dirname(pkgs[0]["manifest_path"]))')
echo "cudarc: $CUDARC_DIR"
STUBS="$CUDA_HOME/lib/stubs"
mkdir -p "$STUBS"
# lib name : soname : cudarc module whose bindings list the symbols
for spec in cuda:libcuda.so.1:driver nvrtc:libnvrtc.so.13:nvrtc curand:libcurand.so.10:curand \
            cublas:libcublas.so.13:cublas cublasLt:libcublasLt.so.13:cublaslt; do
  IFS=: read -r lib soname module <<<"$spec"
  "$TC/bin/python" - "$CUDARC_DIR/src/$module/sys/mod.rs" "$STUBS/$lib.c" <<'PY'
import re, sys
names = sorted(set(re.findall(r'load::<_F>\("(\w+)"\)', open(sys.argv[1]).read())))
if not names:
    sys.exit("no symbols found in " + sys.argv[1])
with open(sys.argv[2], "w") as f:
    f.write("/* link-time stub generated by scripts/build_cuda.sh; every call fails */\n")
    for n in names:
        # 34 = CUDA_ERROR_STUB_LIBRARY, what NVIDIA's own stubs return
        f.write("int %s(void) { return 34; }\n" % n)
PY
  cc -shared -fPIC -O1 -o "$STUBS/lib$lib.so" -Wl,-soname,"$soname" "$STUBS/$lib.c"
  rm -f "$STUBS/$lib.c"
  echo "  $STUBS/lib$lib.so (soname $soname, $(nm -D --defined-only "$STUBS/lib$lib.so" | wc -l) symbols)"
done

FEATURES=extension-module,cuda
RUSTC_EXTRA=()
if [ "$NCCL" = 1 ]; then
  step "NCCL (nvidia-nccl-cu13) for the nccl feature"
  "$TC/bin/python" -m pip install -q "nvidia-nccl-cu13>=2.30,<2.31"
  NCCL_LIB="$SITE/nvidia/nccl/lib"
  if [ ! -f "$NCCL_LIB/libnccl.so.2" ]; then
    echo "error: no libnccl.so.2 under $NCCL_LIB" >&2
    exit 1
  fi
  ln -sfn libnccl.so.2 "$NCCL_LIB/libnccl.so"  # for -lnccl
  FEATURES=extension-module,nccl
  RUSTC_EXTRA=(-L "native=$NCCL_LIB" -C 'link-arg=-Wl,-rpath,$ORIGIN/../nvidia/nccl/lib')
fi

step "maturin build --release --features $FEATURES  (target dir: $CARGO_TARGET_DIR)"
RAW=$(mktemp -d "${TMPDIR:-/tmp}/ferrotune-cuda-wheel.XXXXXX")
trap 'rm -rf "$RAW"' EXIT
# --auditwheel skip: the CUDA libraries are external on purpose (driver + nvidia-* wheels);
# auditwheel's repair would try to vendor them (or the stubs) into the wheel.
maturin build --release --features "$FEATURES" \
  --interpreter "$TC/bin/python" --auditwheel skip --out "$RAW/raw" \
  -- -C 'link-arg=-Wl,-rpath,$ORIGIN/../nvidia/cu13/lib' "${RUSTC_EXTRA[@]}"
WHL=$(ls "$RAW"/raw/ferrotune-*.whl)

mkdir -p "$DIST"
if [ -n "$LABEL" ]; then
  step "relabel wheel version -> +$LABEL"
  "$TC/bin/python" -m wheel unpack -d "$RAW/unpacked" "$WHL" >/dev/null
  UNP=$(ls -d "$RAW"/unpacked/ferrotune-*)
  DI=$(ls -d "$UNP"/ferrotune-*.dist-info)
  VER=$(sed -n 's/^Version: //p' "$DI/METADATA")
  NEWVER="$VER+$LABEL"
  sed -i "s/^Version: .*/Version: $NEWVER/" "$DI/METADATA"
  mv "$DI" "$UNP/ferrotune-$NEWVER.dist-info"
  rm -f "$DIST"/ferrotune-*.whl
  "$TC/bin/python" -m wheel pack -d "$DIST" "$UNP" >/dev/null
else
  rm -f "$DIST"/ferrotune-*.whl
  cp "$WHL" "$DIST/"
fi
OUTWHL=$(ls "$DIST"/ferrotune-*.whl)
WHLVER=$(basename "$OUTWHL" | cut -d- -f2)

step "check the extension's dynamic section"
"$TC/bin/python" -m zipfile -e "$OUTWHL" "$RAW/check" >/dev/null
SO=$(ls "$RAW"/check/ferrotune/_core*.so)
readelf -d "$SO" | grep -E 'NEEDED|RUNPATH|RPATH'
if ! readelf -d "$SO" | grep -q 'libcuda.so.1'; then
  echo "error: the extension does not link libcuda.so.1; was the cuda feature on?" >&2
  exit 1
fi
# The linker keeps only the libraries whose symbols are used (--as-needed).
CUDA_NEEDED=$(readelf -d "$SO" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' \
  | grep -E '^lib(cuda|cudart|cublas|cublasLt|curand|nvrtc|nccl)\.so' | tr '\n' ' ')
if [ "$NCCL" = 1 ] && ! readelf -d "$SO" | grep -q 'libnccl.so.2'; then
  echo "error: CUDA_NCCL=1 but the extension does not link libnccl.so.2" >&2
  exit 1
fi

cat <<EOF

== done
CUDA wheel: $OUTWHL ($(du -h "$OUTWHL" | cut -f1))
  built with nvcc $NVCC_RELEASE, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; cargo target dir $CARGO_TARGET_DIR
  Same project name as the CPU wheel: installing it replaces the CPU build (pip sees
  ferrotune $WHLVER); ferrotune.__version__ stays the Cargo version.

Run-time requirements on the GPU machine:
  * NVIDIA driver R580 or newer (provides libcuda.so.1; CUDA 13.0 PTX is JIT-compiled by it).
    Without libcuda.so.1 'import ferrotune' fails: the extension links the driver directly.
  * The CUDA libraries the extension links: ${CUDA_NEEDED}
    (libcublas.so.13 pulls in libcublasLt.so.13). libcuda.so.1 is the driver's; the CUDA 13
    libraries come easiest from PyPI, in the same environment as the wheel (runtime and
    nvrtc are not linked today; installing them is harmless and covers future use):
        pip install "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \\
                    "nvidia-cublas>=13.0,<14" "nvidia-curand>=10.4,<11"
        pip install $(basename "$OUTWHL")
    They land in site-packages/nvidia/cu13/lib, which the extension finds through its
    RUNPATH (\$ORIGIN/../nvidia/cu13/lib) -- no LD_LIBRARY_PATH needed when both are in the
    same site-packages. With a system CUDA 13 toolkit instead (or wheels installed elsewhere,
    e.g. pip --user vs a venv), point LD_LIBRARY_PATH at that lib directory, e.g.
        export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64:\$LD_LIBRARY_PATH
  * The dynamic loader resolves these by soname at import time (cudarc is built with
    dynamic-linking, not dlopen), so a missing one is an ImportError naming the library.
EOF
if [ "$NCCL" = 1 ]; then
  cat <<EOF2
  * NCCL (this wheel has the nccl feature): pip install "nvidia-nccl-cu13>=2.30,<2.31"
    (libnccl.so.2, found through RUNPATH \$ORIGIN/../nvidia/nccl/lib). Without it
    'import ferrotune' fails with an ImportError naming libnccl.so.2.
EOF2
fi
