#!/usr/bin/env bash
# Sets up, builds, starts nsad (CUDA when a GPU is usable, else CPU) on a
# private socket, drives it with the example client and nsactl, and stops it
# cleanly (exit code 0 required).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=$(nproc)
bld="${NSAD_BUILD_DIR:-build}"   # build directory (default build/)

cmake -S . -B "$bld" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$bld" -j"$jobs" --target nsad nsactl nsa_example

tmp=$(mktemp -d /tmp/nsad-demo.XXXXXX)
sock="$tmp/nsad.sock"
log="$tmp/nsad.log"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "== starting nsad --backend auto on $sock"
"$bld"/bin/nsad --backend auto --socket "$sock" --state-dir "$tmp/state" 2>"$log" &
pid=$!
for _ in $(seq 1 100); do
  if "$bld"/bin/nsactl --socket "$sock" ping >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then echo "nsad exited early:"; cat "$log"; exit 1; fi
  sleep 0.1
done
"$bld"/bin/nsactl --socket "$sock" ping

echo "== nsactl status"
"$bld"/bin/nsactl --socket "$sock" status

echo "== example client: selection attention through nsad vs the float64 reference"
"$bld"/bin/nsa_example --socket "$sock"

echo "== switching the path centrally: NSA_SEL_VARLEN_V2=0 (varlen_v1), then NSA_USE_SEL_VARLEN=0 (packed)"
"$bld"/bin/nsactl --socket "$sock" flags set NSA_SEL_VARLEN_V2=0
"$bld"/bin/nsa_example --socket "$sock"
"$bld"/bin/nsactl --socket "$sock" flags reset NSA_SEL_VARLEN_V2
"$bld"/bin/nsactl --socket "$sock" flags set NSA_USE_SEL_VARLEN=0
"$bld"/bin/nsa_example --socket "$sock"
"$bld"/bin/nsactl --socket "$sock" flags reset NSA_USE_SEL_VARLEN

echo "== stopping nsad (nsactl shutdown: drain, exit 0)"
"$bld"/bin/nsactl --socket "$sock" shutdown
rc=0
wait "$pid" || rc=$?
pid=""
echo "== nsad log"
cat "$log"
if [ "$rc" -ne 0 ]; then
  echo "demo: nsad exited with $rc"
  exit 1
fi
echo "demo: OK (nsad exited 0)"
