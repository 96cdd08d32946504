"""Tests of the research baselines: run with ``pytest benchmarks/research`` (not part of the CI suite)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "tests")]
