#!/usr/bin/env bash
# ipc_device_run.sh — nsad's CUDA backend end to end on a GPU machine, from a
# prebuilt build dir (default build-cudad, built with CUDA on):
#   1. test_cuda_ipc (separate client processes, CUDA IPC, sync=false events,
#      killed client, IPC errors, shm regions + nsa_example)
#   2. nsa_example against `nsad --backend cuda` (host shm regions)
#   3. the rest of `ctest -L gpu` in the time left
#   tests/cuda/ipc_device_run.sh [BUILDDIR] [SECONDS]
# BUILDDIR/deps may hold shared libraries the GPU machine lacks (libuv,
# msgpack-c, Criterion, ...); only the missing ones are put on the library
# path, so nothing shadows the machine's own. Logs go to $OUT
# (default /tmp/nsa-ipc-out); a summary is printed last.
set -uo pipefail
B=${1:-build-cudad}
BUDGET=${2:-280}
OUT=${OUT:-/tmp/nsa-ipc-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -d "$B/deps" ]; then
  mkdir -p "$B/need"
  export LD_LIBRARY_PATH="$PWD/$B/need:$LD_LIBRARY_PATH"
  for _ in 1 2 3 4; do # transitive: a linked-in dep may itself miss one
    for lib in $(ldd "$B"/bin/* "$B"/lib/*.so* "$B"/need/* 2>/dev/null |
                 awk '/not found/ {print $1}' | sort -u); do
      [ -e "$B/deps/$lib" ] && ln -sf "$PWD/$B/deps/$lib" "$B/need/$lib"
    done
  done
  echo "libraries taken from $B/deps: $(ls "$B/need" | tr '\n' ' ')"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0

t0=$SECONDS
timeout 170 "$B/bin/test_cuda_ipc" --jobs 1 --verbose > "$OUT/cuda_ipc.log" 2>&1 || rc=1
echo "== test_cuda_ipc ($((SECONDS - t0)) s)"
grep -E "ipc_client|^\[(PASS|FAIL|SKIP|RUN )\]|Synthesis|:[0-9]+: " "$OUT/cuda_ipc.log" | tail -70

echo "== nsa_example against nsad --backend cuda"
S=/tmp/nsad-example.sock
rm -f "$S"
"$B/bin/nsad" --backend cuda --socket "$S" --log-level debug > "$OUT/nsad_example.log" 2>&1 &
np=$!
for _ in $(seq 150); do [ -S "$S" ] && break; kill -0 "$np" 2>/dev/null || break; sleep 0.1; done
timeout 60 "$B/bin/nsa_example" --socket "$S" --iters 3 2>&1 | tee "$OUT/example.log" || rc=1
kill -TERM "$np" 2>/dev/null
wait "$np"
nrc=$?
echo "nsad exit $nrc"
[ "$nrc" = 0 ] || rc=1
grep -E "cuda backend|queue 0|error|warn" "$OUT/nsad_example.log" | head -8

# The client suites (device pointers through this backend) first, then the
# kernel suites in whatever time is left.
: > "$OUT/ctest_gpu.log"
for sel in "-R ^(client_cuda|python_cuda)$" "-E ^(cuda_ipc|client_cuda|python_cuda)$"; do
  left=$((BUDGET - SECONDS))
  echo "== ctest -L gpu $sel (${left} s left)"
  [ "$left" -gt 20 ] || break
  # shellcheck disable=SC2086
  (cd "$B" && timeout "$left" ctest -L gpu $sel --output-on-failure --timeout 120) \
    >> "$OUT/ctest_gpu.log" 2>&1 || rc=1
done
grep -E "Test +#|tests passed|FAIL|Failed|Synthesis" "$OUT/ctest_gpu.log" | tail -25
echo "ipc_device_run rc=$rc (${SECONDS} s)"
exit $rc
