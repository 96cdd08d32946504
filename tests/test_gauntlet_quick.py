"""CI smoke runs of the gauntlet's --quick mode, one per model family: each must finish, write its outputs,
detect the marked copies and accuse no one."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from clikit import REAL_DATA

from wmark.text_data import FORTUNES_DIR

pytestmark = REAL_DATA

FULL = "trigger+weights+api-tiebreak"


def _run_quick(tmp_path: Path, family: str | None) -> dict[str, Any]:
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


def test_quick_gauntlet_runs_and_accuses_no_independent_model(tmp_path: Path) -> None:
    doc = _run_quick(tmp_path, None)
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


@pytest.mark.parametrize(("family", "full", "tests"), [
    ("resnet", FULL, {"trigger-set", "weights", "api-tiebreak", "api-tiebreak-log"}),
    pytest.param("text", FULL, {"trigger-set", "weights", "api-tiebreak", "api-tiebreak-log"},
                 marks=pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="needs apt-get install fortunes")),
])
def test_quick_gauntlet_per_family(tmp_path: Path, family: str, full: str, tests: set[str]) -> None:
    doc = _run_quick(tmp_path, family)
    assert doc["family"]["name"] == family
    assert doc["null_panel"]["false_accusations"] == 0 and doc["null_panel"]["models"] >= 2
    cells = {(c["scheme"], c["attack"]): c for c in doc["cells"]}
    assert {s for s, _ in cells} == ({"none", full} if family == "resnet" else {"none", "trigger", "weights", full})
    assert all(c["decision"] == "not_detected" for (s, _), c in cells.items() if s == "none")
    # the trigger set is found in the unmarked copy (the resnet quick run has no trigger-only row: CPU)
    assert cells[(full, "none")]["tests"]["trigger-set"] < -6
    if family == "text":
        assert cells[("trigger", "none")]["decision"] == "detected"
    assert cells[(full, "none")]["kind"] == "copy" and cells[(full, "permute")]["decision"] == "detected"
    assert set(cells[(full, "extract-hard")]["tests"]) == tests
    assert cells[(full, "extract-hard")]["correction"] == "weighted holm"
    assert doc["full_row"]["scheme"] == full
    checked = {r["scheme"] for r in doc["null_panel"]["rows"]}
    assert full in checked and any(name.startswith(f"{full}[") for name in checked)
    if family == "resnet":
        # folding BatchNorm into the convs leaves the weight mark readable
        assert cells[(full, "bn-fold")]["tests"]["weights"] < -6
    else:
        assert not any("weights" in what for what in doc["family"]["refused"])
        # the weight mark is read through the hidden/head permutation and the fused, renamed QKV file, and the
        # control's weight test (aligned to the weight-marked model) reads chance
        for attack in ("none", "permute", "fused-qkv"):
            assert cells[("weights", attack)]["tests"]["weights"] < -6
            assert cells[(full, attack)]["tests"]["weights"] < -6
        assert cells[("none", "fused-qkv")]["tests"]["weights"] > -3
        assert cells[(full, "fused-qkv")]["decision"] == "detected"
        assert "weights" in checked
