#!/usr/bin/env bash
# The one script for a machine with an NVIDIA GPU (the lent H200, or yours). From the repo root:
#     bash benches/gpu_check.sh
# Builds autoglm_rt from source against that machine's own torch (AUTOGLM_RT_CUDA=ON: no silent
# CPU-only build), refuses to go on unless the CUDA kernels are compiled and a device is usable
# (otherwise every CUDA test would merely be skipped and the run would look green), then runs every
# CUDA test (pytest -m cuda), the GPU ratio suites (benches/run_ratios.py --device cuda) and each
# standalone GPU script benches/gpu_*.py (those that must own the process, e.g. to install the
# pool as torch's allocator before CUDA starts). Logs and JSON go to $OUT (default
# build/gpu_check): machine.txt, build.log, pytest_cuda.log, pytest_cuda.xml, bench_cuda.log,
# results.tar.gz, summary.txt (at most 8 files, flat: what the device tool brings back).
# Budget: GPU_CHECK_BUDGET_S seconds in all (default 450); each stage gets its own cap, cut to
# what is left of the budget, so the script ends in time even when a stage hangs.
set -uo pipefail
OUT="${OUT:-$PWD/build/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$OUT/summary.txt"; }
# cap_for CAP: the stage's timeout, at most what is left of the budget (at least 10 s).
cap_for() {
  local left=$(( BUDGET - $(elapsed) ))
  local cap=$1
  (( left < cap )) && cap=$left
  (( cap < 10 )) && cap=10
  echo "$cap"
}
failed=0
: > "$OUT/summary.txt"

log "nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/machine.txt" 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  >> "$OUT/machine.txt" 2>&1
if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
{ command -v nvcc && nvcc --version | tail -n 2; } >> "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

log "build (CUDAARCHS=${CUDAARCHS:=90-real}, AUTOGLM_RT_CUDA=ON)"
if ! AUTOGLM_RT_CUDA=ON CUDAARCHS="$CUDAARCHS" timeout "$(cap_for 300)" \
     "$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"
  log "BUILD FAILED"
  exit 1
fi
# ptxas register / shared-memory / spill report of every kernel, as compiled for this machine.
if command -v cuobjdump > /dev/null; then
  so=$("$PY" -c "import autoglm_rt._native as n; print(n._C.__file__)" 2>/dev/null)
  [ -n "$so" ] && cuobjdump --dump-resource-usage "$so" 2>&1 | grep -E "Function|REG|STACK|SHARED" >> "$OUT/build.log"
fi
"$PY" -c "import autoglm_rt, json; print(json.dumps(autoglm_rt.build_info()))" | tee -a "$OUT/machine.txt"
if ! "$PY" -c "
import sys, autoglm_rt
ok, reason = autoglm_rt.cuda_available(return_reason=True)
sys.exit(0 if ok else f'autoglm_rt cannot use CUDA here: {reason}')"; then
  log "CUDA NOT USABLE: every CUDA test would be skipped; stopping"
  exit 1
fi

log "pytest -m cuda"
# One process: if a kernel faults, the first failing test is the one to read (the CUDA context
# is lost for the tests after it). No pytest-xdist: unverified with this pytest-benchmark setup.
# Warnings stay warnings here (-W default overrides the ini's "error"): the device image's torch,
# Python and numpy differ from CI's, and a new deprecation warning must not fail collection.
# A per-test timeout (pytest-timeout, where installed) names a hung test instead of losing the run.
PER_TEST=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
  PER_TEST=(--timeout=60 --timeout-method=thread)
else
  log "pytest-timeout is not installed: no per-test timeout (the stage cap still applies)"
fi
timeout "$(cap_for 200)" "$PY" -m pytest -m cuda -q -ra --benchmark-disable -p no:cacheprovider \
  -W default ${PER_TEST[@]+"${PER_TEST[@]}"} --junitxml="$OUT/pytest_cuda.xml" 2>&1 | tee "$OUT/pytest_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { failed=1; log "pytest -m cuda FAILED"; }
# A CUDA test skipped on a GPU machine is a failure of this check, not a pass.
if grep -qE "^SKIPPED" "$OUT/pytest_cuda.log"; then
  failed=1
  log "some CUDA tests were SKIPPED on a GPU machine (see pytest_cuda.log)"
fi

log "GPU ratio suites"
mkdir -p "$OUT/results"
# Only the suites with a CUDA case (the others measure host-side code).
timeout "$(cap_for 120)" "$PY" benches/run_ratios.py grad_stats topk --device cuda --out "$OUT/results" 2>&1 \
  | tee "$OUT/bench_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { failed=1; log "GPU ratio suites FAILED"; }

for script in benches/gpu_*.py; do
  [ -e "$script" ] || continue
  log "$script"
  timeout "$(cap_for 120)" "$PY" "$script" --out "$OUT/results" 2>&1 | tee -a "$OUT/bench_cuda.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { failed=1; log "$script FAILED"; }
done
tar -C "$OUT" -czf "$OUT/results.tar.gz" results && rm -rf "$OUT/results"

log "done (failed=$failed)"
exit "$failed"
