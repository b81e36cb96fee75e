#!/usr/bin/env bash
# The GPU check: one command on a GPU machine with no internet and no Rust toolchain (it
# needs python3 with torch, transformers, peft, pytest; nvidia-smi; optionally
# compute-sanitizer), given the CUDA wheel built beforehand on a CPU machine
# (scripts/build_cuda.sh):
#
#   bash scripts/gpu_check.sh [dist-cuda/ferrotune-<ver>+cu12-...whl]
#
# Every step runs on its own with a time limit (a failure or a crashed kernel does not hide
# the steps after it); the whole run stays under ~9 minutes on one H100. First the wheel is
# installed into a virtualenv that sees the system's site-packages (pip --no-index --no-deps:
# the NVIDIA libraries torch brought serve, CUDA 12's or 13's); then, most important first:
#   env             GPU, driver, torch
#   selfcheck-bf16  every CUDA primitive against its CPU twin at Phi-3's sizes, bf16
#   train           bench/gpu_train.py: Phi-3-mini dimensions, packed 4096-token rows, bf16,
#                   LoRA r 16, ferrotune vs transformers + peft (sdpa) in the same run:
#                   tokens/s, MFU, peak memory, loss agreement; then ferrotune's GPU profile
#                   of two more steps (device time per kernel and GEMM shape)
#   pytest          pytest -m gpu: the model vs the CPU, gradients vs peft, 20 training steps
#                   vs transformers + peft, greedy generation vs transformers
#   generate        bench/bench_generate.py on the GPU: prefill and decode vs `generate`
#   selfcheck-fp16, selfcheck-32   the self-check at the other precisions
#   memcheck, racecheck            compute-sanitizer on the small self-check / attention
#                                  (when compute-sanitizer is there)
# Results in $OUT (default ./gpu_check_out): gpu_check.json and gpu_check.md (the summary),
# gpu_check.log (every step's output), train_gpu.json, generate_gpu.json.
#
# Environment: OUT, PYTHON (default python3), GPU_CHECK_STEPS (the steps and their order, e.g.
# "selfcheck pytest"; "selfcheck" = the three precisions, "sanitizer" = both sanitizers),
# GPU_CHECK_QUICK=1 (shorter benchmarks), GPU_CHECK_BUDGET (seconds for the whole check,
# default 540).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-"env selfcheck-bf16 train pytest generate selfcheck-fp16 selfcheck-32 memcheck racecheck"}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/ferrotune-gpu-check.XXXXXX)
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1 FERROTUNE_TF32=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)

say() { echo "$*" | tee -a "$LOG"; }
# run NAME SECONDS CMD...: output into the log; status into $WORK/status.tsv. The whole check
# keeps within GPU_CHECK_BUDGET seconds (default 540: the device machine stops a command at
# 600), so the report at the end is always written: a step gets at most what is left, and a
# step with under 20 s left is skipped (status "-").
BUDGET=${GPU_CHECK_BUDGET:-540}
run() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  local left=$(( BUDGET - (t - T0) - 15 ))
  if [ "$left" -lt 20 ]; then
    say "== $name: skipped, ${left}s of the ${BUDGET}s budget left"
    printf '%s\t-\t0\n' "$name" >>"$WORK/status.tsv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say ""
  say "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t ))
  say "== $name: exit $rc after ${took}s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >>"$WORK/status.tsv"
  return 0
}

WHEEL=${1:-$(ls "$ROOT"/dist-cuda/ferrotune-*+cu12*.whl 2>/dev/null | head -n 1)}
if [ -z "$WHEEL" ] || [ ! -f "$WHEEL" ]; then
  echo "error: no CUDA wheel (build it with scripts/build_cuda.sh and carry dist-cuda/)" >&2
  exit 2
fi

# 1. a virtualenv that sees the system's packages (torch, transformers, peft, the NVIDIA
# libraries). The system python may itself be a venv, whose packages --system-site-packages
# would not show: a .pth file points at them.
VENV=$WORK/venv
"$PY" -m venv "$VENV"
SYS_SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
VSITE=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
echo "$SYS_SITE" >"$VSITE/system-site.pth"
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile "$WHEEL" >>"$LOG" 2>&1 \
  || { say "error: could not install $WHEEL"; exit 1; }
VPY=$VENV/bin/python

# The steps, one function each; they run in the order of GPU_CHECK_STEPS, most important
# first, so that a slow step costs the least useful ones: the bf16 self-check (are the kernels
# right at all), the training benchmark (the issue's numbers, loss agreement with the peer and
# ferrotune's own GPU profile), the GPU tests, generation, then the other precisions and the
# sanitizers. "selfcheck" stands for the three self-checks, "sanitizer" for both sanitizers.
step_env() {
  run env 45 bash -c "nvidia-smi; $VPY - <<'EOF'
import json, ferrotune, torch
print('ferrotune', ferrotune.__version__, ferrotune.__file__)
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
print('cuda_available', ferrotune.cuda_available())
EOF"
}
step_selfcheck() {  # precision: bf16, fp16 or 32
  local p=$1
  run "selfcheck-$p" "${2:-120}" "$VPY" -c "
import json, sys, ferrotune
checks = json.loads(ferrotune._core._gpu_selfcheck('cuda', '$p', full=True))
json.dump(checks, open('$WORK/selfcheck_$p.json', 'w'), indent=1)
for c in checks:
    print(('ok  ' if c['passed'] else 'FAIL'), c['name'], c['dtype'], '%.3g <= %.3g' % (c['error'], c['tolerance']), c['shapes'], c['failure'] or '')
sys.exit(0 if all(c['passed'] for c in checks) else 1)"
}
step_memcheck() {
  command -v compute-sanitizer >/dev/null 2>&1 || { say "== memcheck: no compute-sanitizer here"; return 0; }
  run memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$VPY" -c \
    "import ferrotune; print(ferrotune._core._gpu_selfcheck('cuda', 'bf16', full=False))"
}
step_racecheck() {
  command -v compute-sanitizer >/dev/null 2>&1 || { say "== racecheck: no compute-sanitizer here"; return 0; }
  run racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 "$VPY" -c \
    "import ferrotune; print(ferrotune._core._gpu_selfcheck('cuda', 'bf16', full=False, only='attention'))"
}
step_pytest() {
  # only the files that hold GPU tests: the others import packages the GPU machine may lack
  # (trl, datasets), and one collection error would stop the whole run. The machine's torch /
  # transformers are other versions than the test extra pins: their deprecation and user
  # warnings are shown, not turned into failures (pyproject's filterwarnings = error).
  local files
  files=$(grep -l "mark.gpu" tests/test_*.py)
  run pytest 200 "$VPY" -m pytest -m gpu -q -p no:cacheprovider -rs --continue-on-collection-errors \
    -W default::DeprecationWarning -W default::UserWarning -W default::FutureWarning \
    --junitxml "$WORK/pytest.xml" $files
}
step_train() {
  local quick=()
  [ "${GPU_CHECK_QUICK:-0}" = 1 ] && quick=(--steps 4 --warmup 2)
  run train 300 "$VPY" bench/gpu_train.py --out "$OUT/train_gpu.json" "${quick[@]}"
}
step_generate() {
  run generate 120 "$VPY" bench/bench_generate.py --device cuda --dtype bfloat16 \
    --hidden 3072 --layers 32 --heads 32 --intermediate 8192 --batches 1,8 --prompt 512 \
    --new 64 --repeats 3 --threads 8 --out "$OUT/generate_gpu.json"
}
for s in $STEPS; do
  case $s in
    env) step_env ;;
    selfcheck) for p in bf16 fp16 32; do step_selfcheck $p; done ;;
    selfcheck-bf16 | selfcheck-fp16 | selfcheck-32) step_selfcheck "${s#selfcheck-}" ;;
    sanitizer) step_memcheck; step_racecheck ;;
    memcheck) step_memcheck ;;
    racecheck) step_racecheck ;;
    pytest) step_pytest ;;
    train) step_train ;;
    generate) step_generate ;;
    *) say "== unknown step $s (steps: env selfcheck[-bf16|-fp16|-32] train pytest generate memcheck racecheck sanitizer)" ;;
  esac
done

"$VPY" scripts/gpu_check_report.py --work "$WORK" --out "$OUT" --wheel "$WHEEL" \
  --seconds $(( $(date +%s) - T0 )) | tee -a "$LOG"
rm -rf "$WORK"
