#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a virtualenv in .venv with ferrotune built from this
# checkout (release profile) and the test/benchmark dependencies.
#   bash scripts/setup.sh          # then: .venv/bin/ferrotune demo
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "maturin>=1.5,<2"
# maturin installs the package's dependencies and the [test] extra, then builds the
# native module into the virtualenv (editable: python/ is used in place).
VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" .venv/bin/maturin develop --release --extras test -q
.venv/bin/python -c "import ferrotune; print('ferrotune', ferrotune.__version__, 'ready in .venv')"
