"""CI smoke runs of the gauntlet's --quick mode on the resnet and text families: each must finish, write its
outputs, detect the marked copies and accuse no one."""

from pathlib import Path

import pytest
from clikit import REAL_DATA
from gauntletkit import FULL, run_quick

from wmark.text_data import FORTUNES_DIR

pytestmark = REAL_DATA


@pytest.mark.parametrize(("family", "full", "tests"), [
    ("resnet", FULL, {"trigger-set", "weights", "api-tiebreak", "api-tiebreak-log"}),
    pytest.param("text", FULL, {"trigger-set", "weights", "api-tiebreak", "api-tiebreak-log"},
                 marks=pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="needs apt-get install fortunes")),
])
def test_quick_gauntlet_per_family(tmp_path: Path, family: str, full: str, tests: set[str]) -> None:
    doc = run_quick(tmp_path, family)
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
