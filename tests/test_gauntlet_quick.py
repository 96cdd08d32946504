"""CI smoke run of the gauntlet's --quick mode: it must finish, write its outputs and accuse no one."""

import json
import os
import subprocess
import sys
from pathlib import Path

from clikit import REAL_DATA

pytestmark = REAL_DATA


def test_quick_gauntlet_runs_and_accuses_no_independent_model(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gauntlet.py"
    env = {**os.environ, "WMARK_BENCH_CACHE": str(tmp_path / "cache"), "WMARK_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gauntlet-quick.json").read_text())
    assert (tmp_path / "gauntlet-quick.md").read_text().startswith("# Gauntlet")
    assert (tmp_path / "gauntlet-quick.png").stat().st_size > 10_000
    assert doc["null_panel"]["false_accusations"] == 0 and doc["null_panel"]["models"] >= 3
    cells = {(c["scheme"], c["attack"]): c for c in doc["cells"]}
    for cell in doc["cells"]:
        assert set(cell) >= {"scheme", "attack", "attacked_accuracy", "decision", "log10_p", "queries"}
    assert all(c["decision"] == "not_detected" for (s, _), c in cells.items() if s == "none")
    assert cells[("trigger", "none")]["decision"] == "detected"
    assert cells[("weights", "permute")]["decision"] == "detected"
    assert cells[("trigger+api-mark", "none")]["kind"] == "copy"
    full = "trigger+weights+api-tiebreak"
    assert cells[(full, "none")]["kind"] == "copy" and cells[(full, "permute")]["decision"] == "detected"
    assert set(cells[(full, "extract-hard")]["tests"]) == {"trigger-set", "weights", "api-tiebreak", "api-tiebreak-log"}
    assert cells[(full, "extract-hard")]["correction"] == "weighted holm"
    assert doc["full_row"]["scheme"] == full and doc["full_row"]["attacks_in_budget"] >= 1
    checked = {r["scheme"] for r in doc["null_panel"]["rows"]}
    assert full in checked and any(name.startswith(f"{full}[") for name in checked)
    assert set(doc["fidelity"]) >= {"none", "trigger", "weights", "trigger+weights"}
