#!/usr/bin/env bash
# Install wmark and what it needs on a fresh Debian machine of this project's kind.
# Uses the active virtual environment, or makes and uses ./.venv when none is active.
# torch is pinned here (a CPU wheel lies on disk); pyproject.toml only declares a range.
# Prints the path of the environment's bin/ folder last, for the calling script.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -d /usr/share/games/fortunes ] || need+=(fortunes)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "Missing Debian packages: run 'sudo apt-get install ${need[*]}' (digits still works)." >&2
  fi
fi
if [ -n "${VIRTUAL_ENV:-}" ]; then
  py="$VIRTUAL_ENV/bin/python"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py="$PWD/.venv/bin/python"
fi
"$py" -m pip install -q --upgrade pip >/dev/null
"$py" -m pip install -q torch==2.13.0
extras=${WMARK_EXTRAS:-dev}
"$py" -m pip install -q -e ".[$extras]"
dirname "$py"
