#!/usr/bin/env bash
# device_run.sh — run the gpu suites on a GPU machine from prebuilt binaries.
#   tests/cuda/device_run.sh [BINDIR] [--bench full|quick|none]
# BINDIR holds test_cuda_plan, test_cuda_fwd, nsa_bench_cuda and lib/ (the
# non-system shared libraries they need); default: build/bin with no lib/.
# Writes logs under $OUT (default /tmp/nsa-gpu-out) and prints a summary.
set -uo pipefail
B=${1:-build/bin}
BENCH=${3:-quick}
OUT=${OUT:-/tmp/nsa-gpu-out}
mkdir -p "$OUT"
[ -d "$B/lib" ] && export LD_LIBRARY_PATH="$PWD/$B/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
{ echo "HMMA in test_cuda_fwd: $(cuobjdump -sass "$B/test_cuda_fwd" | grep -c HMMA)";
  echo "LDSM: $(cuobjdump -sass "$B/test_cuda_fwd" | grep -c LDSM)  LDGSTS: $(cuobjdump -sass "$B/test_cuda_fwd" | grep -c LDGSTS)";
  echo "LDL/STL (local memory): $(cuobjdump -sass "$B/test_cuda_fwd" | grep -cE '\bLDL|\bSTL')"; } 2>&1 | tee "$OUT/sass.txt"
rc=0
timeout 200 "$B/test_cuda_plan" --jobs 1 --verbose > "$OUT/plan.log" 2>&1 || rc=1
grep -E "FAIL|Synthesis" "$OUT/plan.log" | tail -20
timeout 300 "$B/test_cuda_fwd" --jobs 1 --verbose > "$OUT/fwd.log" 2>&1 || rc=1
grep -E "FAIL|CRASH|Synthesis|:[0-9]+: " "$OUT/fwd.log" | head -40
# memcheck: planner suite, the invalid-selection test and a bf16 + f32 slice
: > "$OUT/memcheck.log"
for f in 'cuda_plan/*' ; do
  timeout 200 compute-sanitizer --tool memcheck --target-processes all --error-exitcode 9 \
    "$B/test_cuda_plan" --jobs 1 --filter "$f" >> "$OUT/memcheck.log" 2>&1 || { echo "memcheck FAIL $f"; rc=1; }
done
for f in 'cuda_fwd/invalid_selection' 'cuda_fwd/shapes_and_blocks' 'cuda_fwd/heads_bf16_blocks' \
         'cuda_fwd/layouts_and_fallbacks' 'cuda_fwd/async_graph_determinism' 'cuda_fwd/flags_choose_path' \
         'cuda_fwd/key_vs_query_centric' 'cuda_fwd/key_centric_falls_back_under_cap'; do
  timeout 200 compute-sanitizer --tool memcheck --target-processes all --error-exitcode 9 \
    "$B/test_cuda_fwd" --jobs 1 --filter "$f" >> "$OUT/memcheck.log" 2>&1 || { echo "memcheck FAIL $f"; rc=1; }
done
grep -E "ERROR SUMMARY|Synthesis" "$OUT/memcheck.log" | sort | uniq -c
case "$BENCH" in
  quick) timeout 240 "$B/nsa_bench_cuda" --quick --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.txt" ;;
  full) timeout 400 "$B/nsa_bench_cuda" --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.txt" ;;
esac
echo "device_run rc=$rc"
exit $rc
