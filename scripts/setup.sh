#!/usr/bin/env bash
# Set-up on a fresh machine (python3 >= 3.10 and a Rust toolchain): a virtualenv in .venv
# with ferrotune built from this checkout by maturin (release profile; the first build
# compiles the Rust dependencies and takes several minutes).
#
#   bash scripts/setup.sh            ferrotune and its runtime dependencies (numpy, tqdm):
#                                    all that `.venv/bin/ferrotune demo` needs (~130 MB)
#   bash scripts/setup.sh --test     the same plus the test extra (pytest, transformers,
#                                    torch, trl, peft, ...: several GB) for
#                                    `.venv/bin/python -m pytest`, built with CUDA support
#                                    and the emulated GPU (cargo features cuda, gpu-emu; the
#                                    CUDA kernels are compiled by NVRTC from PyPI into
#                                    target/kernels) so the tests also run the GPU code path
#                                    and the CUDA loading without a GPU
#   bash scripts/setup.sh --dry-run  print the commands instead of running them
#
# Running it again reuses .venv (and cargo's build cache); --test adds the test extra to
# an existing demo set-up. PYTHON=/path/to/python3 picks the interpreter.
set -euo pipefail

# the whole leading comment block, whatever its length
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

extras=""
dry=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="test" ;;
    --dry-run) dry=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$arg' (use --test, --dry-run or --help)" ;;
  esac
done

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Check the prerequisites before creating anything.
command -v "$PY" >/dev/null 2>&1 || die "'$PY' not found; install Python >= 3.10 (or set PYTHON=/path/to/python3)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])') is too old; ferrotune needs Python >= 3.10 (set PYTHON=/path/to/python3)"
"$PY" -c 'import venv, ensurepip' 2>/dev/null \
  || die "$PY cannot create virtualenvs (on Debian/Ubuntu: apt install python3-venv)"
command -v cargo >/dev/null 2>&1 || die "cargo not found; install a Rust toolchain (https://rustup.rs) and open a new shell"

run() {
  if [ -n "$dry" ]; then printf '%s\n' "$*"; else "$@"; fi
}

if [ ! -x .venv/bin/python ]; then
  run "$PY" -m venv .venv
fi
run .venv/bin/python -m pip install -q --disable-pip-version-check "maturin>=1.5,<2"
# maturin installs the package's dependencies (and the extra, if any), then builds the
# native module into the virtualenv (editable: python/ is used in place).
build=(.venv/bin/maturin develop --release -q)
if [ -n "$extras" ]; then
  # The CUDA kernels for the `cuda` feature: CUDA 12's NVRTC from PyPI (no GPU needed), once.
  kernels="$PWD/target/kernels"
  if [ ! -f "$kernels/manifest.json" ] || [ -n "$(find src/kernels/cuda -newer "$kernels/manifest.json" -name '*.cu*' 2>/dev/null)" ]; then
    if [ ! -x .cuda-toolchain/bin/python ]; then run "$PY" -m venv .cuda-toolchain; fi
    run .cuda-toolchain/bin/python -m pip install -q --disable-pip-version-check \
      "nvidia-cuda-nvrtc-cu12==12.8.93" "nvidia-cuda-runtime-cu12==12.8.90" "nvidia-cuda-nvcc-cu12==12.8.93"
    cuda_site=.cuda-toolchain/lib/python3*/site-packages
    run .cuda-toolchain/bin/python scripts/compile_kernels.py --cuda-site $cuda_site --out "$kernels" -q
  fi
  build+=(--extras "$extras" --features extension-module,gpu-emu,cuda)
  export FERROTUNE_KERNELS_DIR="$kernels"
fi
run env VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" "${build[@]}"
if [ -n "$extras" ]; then
  next=".venv/bin/python -m pytest"
else
  next=".venv/bin/ferrotune demo"
fi
run .venv/bin/python -c "import ferrotune; print('ferrotune', ferrotune.__version__, 'ready in .venv; next: $next')"
