#!/usr/bin/env bash
# Install wmark and what it needs on a fresh Debian machine of this project's kind.
# torch is pinned here (a CPU wheel lies on disk); pyproject.toml only declares a range.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (digits still works)." >&2
  fi
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
