#!/usr/bin/env bash
# bench-daemon.sh — nsad's overhead benchmark (bench/daemon_bench.c, issue 7
# "Daemon overhead") on the CUDA backend, in one device call.
#
#   scripts/bench-daemon.sh pack [BUILDDIR]      # here (needs nvcc + build deps)
#   scripts/bench-daemon.sh run  [-- BENCH ARGS] # on the GPU machine
#   scripts/bench-daemon.sh cpu  [BUILDDIR] [-- BENCH ARGS]  # CPU backend, here
#
# pack: configures BUILDDIR (default build-benchd) with CUDA on, builds nsad,
#   nsactl and nsa_bench_daemon, and writes build-benchd-carry/pack.tar.xz:
#   those binaries (debug info stripped), libnsaclient, the shared libraries
#   they link (deps/; only the ones the GPU machine lacks are used there) and
#   COMMIT (git rev-parse --short HEAD, plus "-dirty" when tracked files differ).
# run: on the device machine, from the repo root, with the pack carried
#   (BENCHD_MPS=1: under CUDA MPS — a control daemon with its pipe and
#   log directories under /tmp is started before nsad and quit after, as
#   docs/OPERATIONS.md "GPU sharing" sets a node up; NSAD_SPIN_US and the
#   other nsad variables pass through the environment; the switch is not
#   NSA_-prefixed because nsad takes every NSA_* variable as a flag and
#   refuses to start on an unknown one):
#     run(command="scripts/bench-daemon.sh run", carry=["build-benchd-carry"])
#   Unpacks it (or, without a pack, builds from source into build-benchd when
#   that machine has the build dependencies), starts `nsad --backend cuda` on a
#   private socket, runs `nsa_bench_daemon --cuda --socket ...` (extra args
#   after `--`) and stops nsad. Logs under $OUT (default /tmp/nsa-benchd-out):
#   gpu.txt, commit.txt, bench_daemon.txt (the table), nsad.log, build.log.
# cpu: the same bench on the CPU backend from BUILDDIR (default build), which
#   starts its own nsad; prints the load average before and after. Exports
#   OMP_WAIT_POLICY=passive (unless set) for both nsad and the bench: with the
#   default spin-waiting, the two OpenMP runtimes steal the cores from each
#   other and the in-process side of the comparison runs up to 30x slower.
#
# Exit status: the bench's (1 on a lost/misrouted request or a mismatch), or
# 1 when nsad did not start or exited non-zero.
set -uo pipefail
MODE=${1:-run}
shift || true
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
CARRY=build-benchd-carry
ARGS=()

split_args() { # BUILDDIR? then -- args
  B_ARG=""
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; ARGS=("$@"); return; fi
    B_ARG=$1
    shift
  done
}

case "$MODE" in
pack)
  split_args "$@"
  B=${B_ARG:-build-benchd}
  cmake -S . -B "$B" -DNSA_BUILD_TESTS=OFF -DNSA_ENABLE_CUDA=ON > /tmp/nsa-benchd-cfg.log 2>&1 ||
    { cat /tmp/nsa-benchd-cfg.log; exit 1; }
  grep -q "CUDA backend ON" /tmp/nsa-benchd-cfg.log ||
    { echo "pack: CUDA backend OFF in $B (no nvcc?)"; exit 1; }
  cmake --build "$B" --target nsad nsactl nsa_bench_daemon -j2 || exit 1
  rm -rf "$CARRY/stage" && mkdir -p "$CARRY/stage/bin" "$CARRY/stage/lib" "$CARRY/stage/deps"
  for f in nsad nsactl nsa_bench_daemon; do
    strip --strip-debug -o "$CARRY/stage/bin/$f" "$B/bin/$f"
  done
  cp -a "$B"/lib/libnsaclient.so* "$CARRY/stage/lib/"
  # Every resolved shared library except the C runtime and the GPU driver
  # (those must come from the GPU machine itself).
  ldd "$CARRY"/stage/bin/* "$CARRY"/stage/lib/libnsaclient.so.0 2>/dev/null |
    awk '$3 ~ /^\// {print $3}' | sort -u |
    grep -vE '/(libc|libm|libdl|librt|libpthread|ld-linux[^/]*|libcuda|libnvidia[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$CARRY/stage/deps/"; done
  c=$(git rev-parse --short HEAD)
  git diff --quiet HEAD -- . 2>/dev/null || c="$c-dirty"
  echo "$c" > "$CARRY/stage/COMMIT"
  tar -C "$CARRY/stage" -cJf "$CARRY/pack.tar.xz" . && rm -rf "$CARRY/stage"
  ls -la "$CARRY/pack.tar.xz"
  echo "pack: commit $c; on the device: run(command=\"scripts/bench-daemon.sh run\", carry=[\"$CARRY\"])"
  ;;

run)
  split_args "$@"
  OUT=${OUT:-/tmp/nsa-benchd-out}
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 |
    tee "$OUT/gpu.txt"
  nproc | sed 's/^/cores: /' | tee -a "$OUT/gpu.txt"
  if [ -f "$CARRY/pack.tar.xz" ]; then
    P=/tmp/nsa-benchd
    rm -rf "$P" && mkdir -p "$P" && tar -C "$P" -xJf "$CARRY/pack.tar.xz" || exit 1
    cp "$P/COMMIT" "$OUT/commit.txt"
  else
    # No pack: build here (needs libuv, msgpack-c, ... on this machine).
    P=$ROOT/build-benchd
    { cmake -S . -B "$P" -DNSA_BUILD_TESTS=OFF &&
      cmake --build "$P" --target nsad nsactl nsa_bench_daemon -j"$(nproc)"; } \
      > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
    (git rev-parse --short HEAD 2>/dev/null || echo unknown) > "$OUT/commit.txt"
  fi
  echo "commit: $(cat "$OUT/commit.txt")"
  export LD_LIBRARY_PATH="$P/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if [ -d "$P/deps" ]; then # only what this machine lacks; nothing shadows its own
    mkdir -p "$P/need"
    export LD_LIBRARY_PATH="$P/need:$LD_LIBRARY_PATH"
    for _ in 1 2 3 4; do
      for lib in $(ldd "$P"/bin/* "$P"/lib/*.so* "$P"/need/* 2>/dev/null |
                   awk '/not found/ {print $1}' | sort -u); do
        [ -e "$P/deps/$lib" ] && ln -sf "$P/deps/$lib" "$P/need/$lib"
      done
    done
    echo "libraries taken from the pack: $(ls "$P/need" | tr '\n' ' ')"
  fi
  MPS=${BENCHD_MPS:-0}
  if [ "$MPS" = 1 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/nsa-benchd-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/nsa-benchd-mps/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d || { echo "nvidia-cuda-mps-control -d failed"; exit 1; }
    echo "MPS control daemon started ($CUDA_MPS_PIPE_DIRECTORY)"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  fi
  echo "NSAD_SPIN_US=${NSAD_SPIN_US:-unset} MPS=$MPS" | tee -a "$OUT/gpu.txt"
  S=/tmp/nsad-benchd.sock
  rm -f "$S"
  "$P/bin/nsad" --backend cuda --socket "$S" --log-level info > "$OUT/nsad.log" 2>&1 &
  np=$!
  for _ in $(seq 300); do [ -S "$S" ] && break; kill -0 "$np" 2>/dev/null || break; sleep 0.1; done
  if ! [ -S "$S" ]; then
    echo "nsad did not start:"; tail -20 "$OUT/nsad.log"; exit 1
  fi
  "$P/bin/nsactl" --socket "$S" status 2>&1 | head -12
  echo "== nsa_bench_daemon --cuda ${ARGS[*]:-}"
  timeout 540 "$P/bin/nsa_bench_daemon" --cuda --socket "$S" "${ARGS[@]}" 2>&1 |
    tee "$OUT/bench_daemon.txt"
  rc=${PIPESTATUS[0]}
  kill -TERM "$np" 2>/dev/null
  wait "$np"
  nrc=$?
  echo "nsad exit $nrc; bench exit $rc"
  grep -iE "error|warn" "$OUT/nsad.log" | head -10
  [ "$nrc" = 0 ] || rc=1
  exit "$rc"
  ;;

cpu)
  split_args "$@"
  B=${B_ARG:-build}
  cmake --build "$B" --target nsad nsa_bench_daemon -j2 > /dev/null || exit 1
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); $(getconf _NPROCESSORS_ONLN) cores; $(date -u); commit $(git rev-parse --short HEAD); OMP_WAIT_POLICY=$OMP_WAIT_POLICY OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
  "$B/bin/nsa_bench_daemon" "${ARGS[@]}"
  rc=$?
  echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
  exit "$rc"
  ;;

*)
  sed -n '2,28p' "$0"
  exit 2
  ;;
esac
