"""The generated benchmark page covers every results file and shows a summary's numbers."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from render_docs import render


def test_every_results_file_gets_a_section_with_its_summary(tmp_path: Path) -> None:
    (tmp_path / "alpha.json").write_text(json.dumps({
        "machine": {"date": "2026-12-03", "cpus": 2},
        "summary": [{"keys": 10, "missed": 0, "copy_kept_mean": 0.5625}],
    }))
    (tmp_path / "beta.json").write_text(json.dumps({"alpha": 1e-6, "note": "a | b", "rows": [1, 2]}))
    page = render(tmp_path)
    assert "## alpha" in page and "## beta" in page
    assert "| keys | missed | copy_kept_mean |" in page and "| 10 | 0 | 0.5625 |" in page
    assert "measured date 2026-12-03, cpus 2" in page
    assert "* `note`: a \\| b" in page and "rows" not in page.split("## beta")[1]


def test_rounding_never_lands_on_a_whole_number_the_value_is_not(tmp_path: Path) -> None:
    from render_docs import _fmt

    assert _fmt(-5.99984940520541) == "-5.9998"  # not "-6": at alpha = 1e-6 this is no detection
    assert _fmt(-6.000489331133008) == "-6.0005"
    assert _fmt(-6.0) == "-6" and _fmt(3000.8) == "3001" and _fmt(0.5625) == "0.5625" and _fmt(0.123456) == "0.1235"
    assert _fmt(1.9999999999) == "1.9999999999"
