"""CI smoke run of the gauntlet's --quick mode on the default (cnn) family: it must finish, write its outputs,
detect the marked copies and accuse no one. The other families run in test_gauntlet_families.py, a file of its own
so that a parallel run can give each its own worker."""

from pathlib import Path

from clikit import REAL_DATA
from gauntletkit import FULL, run_quick

pytestmark = REAL_DATA


def test_quick_gauntlet_runs_and_accuses_no_independent_model(tmp_path: Path) -> None:
    doc = run_quick(tmp_path, None)
    assert "family" not in doc  # the default (cnn) gauntlet's documents are unchanged
    assert doc["null_panel"]["false_accusations"] == 0 and doc["null_panel"]["models"] >= 3
    cells = {(c["scheme"], c["attack"]): c for c in doc["cells"]}
    assert all(c["decision"] == "not_detected" for (s, _), c in cells.items() if s == "none")
    assert cells[("trigger", "none")]["decision"] == "detected"
    assert cells[("weights", "permute")]["decision"] == "detected"
    assert cells[("trigger+api-mark", "none")]["kind"] == "copy"
    full = FULL
    assert cells[(full, "none")]["kind"] == "copy" and cells[(full, "permute")]["decision"] == "detected"
    assert set(cells[(full, "extract-hard")]["tests"]) == {"trigger-set", "weights", "api-tiebreak", "api-tiebreak-log"}
    assert cells[(full, "extract-hard")]["correction"] == "weighted holm"
    assert doc["full_row"]["scheme"] == full and doc["full_row"]["attacks_in_budget"] >= 1
    checked = {r["scheme"] for r in doc["null_panel"]["rows"]}
    assert full in checked and any(name.startswith(f"{full}[") for name in checked)
    assert set(doc["fidelity"]) >= {"none", "trigger", "weights", "trigger+weights"}
