#!/usr/bin/env bash
# The GPU suite on a fresh H200 machine in one device call (10 minutes, compile time included; target < 6).
#
#   bash tests/gpu/run_h200.sh                 # from the repository root; results in $OUT (or /tmp/gpu-tests)
#   WORKERS=4 bash tests/gpu/run_h200.sh -k kernels    # extra arguments go to pytest
#   SANITIZE=1 bash tests/gpu/run_h200.sh      # instead: tests/gpu/sanitize.py under compute-sanitizer memcheck
#
# Writes to $OUT: device.txt (GPU, driver, torch, triton), pytest.log, junit.xml, durations (the slowest
# tests: the first test of each xdist group carries its compiles), summary.txt (the pytest summary line, wall
# time, cache size). The compile caches live in .triton-cache/ (git-ignored, shared by the workers); carry it
# to a later call to skip most compiles.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-tests}
WORKERS=${WORKERS:-8}
PYTHON=${PYTHON:-python}
BUDGET=${BUDGET:-540}  # seconds before pytest is interrupted (it still writes its summary and junit.xml)
mkdir -p "$OUT"

export MMEFF_TRITON_PIN=1 TRITON_CACHE_AUTOTUNING=1
export TRITON_CACHE_DIR="$PWD/.triton-cache/triton" TORCHINDUCTOR_CACHE_DIR="$PWD/.triton-cache/inductor"
export TORCHINDUCTOR_COMPILE_THREADS=2 OMP_NUM_THREADS=2  # per worker: 8 workers share 16 cores
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
unset MMEFF_FORCE_REFERENCE TRITON_INTERPRET

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  "$PYTHON" -c "import xdist; print('pytest-xdist', xdist.__version__)" 2>&1 | tail -1
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

start=$(date +%s)
if [ -n "${SANITIZE:-}" ]; then
  timeout -s INT "$BUDGET" compute-sanitizer --tool memcheck --print-limit 50 \
    "$PYTHON" tests/gpu/sanitize.py "$@" 2>&1 | tee "$OUT/sanitize.log"
  rc=${PIPESTATUS[0]}
  summary=$(grep -E "ERROR SUMMARY|failed" "$OUT/sanitize.log" | tail -2 | tr '\n' ' ')
else
  extra=()
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=420)
  timeout -s INT "$BUDGET" "$PYTHON" -m pytest tests/gpu -n "$WORKERS" --dist loadgroup -q -p no:cacheprovider \
    -rfEs --durations=30 --junitxml="$OUT/junit.xml" ${extra[@]+"${extra[@]}"} "$@" 2>&1 | tee "$OUT/pytest.log"
  rc=${PIPESTATUS[0]}
  summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)|(passed|failed|errors?) in " "$OUT/pytest.log" | tail -1)
  sed -n '/slowest .*durations/,/^$/p' "$OUT/pytest.log" > "$OUT/durations.txt"
fi
wall=$(( $(date +%s) - start ))
{
  echo "command: ${SANITIZE:+SANITIZE=1 }bash tests/gpu/run_h200.sh $*  (WORKERS=$WORKERS)"
  echo "device: $(head -1 "$OUT/device.txt")"
  echo "summary: $summary"
  echo "exit code: $rc, wall time: ${wall} s"
  echo "cache: $(du -sh .triton-cache 2>/dev/null | cut -f1) in .triton-cache"
} | tee "$OUT/summary.txt"
exit "$rc"
