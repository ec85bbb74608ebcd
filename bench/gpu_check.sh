#!/usr/bin/env bash
# One command for a CUDA machine: build the extension, run the whole test suite on CUDA, run the GPU
# benchmarks, and write logs and a short summary under OUTDIR. Budget: under 10 minutes on one H100.
#   bash bench/gpu_check.sh OUTDIR
# Works offline with the GPU image (Python 3.12, torch 2.11, Triton 3.6): nothing is downloaded.
# At most 8 files are left (the device tool returns 8): summary.md (beit_fast.info and every benchmark's
# markdown table), build.log, tests.log, bench.log and the JSON rows of each benchmark.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 BEIT_FAST_TRITON_INTERPRET=0
unset TRITON_INTERPRET
SUMMARY="$OUT/summary.md"
step() {  # step NAME TIMEOUT_S LOG CMD...: run with a time limit, record status and wall time
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s)
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc=$rc)") | $(( $(date +%s) - t0 )) s |" >>"$SUMMARY"
  return $rc
}
{
  echo "# gpu_check $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  echo
  echo "| step | status | wall |"
  echo "|---|---|---|"
} >"$SUMMARY"

# 1. build: CUDA required, Hopper only to keep the build short (sm_80 is built by the default install)
BEIT_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  step build 180 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
  || { echo "build failed: see build.log" >>"$SUMMARY"; exit 1; }

# 2. the whole test suite, on CUDA (Triton compiled, not interpreted)
step tests 170 "$OUT/tests.log" "$PY" -m pytest -q -rs tests -p no:cacheprovider

# 3. benchmarks: BEiT-B/L training shapes in bf16 (full sweeps: run the scripts by hand)
step bench_attention 110 "$OUT/bench.log" "$PY" bench/bench_attention.py --out "$OUT" --dtypes bf16 --quick
step bench_blocks 70 "$OUT/bench.log" "$PY" bench/bench_blocks.py --out "$OUT" --dtypes bf16 --quick
step bench_model 60 "$OUT/bench.log" "$PY" bench/bench_model.py --out "$OUT" --dtypes bf16 --quick
{ echo; echo "tests: $(tail -n 1 "$OUT/tests.log")"; echo '```'; timeout 60 "$PY" -m beit_fast.info 2>&1; echo '```'; echo; } >>"$SUMMARY"
for md in "$OUT"/bench_*.md; do [ -f "$md" ] && { echo; cat "$md"; } >>"$SUMMARY" && rm "$md"; done
cat "$SUMMARY"
