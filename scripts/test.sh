#!/usr/bin/env bash
# Install everything, then lint (the package, tests, benchmarks and scripts), type-check the package and run
# the whole test suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/install.sh | tail -n 1)
export PATH="$bin:$PATH"
ruff check wmark tests benchmarks scripts
mypy wmark
python -m pytest -q "$@"
