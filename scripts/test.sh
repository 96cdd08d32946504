#!/usr/bin/env bash
# Install everything, then lint (the package, tests, benchmarks and scripts), type-check the package and run
# the whole test suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/install.sh | tail -n 1)
export PATH="$bin:$PATH"
ruff check wmark tests benchmarks scripts
mypy wmark
# One pytest-xdist worker per core (at most 4; none on one core), each test file on one worker so that its module
# fixtures are built once; the files holding slow tests go first (tests/conftest.py).
workers=$(nproc 2>/dev/null || echo 1)
[ "$workers" -gt 4 ] && workers=4
[ "$workers" -lt 2 ] && workers=0
python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
