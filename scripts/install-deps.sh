#!/usr/bin/env bash
# Installs every build and test dependency of nsad from Debian packages.
# Idempotent: packages already present are skipped by apt-get; safe to rerun.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config
  libuv1-dev libmsgpack-dev libcriterion-dev libsystemd-dev libmicrohttpd-dev
  clang libclang-rt-14-dev           # libFuzzer harness + sanitizer runtimes
  systemd                            # systemd-analyze, systemd-socket-activate for tests
  python3 python3-numpy python3-pip python3-venv
  procps psmisc                      # pgrep/kill helpers used by tests
  python3-torch                      # CPU PyTorch: client/python autograd + train smoke tests (~1-2 min)
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "install-deps: all dependencies present"
