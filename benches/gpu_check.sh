#!/usr/bin/env bash
# The one script for a machine with an NVIDIA GPU (the lent H200, or yours). From the repo root:
#     bash benches/gpu_check.sh
# Builds autoglm_rt from source against that machine's own torch, runs every CUDA test
# (pytest -m cuda), the GPU ratio suites (benches/run_ratios.py --device cuda) and each
# standalone GPU script benches/gpu_*.py (those that must own the process, e.g. to install the
# pool as torch's allocator before CUDA starts). Logs and JSON go to $OUT (default
# build/gpu_check). Budget: under 8 minutes in all; each stage has its own timeout.
set -uo pipefail
OUT="${OUT:-$PWD/build/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }
failed=0

log "nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/machine.txt" 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  >> "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

log "build (CUDAARCHS=${CUDAARCHS:=90-real})"
if ! CUDAARCHS="$CUDAARCHS" timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . \
     > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"
  log "BUILD FAILED"
  exit 1
fi
"$PY" -c "import autoglm_rt, json; print(json.dumps(autoglm_rt.build_info()))" | tee -a "$OUT/machine.txt"

log "pytest -m cuda"
timeout 240 "$PY" -m pytest -m cuda -q -ra --benchmark-disable -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

log "GPU ratio suites"
mkdir -p "$OUT/results"
# Only the suites with a CUDA case (the others measure host-side code).
timeout 150 "$PY" benches/run_ratios.py grad_stats topk --device cuda --out "$OUT/results" 2>&1 | tee "$OUT/bench_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

for script in benches/gpu_*.py; do
  [ -e "$script" ] || continue
  log "$script"
  timeout 120 "$PY" "$script" --out "$OUT/results" 2>&1 | tee -a "$OUT/bench_cuda.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
done
tar -C "$OUT" -czf "$OUT/results.tar.gz" results && rm -rf "$OUT/results"

log "done (failed=$failed)"
exit "$failed"
