#!/usr/bin/env bash
# GPU check of this package's CUDA kernels, for a machine with an NVIDIA GPU, a CUDA build of
# torch and the CUDA toolkit (nvcc) matching it. In under 8 minutes it
#   1. builds the native extension with the CUDA kernels in place (python setup.py build_ext --inplace,
#      for this GPU's architecture only) and checks that the CUDA ops are registered;
#   2. runs the CUDA tests (pytest -k "cuda and not nvcc", with OPTIMUM_LCQAT_CUDA_KERNELS=1, the
#      opt-in that sends CUDA tensors to these kernels; without it they take the torch reference path);
#   3. runs the per-layer kernel benchmark (benchmarks/kernels_cuda.py layers: GB/s of the packed
#      weight bytes against the device-to-device copy bandwidth measured in the same run);
#   4. runs a short decode benchmark (kernels_cuda.py decode), then, if time is left, the same for the
#      2-bit model on the reference path (opt-in unset);
# and writes benchmarks/results/gpu_check_<UTC date>.json and .md (kernels_cuda.py report), also when
# a step fails. Exit status 0 only when the build, the tests and both benchmarks passed.
#
#   bash scripts/gpu_check.sh
#
# Environment: PYTHON (default python3); GPU_CHECK_BUDGET_S (default 470: the steps' time limits
# are cut to fit it); GPU_CHECK_SKIP_BUILD=1 to use an extension already built in place;
# GPU_CHECK_PYTEST_ARGS to replace the test selection (default: tests -k "cuda and not nvcc").
# Logs of every step stay in the work directory it prints (GPU_CHECK_WORK to choose it).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
DATE=$(date -u +%Y-%m-%d)
OUT_PREFIX="benchmarks/results/gpu_check_$DATE"
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
STEPS="$WORK/steps.tsv"
: > "$STEPS"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OPTIMUM_LCQAT_CUDA_KERNELS=1
unset OPTIMUM_LCQAT_NO_CUDA OPTIMUM_LCQAT_NO_EXT
export PYTHONUNBUFFERED=1

log() { printf '[gpu_check %s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$(( $(date +%s) - START ))" "$*"; }
die() { log "ERROR: $*"; exit 1; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME MAX_S CMD...: run CMD with a time limit of min(MAX_S, time left - 25 s for the report),
# output shown (prefixed) and kept in $WORK/NAME.log; records "name rc seconds limit note" in
# $STEPS. Never stops the script: the caller reads the status with step_ok NAME.
step() {
  local name=$1 max=$2 limit rc t0
  shift 2
  limit=$(( $(left) - 25 ))
  [ "$limit" -gt "$max" ] && limit=$max
  if [ "$limit" -lt 20 ]; then
    log "step $name: SKIPPED, only $(left)s of the ${BUDGET}s budget left"
    printf '%s\t-\t0\t0\tskipped: out of time\n' "$name" >> "$STEPS"
    return 0
  fi
  log "step $name (limit ${limit}s): $*"
  t0=$(date +%s)
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" | sed -u "s/^/  [$name] /"
  rc=${PIPESTATUS[0]}
  set -e
  local dt=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$limit" "${NOTE:-}" >> "$STEPS"
  case $rc in
    0) log "step $name: ok (${dt}s)" ;;
    124|137) log "step $name: TIMED OUT after ${limit}s (log $WORK/$name.log)" ;;
    *) log "step $name: FAILED, exit $rc (log $WORK/$name.log)" ;;
  esac
}
step_ok() { awk -F'\t' -v s="$1" '$1 == s { rc = $2 } END { exit !(rc == "0") }' "$STEPS"; }
skip() {  # skip NAME REASON
  log "step $1: SKIPPED ($2)"
  printf '%s\t-\t0\t0\tskipped: %s\n' "$1" "$2" >> "$STEPS"
}

# ------------------------------------------------------------------ preflight
log "repository $ROOT, work directory $WORK, budget ${BUDGET}s, python $(command -v "$PY" || echo "$PY: not found")"
command -v "$PY" > /dev/null || die "$PY not found (set PYTHON)"
command -v timeout > /dev/null || die "the timeout command (coreutils) is missing"
SMI=""
if command -v nvidia-smi > /dev/null; then
  SMI=$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | paste -sd ';' - || true)
  log "nvidia-smi: $SMI"
else
  log "nvidia-smi not found (continuing: torch decides whether a GPU is usable)"
fi
timeout 120 "$PY" - <<'EOF' || die "this check needs a CUDA build of torch that sees a GPU (see the line above)"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
if torch.version.cuda is None or not torch.cuda.is_available():
    raise SystemExit(1)
print("device 0:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
timeout 120 "$PY" - <<'EOF' || die "missing Python packages (above): install the CUDA build of torch first, then pip install -r requirements.txt"
import importlib.util, sys
need = ["transformers", "accelerate", "safetensors", "pytest"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if importlib.util.find_spec("ninja") is None:
    print("note: ninja is not installed; the build falls back to a slow serial compile (pip install ninja)")
if missing:
    print("missing:", ", ".join(missing))
    sys.exit(1)
EOF
CUDA_HOME_PY=$(timeout 120 "$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')")
NVCC=""
if [ -n "$CUDA_HOME_PY" ] && [ -x "$CUDA_HOME_PY/bin/nvcc" ]; then
  NVCC=$("$CUDA_HOME_PY/bin/nvcc" --version | tail -n 2 | paste -sd ' ' -)
  log "CUDA toolkit $CUDA_HOME_PY: $NVCC"
elif [ "${GPU_CHECK_SKIP_BUILD:-}" != "1" ]; then
  die "no CUDA toolkit found by torch (CUDA_HOME / nvcc on PATH): install the toolkit matching torch's CUDA version, or set CUDA_HOME"
fi
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
log "building for this GPU's architecture only: TORCH_CUDA_ARCH_LIST=$ARCH"

# ------------------------------------------------------------------ 1. build
if [ "${GPU_CHECK_SKIP_BUILD:-}" = "1" ]; then
  NOTE="GPU_CHECK_SKIP_BUILD=1: extension already built" step build 60 true
else
  NOTE="setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST=$ARCH" \
    step build 260 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
fi
if step_ok build; then
  NOTE="native.cuda_built()" step verify 60 "$PY" -c "
from optimum_lcqat.kernels import native
import sys
print('native available:', native.available(), '| CUDA kernels built:', native.cuda_built(), '| CPU ISA:', native.cpu_isa())
sys.exit(0 if native.available() and native.cuda_built() else 1)"
fi

# ------------------------------------------------------------------ 2.-4. tests and benchmarks
if step_ok build && step_ok verify; then
  if [ -n "${GPU_CHECK_PYTEST_ARGS:-}" ]; then
    # shellcheck disable=SC2206  # word splitting of the user's pytest arguments is intended
    PYTEST_ARGS=($GPU_CHECK_PYTEST_ARGS)
  else
    PYTEST_ARGS=(tests -k "cuda and not nvcc")
  fi
  NOTE="pytest ${PYTEST_ARGS[*]}" step tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider \
    --junitxml="$WORK/pytest.xml" "${PYTEST_ARGS[@]}"
  NOTE="kernels_cuda.py layers" step layers 120 "$PY" benchmarks/kernels_cuda.py layers --require-cuda \
    --rounds 3 --min-run-time 0.05 --out "$WORK/layers.json"
  NOTE="kernels_cuda.py decode, OPTIMUM_LCQAT_CUDA_KERNELS=1" step decode 110 "$PY" benchmarks/kernels_cuda.py decode \
    --require-cuda --out "$WORK/decode.json"
  if [ "$(left)" -gt 100 ]; then
    NOTE="kernels_cuda.py decode, opt-in unset (reference path)" step decode_reference 70 \
      env -u OPTIMUM_LCQAT_CUDA_KERNELS "$PY" benchmarks/kernels_cuda.py decode --require-cuda \
      --variants lcqat_bf16 --rounds 2 --out "$WORK/decode_reference.json"
  else
    skip decode_reference "less than 100 s left"
  fi
else
  for s in tests layers decode; do skip "$s" "the build did not give CUDA kernels"; done
fi

# ------------------------------------------------------------------ report
TOTAL=$(( $(date +%s) - START ))
rc=0
timeout 60 "$PY" benchmarks/kernels_cuda.py report --work "$WORK" --out-prefix "$OUT_PREFIX" --total-s "$TOTAL" \
  --required build verify tests layers decode --nvidia-smi "$SMI" --nvcc "$NVCC" || rc=$?
log "steps (name, exit, seconds, limit, note):"
sed 's/^/  /' "$STEPS"
log "done in $(( $(date +%s) - START ))s; results: $OUT_PREFIX.json / .md; logs: $WORK"
exit "$rc"
