"""Tests of the research baselines: run with ``pytest benchmarks/research`` (not part of the CI suite)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "tests")]

# a script that trains as soon as it is imported (its arguments come from the command line): not collected
collect_ignore = ["trigger_features.py"]
