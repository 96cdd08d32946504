"""Runs benchmarks/gauntlet.py --quick in a subprocess for the CI smoke tests of each model family."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

FULL = "trigger+weights+api-tiebreak"


def run_quick(tmp_path: Path, family: str | None) -> dict[str, Any]:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gauntlet.py"
    env = {**os.environ, "WMARK_BENCH_CACHE": str(tmp_path / "cache"), "WMARK_BENCH_RESULTS": str(tmp_path),
           "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(script), "--quick"] + ([] if family is None else ["--family", family])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = "gauntlet-quick" if family is None else f"gauntlet-{family}-quick"
    assert (tmp_path / f"{stem}.md").read_text().startswith("# Gauntlet")
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    doc: dict[str, Any] = json.loads((tmp_path / f"{stem}.json").read_text())
    for cell in doc["cells"]:
        assert set(cell) >= {"scheme", "attack", "attacked_accuracy", "decision", "log10_p", "queries"}
    return doc
