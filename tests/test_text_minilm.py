"""MiniLM (all-MiniLM-L6-v2, offline) on a small slice of Debian fortunes, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from wmark.cli import main
from wmark.text_data import FORTUNES_DIR, NUM_CATEGORIES, _entries

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="needs apt-get install fortunes")]


def _slice(tmp: Path, per_category: int) -> Path:
    """The first entries of the 8 largest fortune categories, in fortune's own file format."""
    sizes = {p.name: len(_entries(p)) for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix}
    out = tmp / "fortunes"
    out.mkdir()
    for name in sorted(sizes, key=lambda n: -sizes[n])[:NUM_CATEGORIES]:
        short = [e for e in _entries(FORTUNES_DIR / name) if len(e) < 160][:per_category]
        (out / name).write_text("\n%\n".join(short) + "\n")
    return out


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout


def test_minilm_on_fortunes_keygen_train_embed_verify(tmp_path):
    data = f"fortunes:{_slice(tmp_path, 12)}@owner"
    key, base, marked = tmp_path / "k.key", tmp_path / "base.safetensors", tmp_path / "marked.safetensors"
    code, out = _run("keygen", "--owner", "ACME", "--out", str(key), "--classes", "8", "--triggers", "16",
                     "--modality", "text", "--tokenizer", "all-MiniLM-L6-v2", "--max-length", "64")
    assert code == 0, out
    code, out = _run("train", "--arch", "minilm-classifier", "--data", data, "--out", str(base), "--epochs", "1",
                     "--lr", "5e-5")
    assert code == 0, out
    code, out = _run("embed", "--key", str(key), "--arch", "minilm-classifier", "--weights", str(base), "--data", data,
                     "--out", str(marked), "--epochs", "12", "--max-samples", "16", "--trigger-per-batch", "16")
    assert code == 0, out
    code, out = _run("verify", "file", "--key", str(key), "--arch", "minilm-classifier", "--suspect", str(marked),
                     "--fixed", "--json")
    assert code == 0, out
    verdict = json.loads(out)
    assert verdict["decision"] == "detected" and verdict["log10_p"] < -6
    code, out = _run("verify", "file", "--key", str(key), "--arch", "minilm-classifier", "--suspect", str(base),
                     "--fixed")
    assert code == 1 and "not_detected" in out
