#!/usr/bin/env bash
# Sets up everything the harness needs on a fresh Linux or macOS machine: a virtual environment in .venv with
# the project and its test tools, plus (on Debian/Ubuntu, as root) OpenBLAS for fast MLX CPU matmuls and
# Chromium for the report's browser check. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "setup: installing the project and test tools into .venv"
.venv/bin/python -m pip install -qq --upgrade pip
.venv/bin/python -m pip install -qq -e '.[test]'

# Debian packages are optional extras: the harness runs without them (slower MLX on CPU, browser test skipped).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  want=()
  dpkg -s libopenblas0-pthread >/dev/null 2>&1 || want+=(libopenblas0-pthread)
  dpkg -s chromium >/dev/null 2>&1 || want+=(chromium)
  dpkg -s fonts-dejavu-core >/dev/null 2>&1 || want+=(fonts-dejavu-core)
  dpkg -s iproute2 >/dev/null 2>&1 || want+=(iproute2)
  # openssh-server: the tests start ranks over ssh on namespaces that stand for Macs
  dpkg -s openssh-server >/dev/null 2>&1 || want+=(openssh-server openssh-client)
  if [ ${#want[@]} -gt 0 ]; then
    echo "setup: apt-get install ${want[*]}"
    if ! { apt-get update -qq >/dev/null && \
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null; }; then
      echo "setup: apt-get failed; going on without ${want[*]} (slower MLX on CPU, browser and namespace tests skipped)"
    fi
  fi
fi
echo "setup: done"
