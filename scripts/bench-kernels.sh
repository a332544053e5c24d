#!/usr/bin/env bash
# bench-kernels.sh — issue 7's kernel benchmark (v2 forward + backward and the
# peers on the same selections) in ONE device call.
#
#   scripts/bench-kernels.sh pack NSA_TRITON [BUILDDIR]   # here (needs nvcc)
#   scripts/bench-kernels.sh run [--quick] [-- NSA_BENCH_CUDA ARGS]   # on the GPU machine
#
# pack: configures BUILDDIR (default build-benchk) Release, CUDA on, sm_90,
#   builds nsa_bench_cuda, and writes build-benchk-carry/pack.tar.xz: the
#   binary (debug info stripped), the shared libraries it links except the C
#   runtime and the GPU driver (deps/; only those the GPU machine lacks are
#   used there) and COMMIT. NSA_TRITON is a fetched
#   XunhaoLai/native-sparse-attention-triton: a checkout, or a bare git dir
#   such as the fetch tool's /work/.mirror/XunhaoLai+native-sparse-attention-triton/repo
#   (exported with git archive HEAD). Its native_sparse_attention/ and
#   LICENSE are copied to .peer/native-sparse-attention-triton (.peer/ is
#   git-ignored: fetched code is carried, never committed).
# run: on the device machine, from the repo root:
#     run(command="scripts/bench-kernels.sh run", carry=["build-benchk-carry", ".peer"], timeout_s=600)
#   1. nsa_bench_cuda --dump-sel SELDIR --csv $OUT/v2.csv  (v2 fwd + bwd, plan, workspace)
#   2. bench/peers.py on SELDIR with /opt/torch/.venv/bin/python3 (else python3):
#      peer A (packing + varlen attention), peer B (topk_sparse_attention from
#      .peer/), dense flash SDPA; ends with the merged table and v2/peer B
#      ratios against the targets (fwd <= 0.5x, bwd <= 0.6x).
#   --quick: T = 16k only (both parts). Everything is tee'd to $OUT (default
#   /tmp/nsa-benchk-out): gpu.txt, commit.txt, v2.txt, v2.csv, peers.txt,
#   peers.csv, merged.txt. Each part runs under its own timeout so the whole
#   call ends inside 10 minutes.
# Exit status: 1 when nsa_bench_cuda failed or timed out, else peers.py's.
set -uo pipefail
MODE=${1:-run}
shift || true
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
CARRY=build-benchk-carry
PEER=.peer/native-sparse-attention-triton

case "$MODE" in
pack)
  SRC=${1:-}
  B=${2:-build-benchk}
  [ -n "$SRC" ] || { echo "pack: usage: $0 pack NSA_TRITON_PATH [BUILDDIR]"; exit 2; }
  git check-ignore -q .peer/x || { echo "pack: .peer/ is not git-ignored; refusing to copy fetched code"; exit 1; }
  # 1. the peer's sources (only the package and its license)
  rm -rf "$PEER" && mkdir -p "$PEER"
  if [ -d "$SRC/native_sparse_attention" ]; then
    cp -a "$SRC/native_sparse_attention" "$PEER/" && cp -a "$SRC/LICENSE" "$PEER/" 2>/dev/null
    (git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown) > "$PEER/COMMIT"
  elif git --git-dir="$SRC" rev-parse HEAD > /dev/null 2>&1; then
    git --git-dir="$SRC" archive HEAD native_sparse_attention LICENSE | tar -x -C "$PEER" || exit 1
    git --git-dir="$SRC" rev-parse HEAD > "$PEER/COMMIT"
  else
    echo "pack: $SRC is neither a checkout nor a git dir of native-sparse-attention-triton"; exit 1
  fi
  [ -f "$PEER/native_sparse_attention/ops/triton/topk_sparse_attention.py" ] ||
    { echo "pack: $PEER lacks ops/triton/topk_sparse_attention.py"; exit 1; }
  find "$PEER" -name __pycache__ -prune -exec rm -rf {} +
  echo "pack: peer B sources at $PEER (commit $(cat "$PEER/COMMIT"), $(du -sh "$PEER" | cut -f1))"
  # 2. nsa_bench_cuda
  cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DNSA_BUILD_TESTS=OFF \
    -DNSA_ENABLE_CUDA=ON > /tmp/nsa-benchk-cfg.log 2>&1 || { cat /tmp/nsa-benchk-cfg.log; exit 1; }
  grep -q "CUDA backend ON" /tmp/nsa-benchk-cfg.log ||
    { echo "pack: CUDA backend OFF in $B (no nvcc?)"; exit 1; }
  cmake --build "$B" --target nsa_bench_cuda -j2 || exit 1
  rm -rf "$CARRY/stage" && mkdir -p "$CARRY/stage/bin" "$CARRY/stage/deps"
  strip --strip-debug -o "$CARRY/stage/bin/nsa_bench_cuda" "$B/bin/nsa_bench_cuda"
  ldd "$CARRY/stage/bin/nsa_bench_cuda" 2>/dev/null |
    awk '$3 ~ /^\// {print $3}' | sort -u |
    grep -vE '/(libc|libm|libdl|librt|libpthread|ld-linux[^/]*|libcuda|libnvidia[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$CARRY/stage/deps/"; done
  c=$(git rev-parse --short HEAD)
  git diff --quiet HEAD -- . 2>/dev/null || c="$c-dirty"
  echo "$c" > "$CARRY/stage/COMMIT"
  tar -C "$CARRY/stage" -cJf "$CARRY/pack.tar.xz" . && rm -rf "$CARRY/stage"
  ls -la "$CARRY/pack.tar.xz"
  # CPU check of peers.py's selection reading and peer A's packing, with a
  # python that has torch (Debian's python3-torch here), if there is one.
  for py in python3 /usr/bin/python3; do
    "$py" -c "import torch" 2> /dev/null || continue
    "$B/bin/nsa_bench_cuda" --dump-sel /tmp/nsa-benchk-selftest --dump-only --quick > /dev/null &&
      "$py" bench/peers.py --cpu-selftest --sel-dir /tmp/nsa-benchk-selftest 2>&1 | tail -5
    break
  done
  total=$(du -sk "$CARRY" "$PEER" | awk '{s += $1} END {print s}')
  echo "pack: commit $c; carried ${total} KiB (limit 65536 KiB with the working tree)"
  echo "pack: on the device: run(command=\"scripts/bench-kernels.sh run\", carry=[\"$CARRY\", \".peer\"], timeout_s=600)"
  ;;

run)
  QUICK=""
  ARGS=()
  while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=--quick ;;
    --) shift; ARGS=("$@"); break ;;
    *) echo "run: unknown argument $1"; exit 2 ;;
    esac
    shift
  done
  OUT=${OUT:-/tmp/nsa-benchk-out}
  mkdir -p "$OUT"
  T0=$(date +%s)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); cores: $(nproc)" | tee -a "$OUT/gpu.txt"
  [ -f "$CARRY/pack.tar.xz" ] || { echo "run: no $CARRY/pack.tar.xz (run '$0 pack' here, carry it)"; exit 1; }
  P=/tmp/nsa-benchk
  rm -rf "$P" && mkdir -p "$P" && tar -C "$P" -xJf "$CARRY/pack.tar.xz" || exit 1
  cp "$P/COMMIT" "$OUT/commit.txt"
  echo "commit: $(cat "$OUT/commit.txt"); peer B: $(cat "$PEER/COMMIT" 2>/dev/null || echo 'not carried')"
  mkdir -p "$P/need"
  export LD_LIBRARY_PATH="$P/need${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  for _ in 1 2 3 4; do # only what this machine lacks; nothing shadows its own
    for lib in $(ldd "$P"/bin/* "$P"/need/* 2>/dev/null | awk '/not found/ {print $1}' | sort -u); do
      [ -e "$P/deps/$lib" ] && ln -sf "$P/deps/$lib" "$P/need/$lib"
    done
  done
  echo "libraries taken from the pack: $(ls "$P/need" | tr '\n' ' ')"
  PY=/opt/torch/.venv/bin/python3
  [ -x "$PY" ] || PY=python3
  # Time budget (one 10-minute call). Estimates, not measurements: the v2 part
  # is dominated by host-side random inputs at 64k (~2 s per h) and ~25
  # timed requests per direction; the peers by Triton's first compile
  # (~1 min), peer B at 64k (~1 s per config) and dense SDPA at 64k (~4 s per h).
  if [ -n "$QUICK" ]; then TV=150; TP=300; else TV=270; TP=300; fi
  echo "budget: unpack ~5 s | nsa_bench_cuda est. $([ -n "$QUICK" ] && echo 30 || echo 120) s, limit $TV s | peers.py est. $([ -n "$QUICK" ] && echo 120 || echo 200) s, limit $TP s (stops starting configs at $((TP - 60)) s) | total limit $((TV + TP)) s"
  SEL=/tmp/nsa-benchk-sel
  rm -rf "$SEL"
  echo "== nsa_bench_cuda $QUICK --dump-sel $SEL --csv $OUT/v2.csv ${ARGS[*]:-}"
  timeout "$TV" "$P/bin/nsa_bench_cuda" $QUICK --dump-sel "$SEL" --csv "$OUT/v2.csv" "${ARGS[@]}" 2>&1 |
    tee "$OUT/v2.txt"
  vrc=${PIPESTATUS[0]}
  echo "nsa_bench_cuda exit $vrc after $(( $(date +%s) - T0 )) s"
  if grep -q "no CUDA device" "$OUT/v2.txt"; then echo "run: no GPU here, nothing timed"; exit 0; fi
  [ -f "$SEL/manifest.tsv" ] || { echo "run: no selections dumped; peers not run"; exit 1; }
  echo "== $PY bench/peers.py ($($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1 | tail -1))"
  PYTHONUNBUFFERED=1 timeout "$TP" "$PY" bench/peers.py --sel-dir "$SEL" --nsa-triton "$PEER" \
    --v2-csv "$OUT/v2.csv" --csv "$OUT/peers.csv" --deadline-s $((TP - 60)) $QUICK 2>&1 |
    tee "$OUT/peers.txt"
  prc=${PIPESTATUS[0]}
  sed -n '/^== merged table/,$p' "$OUT/peers.txt" > "$OUT/merged.txt"
  echo "peers.py exit $prc; total $(( $(date +%s) - T0 )) s"
  [ "$vrc" = 0 ] || exit 1
  exit "$prc"
  ;;

*)
  sed -n '2,30p' "$0"
  exit 2
  ;;
esac
